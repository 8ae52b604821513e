"""The sampler node's context before block 0: a start image (image to video) and a prefix LATENT
(continue a video), through the stand-in comfy modules on the tiny model (CPU).

What this proves: a start image becomes the engine's prefix as the VAE's encoding of the image
scaled to cover the node's size and centre-cropped (the oracle resizes by itself: slicing and 2x2
averaging), and the outputs are that frame then the engine's own frames after it; a chain of two
samplers gives the whole first video, then exactly the engine's frames after its last K latent
frames; the IMAGE output and the streamed frames are one decode of the whole LATENT; every bad
combination is refused in one line before the VAE or the engine runs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_nodes import WRITTEN, Recorder, config, model, no_engine, prompts, queue_errors, run, values_mod  # noqa: F401

from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.video.frames import video_frames
from cascade_core.video.latents import normalized_to_raw, raw_to_normalized
from cascade_core.video.vae import WanVAEDecoder

W, H = 64, 32
VAE_SD = load_file(WRITTEN["vae"])


class EncodingVAE:
    """A core VAE as far as the sampler uses it: the tiny Wan2.1 VAE's weights (for decoding) and a
    deterministic stand-in encoder, pixels [B, H, W, 3] -> raw latents [1, 16, B, H/8, W/8]: 8x8
    averages, then a fixed 3 -> 16 channel map."""

    latent_channels = 16

    def __init__(self):
        self.map = torch.randn(16, 3, generator=torch.Generator().manual_seed(11))
        self.seen = []

    def get_sd(self):
        return VAE_SD

    def encode(self, pixels):
        self.seen.append(pixels.shape)
        x = F.avg_pool2d(pixels.movedim(-1, 1).float(), 8)  # [B, 3, h, w]
        return torch.einsum("bchw,kc->kbhw", x, self.map).unsqueeze(0)


class RefusingVAE(EncodingVAE):
    def encode(self, pixels):
        raise AssertionError("the VAE encoded although the input is bad")


@pytest.fixture(scope="module")
def prompt(prompts):
    return prompts[0]


def sampler(model, prompt, settings, blocks, seed, **kw):
    """(RAW latents, IMAGE, recorder) of one sampler node run."""
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=blocks,
                             seed=seed, positive=prompt, **kw)
    return latent["samples"], images, rec


def engine_after(model, prompt, cfg, blocks, seed, prefix):
    """The engine's own new frames (RAW) after a normalised prefix."""
    res = generate(model.model, PromptSchedule.single(prompt[0][0][0]), cfg, blocks=blocks, width=W, height=H,
                   seed=seed, prefix=prefix)
    assert res.prefix_frames == prefix.shape[2]
    return normalized_to_raw(res.latents[:, :, prefix.shape[2]:].float())


def images(seed, height, width, channels=3, batch=1):
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


START_IMAGES = {  # name: (image [B, H, W, C], the oracle's pixels [1, H, W, 3] of the node's size)
    "the output size": (lambda: images(1, H, W), lambda im: im[:1]),
    # 2H x 4W RGBA, two in the batch: the first, centre 2H x 2W, halved (bilinear at 2:1 = 2x2 averages)
    "wider and larger, RGBA, a batch": (
        lambda: images(2, 2 * H, 4 * W, 4, 2),
        lambda im: F.avg_pool2d(im[:1, :, W:3 * W, :3].movedim(-1, 1), 2).movedim(1, -1)),
}


@pytest.mark.parametrize("case", list(START_IMAGES))
def test_a_start_image_is_the_first_latent_frame_and_the_engine_follows_it(model, prompt, case):
    image, pixels = START_IMAGES[case]
    image = image()
    vae, settings = EncodingVAE(), config(parallel=2, attention="causal", independent_first_frame="on")
    latent, frames, rec = sampler(model, prompt, settings, 2, 7, start_image=image, vae=vae)
    first = EncodingVAE().encode(pixels(image))  # [1, 16, 1, h, w] raw
    assert vae.seen == [(1, H, W, 3)]
    # block 0's independent first frame is the image: both blocks have 3 frames
    cfg = dataclasses.replace(settings.cascade, independent_first_frame=False)
    new = engine_after(model, prompt, cfg, 2, 7, raw_to_normalized(first))
    assert latent.shape == (1, 16, 1 + 6, H // 8, W // 8)
    assert torch.allclose(latent[:, :, :1], first, atol=1e-6, rtol=0)
    assert torch.allclose(latent[:, :, 1:], new, atol=1e-4, rtol=0)
    (_, start), = rec.events("start")
    assert "context: start image" in start["settings"]
    assert "note: the start image is the independent first frame" in start["settings"]
    assert frames.shape[0] == start["frames_total"] == video_frames(7)


def test_chained_samplers_give_the_whole_video_then_the_engines_frames_after_its_end(model, prompt):
    """Two samplers chained through prefix: the second output starts with the whole first one and its
    new frames are the engine's after the first video's last K latent frames (K asked, else the
    window), under the continuation's rules (block 0's own steps and first frame are in the past)."""
    settings = config(parallel=2, attention="causal", window=6, sink=3, independent_first_frame="on",
                      first_block_steps="1000,500")
    first, _, _ = sampler(model, prompt, settings, 3, 5)
    assert first.shape[2] == 1 + 3 + 3
    cfg = dataclasses.replace(settings.cascade, independent_first_frame=False, first_block_steps=None)
    for asked, k in ((4, 4), (0, 6), (9, 7)):
        second, _, rec = sampler(model, prompt, settings, 2, 6, prefix={"samples": first}, context_frames=asked)
        assert torch.equal(second[:, :, :7], first)
        new = engine_after(model, prompt, cfg, 2, 6, raw_to_normalized(first[:, :, 7 - k:]))
        assert second.shape[2] == 7 + 6 and torch.equal(second[:, :, 7:], new), asked
        (_, start), = rec.events("start")
        assert f"context: the last {k} of the prefix's 7 latent frames" in start["settings"]
        assert "note: block 0's own step list is not used" in start["settings"]
        cut = "note: 9 context frames asked for, the video has 7 latent frames: all 7 are the context"
        assert (cut in start["settings"]) == (asked == 9)
    third, _, _ = sampler(model, prompt, settings, 1, 8, prefix={"samples": second})
    assert torch.equal(third[:, :, :13], second) and third.shape[2] == 16


@pytest.mark.parametrize("kind", ["start image", "continuation"])
def test_the_image_output_and_the_stream_are_one_decode_of_the_whole_latent(model, prompt, kind):
    settings = config(parallel=2, attention="causal")
    vae = EncodingVAE()
    if kind == "start image":
        extra, lead = dict(start_image=images(3, H, W)), 1
    else:
        earlier, _, _ = sampler(model, prompt, settings, 2, 1)
        extra, lead = dict(prefix={"samples": earlier}, context_frames=3), 6
    latent, frames, rec = sampler(model, prompt, settings, 2, 4, vae=vae, **extra)
    stream = WanVAEDecoder.from_state_dict(VAE_SD, dtype=torch.float32, device="cpu").stream()
    ref = stream.decode(raw_to_normalized(latent))
    ref = ((ref[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    assert frames.shape == ref.shape == (video_frames(lead + 6), H, W, 3)
    assert torch.allclose(frames, ref, atol=1e-4)
    sent = [d for _, d in rec.events("frames")]
    assert [(d["block"], d["first_frame"], len(d["frames"])) for d in sent] == [
        (-1, 0, video_frames(lead)), (0, video_frames(lead), 12), (1, video_frames(lead) + 12, 12)]
    (_, start), = rec.events("start")
    (_, done), = rec.events("done")
    assert start["frames_total"] == done["frames"] == frames.shape[0] and start["blocks"] == done["blocks"] == 2


def _latent(frames=4, batch=1, h=H // 8, w=W // 8, channels=16):
    return {"samples": torch.randn(batch, channels, frames, h, w)}


def _bad_latent(frame=-1, value=float("nan")):
    bad = _latent()
    bad["samples"][0, 0, frame, 0, 0] = value
    return bad


def _image_with(value):
    bad = images(0, H, W)
    bad[0, H // 2, W // 2, 1] = value
    return bad


EMA = values_mod.Settings(cascade=CascadeConfig(window=9, sink=3, sink_ema=0.5))
REFUSED = {  # name: (sampler inputs, message)
    "both": (dict(start_image=images(0, H, W), prefix=_latent(), vae="VAE"),
             r"either start_image .* or prefix .*, not both"),
    "image without a vae": (dict(start_image=images(0, H, W)), r"start_image needs the vae input"),
    "image of 3 dims": (dict(start_image=torch.rand(H, W, 3), vae="VAE"),
                        r"start_image: expected an IMAGE \[B, H, W, 3\]"),
    "image of 1 channel": (dict(start_image=torch.rand(1, H, W, 1), vae="VAE"),
                           r"expected an IMAGE .*got \[1, 32, 64, 1\]"),
    "image, EMA sink": (dict(start_image=images(0, H, W), vae="VAE", config=EMA),
                        r"^start_image: a context prefix is not defined with an EMA sink"),
    "prefix of another size": (dict(prefix=_latent(w=W // 16)), r"prefix: its frames are 32 x 32, the node's width x "
                                                                r"height 64 x 32"),
    "prefix of two videos": (dict(prefix=_latent(batch=2)), r"prefix: the LATENT holds 2 videos"),
    "prefix of 4 channels": (dict(prefix=_latent(channels=4)), r"prefix: expected a video LATENT \[1, 16, T"),
    "prefix not a LATENT": (dict(prefix=torch.zeros(1, 16, 2, 4, 8)), r"prefix: expected a video LATENT.*got Tensor"),
    "prefix without frames": (dict(prefix=_latent(frames=0)), r"with T >= 1"),
    "prefix with NaN": (dict(prefix=_bad_latent()), r"^prefix: the prefix holds NaN"),
    # the context is the last 2 latent frames; the outputs hold all 4
    "prefix with NaN before the context": (dict(prefix=_bad_latent(0), context_frames=2),
                                           r"^prefix: the prefix holds NaN or infinite"),
    "prefix with inf before the context": (dict(prefix=_bad_latent(1, float("inf")), context_frames=2),
                                           r"^prefix: the prefix holds NaN or infinite"),
    "prefix of complex values": (dict(prefix={"samples": _latent()["samples"].to(torch.complex64)}),
                                 r"^prefix: expected a LATENT of real floating-point values.*complex64"),
    "prefix of integers": (dict(prefix={"samples": _latent()["samples"].to(torch.int32)}),
                           r"^prefix: expected a LATENT of real floating-point values.*int32"),
    "context frames without a prefix": (dict(context_frames=3), r"^context_frames \(3\) needs the prefix input"),
    "context frames with a start image": (dict(start_image=images(0, H, W), vae="VAE", context_frames=3),
                                          r"^context_frames \(3\) needs the prefix input"),
    "image with NaN": (dict(start_image=_image_with(float("nan")), vae="VAE"),
                       r"^start_image: the image holds NaN or infinite"),
    "image with inf": (dict(start_image=_image_with(float("-inf")), vae="VAE"),
                       r"^start_image: the image holds NaN or infinite"),
    "image of integers": (dict(start_image=(images(0, H, W) * 255).to(torch.uint8), vae="VAE"),
                          r"^start_image: expected an IMAGE of floats on the 0..1 scale.*uint8"),
    # 64 x 32 from 1 x 1000: the centre 1 x 0.5 pixels; 2 x 1000 too (rounding may keep none)
    "image too thin": (dict(start_image=torch.rand(1, 1000, 1, 3), vae="VAE"),
                       r"^start_image: its centre crop .*\(64 x 32\) keeps 1 x 0.5 of its 1 x 1000 pixels"),
    "image too thin, 2 wide": (dict(start_image=torch.rand(1, 1000, 2, 3), vae="VAE"),
                               r"^start_image: its centre crop .* keeps 2 x 1 of its 2 x 1000"),
    "image too flat": (dict(start_image=torch.rand(1, 1, 1000, 3), vae="VAE"), r"keeps 2 x 1 of its 1000 x 1"),
    "prefix, EMA sink": (dict(prefix=_latent(), config=EMA), r"^prefix: a context prefix is not defined with an EMA"),
    "negative context": (dict(prefix=_latent(), context_frames=-1), r"context frames must be >= 0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_context_inputs_are_refused_before_the_vae_and_the_engine(model, prompt, no_engine, case):
    kw, message = REFUSED[case]
    kw = {**kw, "vae": RefusingVAE()} if kw.get("vae") == "VAE" else kw
    kw.setdefault("config", config(parallel=1, attention="causal"))
    with pytest.raises(ValueError, match=message):
        run("BlockCascadeSampler", model=model, width=W, height=H, blocks=2, seed=0, positive=prompt, **kw)


def test_context_frames_is_checked_at_queue_time():
    base = dict(model=["1", 0], config=["2", 0], width=832, height=480, blocks=7, seed=0, prefix=["3", 0])
    assert queue_errors("BlockCascadeSampler", **base, context_frames=9) == []
    errors = queue_errors("BlockCascadeSampler", **base, context_frames=-1)
    assert [e[0] for e in errors] == ["context_frames"]


def test_the_memory_estimate_counts_the_context_frames(model, prompt, monkeypatch):
    """The frames of the context are in the estimate the node's memory check compares."""
    from cascade_core.session import run_session

    seen = []
    estimate = run_session.estimate_run_bytes
    monkeypatch.setattr(run_session, "estimate_run_bytes",
                        lambda plan, *a, **k: seen.append(plan.grid.offset) or estimate(plan, *a, **k))
    sampler(model, prompt, config(), 1, 5, prefix=_latent(frames=4), context_frames=3)
    sampler(model, prompt, config(), 1, 5, start_image=images(1, H, W), vae=EncodingVAE())
    sampler(model, prompt, config(), 1, 5)
    assert seen == [3, 1, 0]


def test_a_prefix_past_the_models_dtype_is_refused_before_the_engine(prompt, no_engine):
    """Finite given latents that the model's fp16 cannot hold: refused naming prefix, before the model
    is acquired (no_engine fails the test otherwise)."""
    from test_nodes import tiny

    (half,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp16", ema="auto")
    big = {"samples": torch.full((1, 16, 3, H // 8, W // 8), 1e6)}
    with pytest.raises(ValueError, match=r"^prefix: the prefix's values .* overflow the run's float16"):
        run("BlockCascadeSampler", model=half, config=config(), width=W, height=H, blocks=1, seed=0,
            positive=prompt, prefix=big)
