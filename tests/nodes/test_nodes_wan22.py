"""The nodes with a Wan2.2 model (LongLive 2.0's Wan2.2-TI2V-5B architecture, 48 latent channels, 16 pixels a latent
pixel), through the stand-in comfy modules on tiny random weights.

Proves: Load Causal Video Model and Causal Model from MODEL take the 48-channel DiT (a core MODEL of other channels is
refused); the sampler's LATENT is the engine's own run in the Wan2.2 VAE's raw latents (written out here with the
48 means and stds) and its IMAGE the Wan2.2 VAE's decode of them, from a core VAE of 48 latent channels (ComfyUI's
``latent_channels``); LongLive 2.0's start image is block 0's frame 0 (generate's ``image_latent``: the core VAE's
encoding, normalised here), not a frame before it; without a VAE the latent-RGB preview reads
``comfy.latent_formats.Wan22``'s table and makes frames of the video's size; a continuation takes Wan2.2 LATENTs;
a VAE or decoder of the other latent space, a held start image on several devices or in a block of one frame, are
refused in one line before the engine runs.
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from test_nodes import MODELS, NODES, Recorder, no_engine, run, stream_mod, tiny  # noqa: F401 (no_engine: fixture)
from test_vae22_encode import original_layout, tiny_wan22_vae

from cascade_core.common.latent_space import WAN22_LATENTS
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.video.vae22 import Wan22VAEDecoder
from cascade_core.weights.safe_io import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

# one head of 64: what the loader assumes for a dim-64 file without a config; umt5's 4096-wide conditioning
TINY_5B = WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, in_dim=48, out_dim=48, text_dim=4096)
NAME = "longlive2_tiny_5b.safetensors"  # the name says LongLive 2.0: family longlive-2 is assumed from it
W, H, BLOCKS, FRAMES = 64, 32, 2, 8  # latents 2 x 4; LongLive 2.0: 8 latent frames a block
AUTO = dict(parallel=1, attention="causal", window=-1, sink=-1, steps="auto", shift=0.0, devices="auto",
            attention_backend="auto", flashblock=False)
MEAN, STD = (torch.tensor(v).view(1, 48, 1, 1, 1) for v in (WAN22_LATENTS.mean, WAN22_LATENTS.std))


class Wan22CoreVAE:
    """A core VAE of the Wan2.2 VAE as far as the sampler uses it (ComfyUI's comfy.sd.VAE: ``latent_channels`` 48,
    ``get_sd`` with the original names, ``encode`` of [B, H, W, 3] in 0..1 to the raw mean [1, 48, B, H/16, W/16])."""

    latent_channels = 48

    def __init__(self):
        self.model = tiny_wan22_vae()
        self.seen = []

    def get_sd(self):
        return original_layout(self.model)

    def encode(self, pixels):
        self.seen.append(tuple(pixels.shape))
        x = pixels.movedim(-1, 1).unsqueeze(2) * 2 - 1  # [1, 3, 1, H, W] on the [-1, 1] scale
        with torch.no_grad():
            return self.model.encode(x).latent_dist.mode()


@pytest.fixture(scope="module")
def model():
    path = os.path.join(MODELS, "diffusion_models", NAME)
    save_safetensors(WanModel.random(TINY_5B, seed=0).state_dict(), path)
    try:
        (m,) = run("BlockCascadeModelLoader", model_name=NAME, dtype="fp32", ema="auto")
    finally:
        os.remove(path)
    return m


@pytest.fixture(scope="module")
def vae():
    return Wan22CoreVAE()


@pytest.fixture(scope="module")
def prompt():
    return [[torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(3)), {}]]


def settings(**kw):
    (s,) = run("BlockCascadeConfig", **{**AUTO, **kw})
    return s


def sampler(model, prompt, config, **kw):
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=model, config=config, width=W, height=H, blocks=BLOCKS,
                             seed=4, positive=prompt, **kw)
    return latent["samples"], images, rec


def engine(model, prompt, config, **kw) -> torch.Tensor:
    """The engine's own run of the sampler's settings, as Wan2.2 RAW latents (z * std + mean, written out here)."""
    cfg = config.config_for(model.family[0])[0]
    res = generate(model.model, PromptSchedule.single(prompt[0][0][0]), cfg, blocks=BLOCKS, width=W, height=H,
                   seed=4, **kw)
    return res.latents.float() * STD + MEAN


def test_the_loader_reads_the_5b_and_longlive2_from_its_name(model):
    assert model.cfg.in_dim == 48 and model.cfg.latent_space is WAN22_LATENTS
    assert model.family[0] == "longlive-2"


def test_text_to_video_gives_the_engines_raw_wan22_latents_and_the_vaes_frames(model, prompt, vae):
    config = settings()
    samples, images, rec = sampler(model, prompt, config, vae=vae)
    expected = engine(model, prompt, config)
    assert samples.shape == (1, 48, BLOCKS * FRAMES, H // 16, W // 16)
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=0)  # the table's float rounding only
    decoder = Wan22VAEDecoder.from_state_dict(vae.get_sd(), device="cpu")
    with torch.no_grad():
        frames = decoder.stream(None).decode((samples - MEAN) / STD)[0]  # [3, F, H, W] in [-1, 1]
    assert images.shape == (1 + 4 * (BLOCKS * FRAMES - 1), H, W, 3)
    torch.testing.assert_close(images, ((frames.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)
    (_, start), = rec.events("start")
    assert start["frames_total"] == images.shape[0] and start["settings"].startswith("longlive-2")


def test_a_start_image_is_block_0s_frame_0(model, prompt, vae):
    config = settings()
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(5))
    samples, images, rec = sampler(model, prompt, config, vae=vae, start_image=image)
    raw_image = vae.encode(image)  # [1, 48, 1, 2, 4]: the core VAE's encoding of the same pixels
    image_latent = (raw_image - MEAN) / STD
    assert samples.shape[2] == BLOCKS * FRAMES  # no frame before block 0: the image is block 0's frame 0
    torch.testing.assert_close(samples[:, :, :1], raw_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples, engine(model, prompt, config, image_latent=image_latent), atol=1e-5, rtol=0)
    assert not torch.allclose(samples[:, :, 1:], engine(model, prompt, config)[:, :, 1:], atol=1e-3)
    (_, start), = rec.events("start")
    assert "start image as block 0's frame 0" in start["settings"]
    assert start["frames_total"] == images.shape[0] == 1 + 4 * (BLOCKS * FRAMES - 1)


def test_a_wan22_latent_continues(model, prompt, vae):
    config = settings()
    given, _, _ = sampler(model, prompt, config)
    more, images, _ = sampler(model, prompt, config, prefix={"samples": given}, context_frames=4)
    assert torch.equal(more[:, :, :given.shape[2]], given) and more.shape[2] == 2 * given.shape[2]
    context = ((given - MEAN) / STD)[:, :, -4:]
    res = generate(model.model, PromptSchedule.single(prompt[0][0][0]), config.config_for("longlive-2")[0],
                   blocks=BLOCKS, width=W, height=H, seed=4, prefix=context)
    torch.testing.assert_close(more[:, :, given.shape[2]:], res.latents[:, :, 4:].float() * STD + MEAN, atol=1e-5,
                               rtol=0)


def test_the_preview_reads_comfys_wan22_table_and_fills_the_frame(model, prompt, monkeypatch):
    factors = torch.randn(48, 3, generator=torch.Generator().manual_seed(8)).mul(0.1).tolist()
    formats = types.ModuleType("comfy.latent_formats")

    class Wan22:
        latent_rgb_factors = factors
        latent_rgb_factors_bias = [0.1, -0.2, 0.05]

    class Wan21:
        latent_rgb_factors = [[0.0] * 3] * 16

    formats.Wan21, formats.Wan22 = Wan21, Wan22
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    preview = stream_mod.preview_decoder(WAN22_LATENTS)
    assert torch.equal(preview.factors, torch.tensor(factors)) and preview.bias.tolist() == pytest.approx(
        [0.1, -0.2, 0.05])
    # frames of the video's size straight from the preview (an endless run records them as they come)
    assert preview.rgb(torch.zeros(1, 48, 2, H // 16, W // 16), True).shape == (1, 3, 5, H, W)
    samples, images, _ = sampler(model, prompt, settings())  # no VAE, no decoder: the latent-RGB preview
    assert images.shape == (1 + 4 * (BLOCKS * FRAMES - 1), H, W, 3)
    z = (samples - MEAN) / STD
    rgb = torch.einsum("cthw,cr->trhw", z[0], torch.tensor(factors)) + torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    first = ((rgb[0].clamp(-1, 1) + 1) / 2).mean()  # the first frame's mean colour level, any upscaling
    assert abs(images[0].mean().item() - first.item()) < 0.05


def test_a_core_model_of_48_channels_is_taken_and_36_refused(model):
    class Patcher:
        def __init__(self, inner):
            self.model = type("WAN22", (), {})()
            self.model.diffusion_model = inner

    (m,) = run("BlockCascadeFromModel", model=Patcher(WanModel.random(TINY_5B, seed=1)))
    assert m.cfg.latent_space is WAN22_LATENTS
    i2v = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, in_dim=36, out_dim=16,
                                    text_dim=4096), seed=1)
    with pytest.raises(ValueError, match=r"not a Wan2.1 text-to-video DiT nor Wan2.2's TI2V-5B \(input channels 36, "
                                         r"output channels 16; image-to-video"):
        run("BlockCascadeFromModel", model=Patcher(i2v))


def test_refusals_name_both_spaces_in_one_line(model, prompt, no_engine):  # noqa: F811
    class Wan21CoreVAE:
        latent_channels = 16

        def get_sd(self):
            return tiny.vae_state_dict("tiny")

    vae = Wan22CoreVAE()  # a fresh one: it must encode nothing for a refused run

    def refused(message, **kw):
        with pytest.raises(ValueError) as err:
            sampler(model, prompt, kw.pop("config", settings()), **kw)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)

    refused("vae: this VAE (16 latent channels) decodes Wan2.1 latents (16 channels, 8x smaller) but the model "
            "makes Wan2.2 latents (48 channels, 16x smaller): give a Wan2.2 VAE or decoder", vae=Wan21CoreVAE())
    path = tiny_decoder()
    try:
        (taew,) = run("BlockCascadeDecoderLoader", decoder_name=os.path.basename(path), dtype="auto")
    finally:
        os.remove(path)
    refused("decoder: taew2_1_bc_test.pth decodes Wan2.1 latents (16 channels, 8x smaller) but the model makes Wan2.2 "
            "latents", vae=vae, decoder=taew)
    image = torch.rand(1, H, W, 3)
    refused("start_image: LongLive 2.0's start image (block 0's frame 0) runs on one device for now",
            vae=vae, start_image=image, config=settings(devices="cpu,cpu"))
    refused("start_image: an image latent is frame 0 of block 0, which holds 1 frame here", vae=vae,
            start_image=image, config=settings(frames_per_block=1, sink=1, window=4))
    assert vae.seen == []  # refused before the image was encoded


def tiny_decoder() -> str:
    """A taew2_1 file (a Wan2.1 tiny decoder) in ComfyUI's vae folder."""
    from cascade_core.video.taew import TinyWanDecoder

    with torch.device("meta"):
        names = TinyWanDecoder().state_dict()
    path = os.path.join(MODELS, "vae", "taew2_1_bc_test.pth")
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in names.items()}, path)
    return path


def test_the_family_must_fit_the_model_and_a_nameless_5b_is_longlive2(model, prompt):
    """A Wan2.1 family set on the 5B DiT is refused in one line naming both (the CLI's rule,
    sampling.families.check_family_model); a 5B DiT whose file name says no family samples as longlive-2."""
    with pytest.raises(ValueError) as err:
        sampler(model, prompt, settings(family="self-forcing"))
    message = str(err.value)
    assert "family self-forcing samples a Wan2.1 DiT (16 latent channels)" in message and "48 latent" in message
    assert "\n" not in message
    path = os.path.join(MODELS, "diffusion_models", "plain_tiny_5b.safetensors")
    save_safetensors(model.model.state_dict(), path)
    try:
        (nameless,) = run("BlockCascadeModelLoader", model_name=os.path.basename(path), dtype="fp32", ema="auto")
    finally:
        os.remove(path)
    assert nameless.family is None
    _, _, rec = sampler(nameless, prompt, settings())
    (start,) = [d for e, d in rec.events("start")]
    assert start["settings"].startswith("longlive-2"), start["settings"]
