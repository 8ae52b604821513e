"""Two decoders at once through the nodes: Load Video Decoder (files of models/vae and models/vae_approx that core
VAELoader cannot load) feeding the sampler's ``decoder`` (the output frames) and ``preview_decoder`` (the live
view). What this proves: the output frames are exactly those of a run with one decoder, the live view's are exactly
the preview decoder's own decode of the same latents, both streams get every block, a lone preview decoder's
frames are the output, the core VAE still re-encodes Krea's context (the output decoder changes no latent), both
decoders are in the one memory estimate, and every refusal is one line before the engine runs."""
from __future__ import annotations

import os
import shutil

import pytest
import test_nodes
import torch
from safetensors.torch import load_file
from test_nodes import MODELS, WRITTEN, H, Recorder, W, cond, config, run, sampler_mod, stream_mod, tiny

from cascade_core.sampling.loop import BlockEvent
from cascade_core.video.frames import load_decoder
from cascade_core.video.taew import TinyWanDecoder

model, prompts, no_engine = test_nodes.model, test_nodes.prompts, test_nodes.no_engine  # test_nodes' fixtures
BLOCKS = 3
TAEW = "bc_tiny_taew2_1.safetensors"  # in models/vae_approx
WAN = os.path.basename(WRITTEN["vae"])  # the tiny Wan2.1 VAE in models/vae


@pytest.fixture(scope="module", autouse=True)
def files_in_the_folders():
    """A tiny taew2_1 in models/vae_approx (the tiny Wan2.1 VAE is in models/vae already), and a DiT in models/vae
    (a file of something else); removed at the module's end."""
    from cascade_core.weights.safe_io import save_safetensors

    approx = os.path.join(MODELS, "vae_approx")
    torch.manual_seed(0)
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), os.path.join(approx, TAEW))
    dit = os.path.join(MODELS, "vae", "bc_a_dit.safetensors")
    shutil.copyfile(os.path.join(MODELS, "diffusion_models", tiny.DIT_NAME), dit)
    yield
    for path in (os.path.join(approx, TAEW), dit):
        os.remove(path)


def loaded(name: str, dtype: str = "auto"):
    (decoder,) = run("BlockCascadeDecoderLoader", decoder_name=name, dtype=dtype)
    return decoder


class CoreVAE:  # what VAELoader returns, as far as the pack uses it
    latent_channels = 16

    def get_sd(self):
        return load_file(WRITTEN["vae"])


@pytest.fixture
def seen(monkeypatch):
    """The blocks each stream of the widget's Reporter handed out: {"output"|"view": [(block, frames), ...]}, and
    "latents": the final blocks' latents as the engine gave them."""
    got = {"output": [], "view": [], "latents": []}
    keep, show, on_block = stream_mod.Reporter._keep, stream_mod.Reporter._show, stream_mod.Reporter.on_block

    def keep_(self, ev):
        got["output"].append((ev.block, ev.frames.clone()))
        return keep(self, ev)

    def show_(self, ev, frames=None):
        got["view"].append((ev.block, ev.frames.clone()))
        return show(self, ev, frames)

    def on_block_(self, ev):
        got["latents"].append(ev.latents.clone())
        return on_block(self, ev)

    monkeypatch.setattr(stream_mod.Reporter, "_keep", keep_)
    monkeypatch.setattr(stream_mod.Reporter, "_show", show_)
    monkeypatch.setattr(stream_mod.Reporter, "on_block", on_block_)
    return got


def sample(engine_model, prompt, seed=2, **inputs):
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=engine_model, config=config(), width=W, height=H,
                             blocks=BLOCKS, seed=seed, positive=prompt, **inputs)
    return latent["samples"], images, rec


def own_decode(name: str, latents: list[torch.Tensor]) -> torch.Tensor:
    """The decoder file's own decode of the blocks' latents, block after block: [1, 3, F, H, W] in [-1, 1]."""
    folder = "vae_approx" if name == TAEW else "vae"
    stream = load_decoder(os.path.join(MODELS, folder, name), torch.float32, "cpu").stream(None)
    return torch.cat([stream.decode(z) for z in latents], 2)


def test_the_loader_lists_both_folders_and_refuses_a_file_of_something_else():
    names = sampler_mod.decoders.decoder_files()  # what the schema lists when it is built
    assert TAEW in names and WAN in names
    taew, wan = loaded(TAEW), loaded(WAN, "fp32")
    assert (taew.kind, taew.dtype, wan.kind, wan.dtype) == ("TinyWanDecoder", "auto", "WanVAEDecoder", "fp32")
    assert taew.path.endswith(os.path.join("vae_approx", TAEW)) and taew.weights > 0
    with pytest.raises(ValueError, match=r"^bc_a_dit.safetensors: not a .*looks like a Wan DiT") as err:
        loaded("bc_a_dit.safetensors")
    assert len(str(err.value).splitlines()) == 1


def test_the_output_is_the_single_decoder_runs_and_the_live_view_the_preview_decoders_own(model, prompts, seen):
    one, images_one, _ = sample(model, prompts[0], vae=CoreVAE())
    single_view = [f for _, f in seen["view"]]
    for k in seen:
        seen[k].clear()
    two, images_two, rec = sample(model, prompts[0], vae=CoreVAE(), preview_decoder=loaded(TAEW))
    assert torch.equal(one, two)
    assert torch.equal(images_one, images_two)  # the output: exactly the frames of the run with the vae alone
    # both streams got every block, in order
    assert [b for b, _ in seen["output"]] == [b for b, _ in seen["view"]] == list(range(BLOCKS))
    # the live view: exactly the preview decoder's own decode of the same latents
    view = torch.cat([f for _, f in seen["view"]], 2)
    assert torch.equal(view, own_decode(TAEW, seen["latents"]))
    assert not torch.equal(view, torch.cat(single_view, 2))  # (not the vae's frames, as in the single run)
    frames = [d for _, d in rec.events("frames")]
    assert [d["block"] for d in frames] == list(range(BLOCKS)) and "first_block_s" in frames[0]
    assert sum(len(d["frames"]) for d in frames) == images_two.shape[0]
    (_, done), = rec.events("done")
    assert done["frames"] == images_two.shape[0] and done["blocks"] == BLOCKS


def test_the_decoder_input_makes_the_output_and_a_lone_preview_decoder_too(model, prompts, seen):
    _, with_vae, _ = sample(model, prompts[0], vae=CoreVAE())
    # decoder replaces the vae for the output (the Wan2.1 VAE file through the loader: the same frames)
    _, with_decoder, _ = sample(model, prompts[0], decoder=loaded(WAN, "fp32"), vae=CoreVAE())
    assert torch.equal(with_vae, with_decoder)
    for k in seen:
        seen[k].clear()
    # a lone preview decoder: one decode, whose frames are the output and the live view
    latent, images, rec = sample(model, prompts[0], preview_decoder=loaded(TAEW))
    ref = own_decode(TAEW, seen["latents"])
    assert torch.equal(images, ((ref[0].permute(1, 2, 3, 0) + 1) * 0.5).clamp(0, 1))
    assert [b for b, _ in seen["output"]] == [b for b, _ in seen["view"]] == list(range(BLOCKS))
    assert all(o is not v for (_, o), (_, v) in zip(seen["output"], seen["view"]))  # (recorded copies)
    assert torch.equal(torch.cat([f for _, f in seen["output"]], 2), torch.cat([f for _, f in seen["view"]], 2))


def test_a_start_image_with_a_decoder_and_a_preview_decoder_streams_its_frame_first_on_both(model, prompts, seen):
    class EncodingVAE(CoreVAE):
        def encode(self, pixels):  # [1, H, W, 3] -> raw latents [1, 16, 1, H/8, W/8]
            return torch.full((1, 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8), 0.5)

    image = torch.rand(1, H, W, 3)
    latent, images, _ = sample(model, prompts[0], vae=EncodingVAE(), start_image=image, decoder=loaded(WAN, "fp32"),
                               preview_decoder=loaded(TAEW))
    assert [b for b, _ in seen["output"]] == [b for b, _ in seen["view"]] == [-1, *range(BLOCKS)]
    assert images.shape[0] == 1 + 4 * (latent.shape[2] - 1)


def test_both_decoders_are_in_the_one_memory_estimate(model, no_engine):
    asked = []

    def checked(**inputs):
        run_ = sampler_mod.check(model, config(), W, H, BLOCKS, cond(), None, inputs.get("vae"), None, None, 0, None,
                                 inputs.get("decoder"), inputs.get("preview_decoder"))
        real = run_.session.memory
        run_.session.memory = lambda *a, **k: (asked.append(a[3]), real(*a, **k))[1]
        sampler_mod.make_room(run_, model)
        return run_

    wan_sd = load_file(WRITTEN["vae"])
    wan_bytes = sum(t.numel() * 4 for k, t in wan_sd.items() if k.startswith(("decoder.", "conv2.")))
    taew, wan = loaded(TAEW), loaded(WAN, "fp32")
    taew_bytes = sum(t.numel() * 4 for t in load_file(taew.path).values())
    checked(vae=CoreVAE())
    checked(vae=CoreVAE(), preview_decoder=taew)
    assert checked(vae=CoreVAE(), decoder=wan).vae_sd is None  # the vae only encodes: its decoder is not built
    checked(preview_decoder=taew)
    assert asked == [wan_bytes, wan_bytes + taew_bytes, wan.weights * 4, taew_bytes]


def test_decoder_refusals_are_one_line_before_the_engine_runs(model, no_engine):
    taew = loaded(TAEW)
    for inputs, message in (
            (dict(decoder=CoreVAE()), r"^decoder: expected a Load Video Decoder \(Block Cascade\) output, got "
                                      r"CoreVAE$"),
            (dict(preview_decoder="x"), r"^preview_decoder: expected a Load Video Decoder .* got str$"),
            (dict(decoder=taew, preview_decoder=loaded(TAEW, "fp16")),
             rf"^preview_decoder: {TAEW} is the decoder's file too, .*disconnect preview_decoder$")):
        with pytest.raises(ValueError, match=message) as err:
            with Recorder():
                run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=0,
                    positive=cond(), **inputs)
        assert len(str(err.value).splitlines()) == 1


def test_krea_reencodes_with_the_vae_whatever_decodes_the_output(prompts, seen):
    from cascade_core.video.vae_encode import load_encoder

    class KreaVAE(CoreVAE):  # the core VAE's encoder: diffusers' on the same weights
        encoder = load_encoder(WRITTEN["vae"])

        def encode(self, pixels):
            video = pixels.movedim(-1, 0).unsqueeze(0) * 2 - 1  # [1, 3, B, H, W]
            return self.encoder.encode(video).latent_dist.mode()

    folder = os.path.join(MODELS, "diffusion_models")
    krea = os.path.join(folder, "krea-realtime-video-14b.safetensors")
    shutil.copyfile(os.path.join(folder, tiny.DIT_NAME), krea)
    try:
        (m,) = run("BlockCascadeModelLoader", model_name=os.path.basename(krea), dtype="fp32", ema="auto")
        (settings,) = run("BlockCascadeConfig", parallel=1, attention="causal", window=-1, sink=-1, steps="auto",
                          shift=0.0, devices="auto", attention_backend="auto", flashblock=False)
        outs = []
        for extra in ({}, {"decoder": loaded(TAEW)}):
            for k in seen:
                seen[k].clear()
            with Recorder():
                latent, images = run("BlockCascadeSampler", model=m, config=settings, width=W, height=H, blocks=3,
                                     seed=1, positive=prompts[0], vae=KreaVAE(), **extra)
            outs.append((latent["samples"], images))
    finally:
        os.remove(krea)
    assert torch.equal(outs[0][0], outs[1][0])  # the same latents: the re-encoded frame is the vae's decode
    ref = own_decode(TAEW, seen["latents"])
    assert torch.equal(outs[1][1], ((ref[0].permute(1, 2, 3, 0) + 1) * 0.5).clamp(0, 1))  # the output: the decoder's


def test_the_reporter_without_a_preview_decoder_hands_one_decode_to_both():
    from cascade_core.video.frames import LatentRGBDecoder

    sent = []
    r = stream_mod.Reporter("1", 1, 3, 5, 1, W, H, LatentRGBDecoder(), send=lambda e, d: sent.append(e))
    assert r.decoding.preview is None and len(r.decoding.active()) == 1
    r.start()
    r.on_block(BlockEvent(0, torch.randn(1, 16, 3, H // 8, W // 8), 0, 0.1))
    r.finish()
    r.done()
    assert r.images().shape[0] == 9 and sent.count("block_cascade.frames") == 1


def test_the_familys_decoder_rule_reaches_a_wan_decoder_on_either_input():
    """Krea's window (family krea-realtime) is set on a Wan decoder given as ``decoder`` or as ``preview_decoder``;
    a tiny decoder has no such rule and is left as it is; the core VAE's own decoder is the sampler's to set."""
    from cascade_core.video.vae import WanVAEDecoder
    from nodes import decoders

    wan = loaded(os.path.basename(WRITTEN["vae"]))
    for files in (decoders.Decoders(output=wan), decoders.Decoders(output=loaded(TAEW), preview=wan)):
        output, preview = decoders.for_run(files, None, torch.device("cpu"), "krea")
        built = [d for d in (output, preview) if isinstance(d, WanVAEDecoder)]
        assert len(built) == 1 and built[0].time_cache == "krea"
    core = WanVAEDecoder(dim=8)
    output, preview = decoders.for_run(decoders.Decoders(preview=wan), core, torch.device("cpu"), "krea")
    assert output is core and core.time_cache == "wan" and preview.time_cache == "krea"


# Wan2.2 decoders (the Wan2.2 VAE, taew2_2) through the loader, with a Wan2.2-TI2V-5B model (48 latent channels)
WAN22 = "bc_wan2.2_vae.safetensors"  # in models/vae: the Wan2.2 VAE's decoder under its original names
TAEW22 = "bc_taew2_2.safetensors"  # in models/vae_approx
W22, H22 = 64, 32  # latents 2 x 4 (16 pixels a latent pixel); one block of LongLive 2.0's 8 latent frames


@pytest.fixture(scope="module")
def wan22_files():
    """Tiny Wan2.2 decoder files of the real layouts in the two folders; removed at the module's end."""
    from cascade_core.video.taew import TinyWan22Decoder
    from cascade_core.video.vae22 import Wan22VAEDecoder
    from cascade_core.weights.safe_io import save_safetensors

    torch.manual_seed(1)
    paths = (os.path.join(MODELS, "vae", WAN22), os.path.join(MODELS, "vae_approx", TAEW22))
    save_safetensors(Wan22VAEDecoder(dim=8).state_dict(), paths[0])
    save_safetensors(TinyWan22Decoder(widths=(8, 8, 8, 8)).state_dict(), paths[1])
    yield paths
    for path in paths:
        os.remove(path)


@pytest.fixture(scope="module")
def model_5b():
    """A tiny Wan2.2-TI2V-5B-shaped DiT (48 channels in and out) loaded as LongLive 2.0 (family from its name)."""
    from cascade_core.model.dit import WanConfig, WanModel
    from cascade_core.weights.safe_io import save_safetensors

    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, in_dim=48, out_dim=48, text_dim=4096)
    path = os.path.join(MODELS, "diffusion_models", "longlive2_bc_decoders.safetensors")
    save_safetensors(WanModel.random(cfg, seed=0).state_dict(), path)
    try:
        (m,) = run("BlockCascadeModelLoader", model_name=os.path.basename(path), dtype="fp32", ema="auto")
    finally:
        os.remove(path)
    return m


def auto_config():
    """The family's own settings (LongLive 2.0's UniPC steps, window and sink)."""
    (settings,) = run("BlockCascadeConfig", parallel=1, attention="causal", window=-1, sink=-1, steps="auto",
                      shift=0.0, devices="auto", attention_backend="auto", flashblock=False)
    return settings


def sample_5b(engine_model, **inputs):
    settings = auto_config()
    prompt = [[torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(3)), {}]]
    with Recorder():
        latent, images = run("BlockCascadeSampler", model=engine_model, config=settings, width=W22, height=H22,
                             blocks=1, seed=4, positive=prompt, **inputs)
    return latent["samples"], images


def test_wan22_decoders_are_loaded_and_decode_a_wan22_models_output(wan22_files, model_5b, seen, one_thread):
    from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS

    wan22, taew22 = loaded(WAN22, "fp32"), loaded(TAEW22)
    assert (wan22.kind, taew22.kind) == ("Wan22VAEDecoder", "TinyWan22Decoder")
    assert wan22.latent_space is WAN22_LATENTS and taew22.latent_space is WAN22_LATENTS
    assert loaded(TAEW).latent_space is WAN21_LATENTS
    assert model_5b.family[0] == "longlive-2"
    _, images = sample_5b(model_5b, decoder=wan22, preview_decoder=taew22)
    assert [b for b, _ in seen["output"]] == [b for b, _ in seen["view"]] == [0]
    z = seen["latents"]
    out = load_decoder(wan22_files[0], torch.float32, "cpu", latent_space=None).stream(1)
    ref = torch.cat([out.decode(b) for b in z], 2)  # the Wan2.2 VAE's own decode (a latent frame a pass, as streams do)
    assert ref.shape == (1, 3, 1 + 4 * 7, H22, W22)
    assert torch.equal(images, ((ref[0].permute(1, 2, 3, 0) + 1) * 0.5).clamp(0, 1))
    view = load_decoder(wan22_files[1], torch.float32, "cpu", latent_space=None).stream(None)
    assert torch.equal(torch.cat([f for _, f in seen["view"]], 2), torch.cat([view.decode(b) for b in z], 2))


def test_a_decoder_of_the_other_latent_space_is_refused_in_one_line_naming_both(wan22_files, model_5b, model,
                                                                               no_engine):
    for engine_model, file, w, h, message in (
            (model_5b, loaded(TAEW), W22, H22, rf"^decoder: {TAEW} decodes Wan2.1 latents \(16 channels, 8x "
                                               r"smaller\) but the model makes Wan2.2 latents \(48 channels"),
            (model, loaded(WAN22), W, H, rf"^decoder: {WAN22} decodes Wan2.2 latents \(48 channels, 16x smaller\) "
                                         r"but the model makes Wan2.1 latents \(16 channels")):
        with pytest.raises(ValueError, match=message) as err:
            with Recorder():
                run("BlockCascadeSampler", model=engine_model, config=auto_config(), width=w, height=h, blocks=1,
                    seed=0, positive=cond(), decoder=file)
        assert len(str(err.value).splitlines()) == 1
