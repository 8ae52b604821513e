"""Block Cascade Video-to-Video through the stand-in comfy modules on the tiny model and the tiny Wan2.1 VAE (CPU).

What this proves: an IMAGE batch in gives the latents of the engine run directly on the same frames (the oracle:
the frames rounded to uint8 and scaled by the test, encoded whole by diffusers' own AutoencoderKLWan, cut into
chunks and restyled by ``video_to_video``), its frames streamed to the widget chunk by chunk (start, state,
frames, done, JSON, to the queuing client); a core VIDEO gives the same; Cancel keeps the chunks already
final (latents and frames, an MP4 saved, the interrupt consumed, the next run works); the webcam path: frames
POSTed to the route while the node runs (the test pushes them) are restyled as the engine restyles the same
JPEGs decoded and resized, the start event says ``live_input: "webcam"``, the stream is recorded, Cancel keeps
what was made; steering reaches the run; and every bad input (no source, two, a bad or dead URL, wrong sizes,
too few frames, no prompt, no VAE, parallel above steps) is one line before any model or VAE work, as is the
sampler's refusal of the streamdiffusionv2 family.
"""
from __future__ import annotations

import io
import sys
import threading
import time
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_nodes import PKG, WRITTEN, Recorder, config, mm, run, stream_mod, tiny, values_mod
from test_vae_encode import diffusers_vae

from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import V2VConfig, video_chunks
from cascade_core.video.frame_source import fit_frames
from cascade_core.video.latents import normalized_to_raw
from cascade_core.video.live_sources import decode_image

pytestmark = pytest.mark.usefixtures("one_thread")
live_input = sys.modules[f"{PKG}.nodes.live_input"]
v2v_run = sys.modules[f"{PKG}.nodes.v2v_run"]
NODE = "BlockCascadeVideoToVideo"
W, H = 64, 32
VAE_SD = load_file(WRITTEN["vae"])


class CoreVAE:
    """A core VAE as far as the node uses it: the complete tiny Wan2.1 VAE's weights."""

    latent_channels = 16

    def get_sd(self):
        return VAE_SD


def frames_in(n, seed=0, h=H, w=W):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def restyle(model, prompt, **kw):
    """(IMAGE, raw latents, recorder) of one node run."""
    args = dict(model=model, vae=CoreVAE(), width=W, height=H, steps=2, noise_scale=0.7, parallel=1, seed=3,
                positive=prompt)
    args.update(kw)
    on_event = args.pop("on_event", None)
    with Recorder(on_event) as rec:
        images, latent = run(NODE, unique_id="21", **args)
    return images, latent["samples"], rec


def engine(model, prompt, uint8_frames, chunks, seed=3, **settings):
    """The oracle: uint8 frames [N, H, W, 3] scaled to [-1, 1] here, encoded whole by diffusers (the raw mean),
    cut into chunks and restyled by the engine; raw latents (core layout) of the first ``chunks`` chunks (None: an
    input of unknown length)."""
    pixels = (uint8_frames.float() / 127.5 - 1).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, N, H, W]
    with torch.no_grad():
        latents = diffusers_vae(VAE_SD).encode(pixels).latent_dist.mode()
    n = chunks or (pixels.shape[2] - 1) // 4
    out = video_to_video(model.model, PromptSchedule.single(prompt[0][0][0]), V2VConfig(**settings),
                         video_chunks(latents[:, :, :n + 1], pixels), seed=seed, chunks=chunks)
    return normalized_to_raw(out.latents.float())


def to_uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def tiny_model():
    (m,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto")
    return m


@pytest.fixture(scope="module")
def prompt():
    (p,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[0])
    return p


@pytest.fixture(autouse=True)
def every_state_and_no_cancel_left(monkeypatch):
    monkeypatch.setattr(stream_mod, "STATE_INTERVAL", 0.0)  # every tick's state event (Cancel at a given tick)
    mm.interrupt_current_processing(False)
    yield
    mm.interrupt_current_processing(False)


def test_the_node_is_registered_with_its_inputs_and_outputs():
    schema = sys.modules[f"{PKG}.nodes.v2v"].BlockCascadeVideoToVideo.GET_SCHEMA()
    assert schema.display_name == "Block Cascade Video-to-Video" and schema.category == "video/block cascade"
    assert [o.io_type for o in schema.outputs] == ["IMAGE", "LATENT"]
    ins = schema.input_types()
    assert set(ins["optional"]) == {"positive", "schedule", "clip", "image", "video"}
    assert ins["required"]["live"][0] == ["none", "webcam", "mjpeg"]
    assert ins["optional"]["video"][0] == "VIDEO" and ins["required"]["vae"][0] == "VAE"
    steps = ins["required"]["steps"][1]
    assert (steps["min"], steps["max"], steps["default"]) == (1, 4, 2)
    assert ins["required"]["noise_scale"][1]["default"] == 0.7


@pytest.mark.parametrize("settings", [dict(), dict(steps=3, parallel=3, noise_scale=0.8)])
def test_an_image_batch_gives_the_engines_latents_and_streams_every_chunk(tiny_model, prompt, settings):
    images = frames_in(14, seed=1)  # 3 chunks (1 + 4 * 3 = 13), the 14th frame dropped
    node = dict(steps=settings.get("steps", 2), parallel=settings.get("parallel", 1),
                noise_scale=settings.get("noise_scale", 0.7))
    out, raw, rec = restyle(tiny_model, prompt, image=images, **node)
    steps = (700, 500, 400, 200)[:node["steps"]]
    want = engine(tiny_model, prompt, to_uint8(images[:13]), 3, steps=steps, parallel=node["parallel"],
                  noise_scale=node["noise_scale"])
    assert raw.shape == (1, 16, 4, H // 8, W // 8)
    torch.testing.assert_close(raw, want, atol=1e-4, rtol=0)  # the streamed encode vs the whole one: rounding
    assert out.shape == (13, H, W, 3) and 0 <= float(out.min()) and float(out.max()) <= 1
    names = [e for e, _ in rec.events()]
    assert names[0] == "block_cascade.start" and names[-1] == "block_cascade.done"
    assert all(sid == "client-1" for _, _, sid in rec.server.sent)
    (_, start), = rec.events("start")
    assert start["blocks"] == 3 and start["frames_total"] == 13 and start["stages"] == node["steps"]
    assert start["clean_pass"] is False and start["parallel"] == node["parallel"] and "live_input" not in start
    assert start["settings"].startswith("streamdiffusionv2 video-to-video: steps " + ",".join(map(str, steps)))
    got = [d for _, d in rec.events("frames")]
    assert [d["block"] for d in got] == [0, 1, 2] and [d["first_frame"] for d in got] == [0, 5, 9]
    assert sum(len(d["frames"]) for d in got) == 13
    assert max(len(d["pairs"]) for _, d in rec.events("state")) == node["parallel"]
    (_, done), = rec.events("done")
    assert done["frames"] == 13 and done["blocks"] == 3 and "error" not in done and "stopped" not in done


def test_a_core_video_gives_what_its_frames_give(tiny_model, prompt):
    images = frames_in(9, seed=2)
    video = types.SimpleNamespace(get_components=lambda: types.SimpleNamespace(images=images,
                                                                               frame_rate=Fraction(16)))
    _, raw, _ = restyle(tiny_model, prompt, video=video)
    _, from_images, _ = restyle(tiny_model, prompt, image=images)
    assert torch.equal(raw, from_images)
    _, fewer, _ = restyle(tiny_model, prompt, image=images, max_chunks=1)  # max_chunks: the first chunk only
    torch.testing.assert_close(fewer, engine(tiny_model, prompt, to_uint8(images[:5]), 1), atol=1e-4, rtol=0)


def test_cancel_keeps_the_chunks_made_and_the_next_run_works(tiny_model, prompt):
    images = frames_in(13, seed=4)

    def on_event(event, data):
        if event == "block_cascade.state" and data["tick"] == 2:  # chunk 0 is final (ticks 0, 1), chunk 1 in flight
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    out, raw, rec = restyle(tiny_model, prompt, image=images, on_event=on_event)
    full_out, full, _ = restyle(tiny_model, prompt, image=images)
    assert raw.shape[2] == 2 and torch.equal(raw, full[:, :, :2])  # chunk 0's two latent frames
    assert out.shape[0] == 5 and torch.equal(out, full_out[:5])
    assert max(d["tick"] for _, d in rec.events("state")) == 2  # no tick after the one Cancel came in
    (_, done), = rec.events("done")
    assert done["stopped"] is True and done["blocks"] == 1 and done["video"]["filename"].endswith(".mp4")
    assert not mm.processing_interrupted()  # the interrupt is consumed: the nodes after it run
    assert full.shape[2] == 4  # the next run went through whole

    def at_once(event, data):
        if event == "block_cascade.state":
            mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):  # nothing final: nothing to hand on
        restyle(tiny_model, prompt, image=images, on_event=at_once)
    assert not mm.processing_interrupted()


def jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Webcam:
    """The widget's part, played by the test: once the start event names the run, the frames are POSTed to the
    webcam route (its submit: the handler's checks and push), 5 then 4 at a time, each batch once the run has
    taken the one before (so none is dropped and the oracle knows which frames each chunk holds)."""

    def __init__(self, batches: list[list[bytes]], cancel_after: int | None = None):
        self.batches, self.cancel_after, self.answers, self.thread = batches, cancel_after, [], None
        # a safety net: a run that never gets its frames waits for Cancel (as it should); the test then fails
        self.watchdog = threading.Timer(30, mm.interrupt_current_processing, (True,))
        self.watchdog.start()

    def on_event(self, event, data):
        if event == "block_cascade.start" and data.get("live_input") == "webcam":
            self.thread = threading.Thread(target=self.post, args=(data["node"], data["run"]), daemon=True)
            self.thread.start()
        if event == "block_cascade.frames" and self.cancel_after is not None and data["block"] == self.cancel_after:
            mm.interrupt_current_processing(True)

    def post(self, node, run):
        source = live_input._running[node].source
        for batch in self.batches:
            deadline = time.monotonic() + 30
            while len(source.buffer) and time.monotonic() < deadline:
                time.sleep(0.01)
            for data in batch:
                self.answers.append(live_input.submit(node, run, data))


def test_the_webcam_path_restyles_the_posted_frames_as_the_engine_does(tiny_model, prompt):
    rng = np.random.default_rng(5)
    shots = [rng.integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8) for _ in range(9)]  # posted at twice the size
    posted = [jpeg(s) for s in shots]
    seen = torch.from_numpy(fit_frames(np.stack([decode_image(p, "t") for p in posted]), W, H))  # what the run reads
    cam = Webcam([posted[:5], posted[5:]])
    try:
        out, raw, rec = restyle(tiny_model, prompt, live="webcam", max_chunks=2, on_event=cam.on_event)
    finally:
        cam.watchdog.cancel()
    assert [a[0] for a in cam.answers] == [200] * 9 and all(a[1]["dropped"] == 0 for a in cam.answers)
    torch.testing.assert_close(raw, engine(tiny_model, prompt, seen, 2), atol=1e-4, rtol=0)
    assert out.shape == (9, H, W, 3)
    (_, start), = rec.events("start")
    assert start["live_input"] == "webcam" and all(d["live_input"] == "webcam" for _, d in rec.events("frames"))
    (_, done), = rec.events("done")
    assert done["video"]["filename"].startswith("stream_") and done["frames"] == 9  # the stream's recording
    assert "21" not in live_input._running  # the route is the run's only while it runs


def test_a_webcam_run_goes_on_until_cancel_which_keeps_what_was_made(tiny_model, prompt):
    rng = np.random.default_rng(6)
    posted = [jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(9)]
    seen = torch.from_numpy(np.stack([decode_image(p, "t") for p in posted]))
    cam = Webcam([posted[:5], posted[5:]], cancel_after=1)  # Cancel once chunk 1's frames are shown
    try:
        out, raw, rec = restyle(tiny_model, prompt, live="webcam", on_event=cam.on_event)
    finally:
        cam.watchdog.cancel()
    torch.testing.assert_close(raw, engine(tiny_model, prompt, seen, None), atol=1e-4, rtol=0)  # unknown length
    assert out.shape == (9, H, W, 3)
    (_, start), = rec.events("start")
    assert start["blocks"] == 0 and start["frames_total"] == 0  # until Cancel
    (_, done), = rec.events("done")
    assert done["stopped"] is True and done["frames"] == 9 and done["video"]["filename"].endswith(".mp4")
    assert not mm.processing_interrupted()


def test_a_steered_prompt_reaches_the_run(tiny_model, prompt):
    steer = sys.modules[f"{PKG}.nodes.steer"]
    other = torch.randn(6, 4096, generator=torch.Generator().manual_seed(9))

    class Clip:
        def tokenize(self, text):
            return text

        def encode_from_tokens_scheduled(self, tokens):
            return [[other.unsqueeze(0), {}]]

    def on_event(event, data):
        if event == "block_cascade.start":
            assert steer.submit({"node": data["node"], "text": "snow"}) == (200, {"queued": True})

    _, raw, rec = restyle(tiny_model, prompt, image=frames_in(13, seed=7), clip=Clip(), on_event=on_event)
    (_, switch), = rec.events("switch")
    assert switch["block"] == 0 and switch["text"] == "snow"
    _, plain, _ = restyle(tiny_model, prompt, image=frames_in(13, seed=7))
    assert not torch.allclose(raw, plain)
    _, direct, _ = restyle(tiny_model, [[other.unsqueeze(0), {}]], image=frames_in(13, seed=7))
    torch.testing.assert_close(raw, direct, atol=1e-5, rtol=0)  # switched at chunk 0: the other prompt throughout


@pytest.fixture
def nothing_runs(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("model or VAE work began although the input is bad")

    monkeypatch.setattr(values_mod.FileModel, "acquire", forbidden)
    monkeypatch.setattr(values_mod.CoreModel, "acquire", forbidden)
    monkeypatch.setattr(v2v_run, "video_to_video", forbidden)
    import cascade_core.video.vae_encode as vae_encode

    monkeypatch.setattr(vae_encode, "encoder_from_state_dict", forbidden)


def cond(width=4096):
    return [[torch.randn(1, 6, width), {}]]


@pytest.mark.parametrize("kw, message", [
    (dict(), r"^no video input: connect image \(an IMAGE batch\) or video \(Load Video\), or set live to webcam or "
             r"mjpeg$"),
    (dict(image="IMG", live="webcam"), r"^one video input at a time: image and live webcam are given; keep one$"),
    (dict(image="IMG", video="VID"), r"^one video input at a time: image and video are given"),
    (dict(live="mjpeg", url="ftp://example.invalid/x"), r"^url: live mjpeg reads an http:// or https:// MJPEG"),
    (dict(live="mjpeg", url=""), r"^url: live mjpeg reads an http:// or https://"),
    (dict(live="mjpeg", url="http://127.0.0.1:9/none.mjpg"), r"^http://127\.0\.0\.1:9/none\.mjpg: could not open it"),
    (dict(image="IMG", width=70), r"^width must be a multiple of 16 in 16\.\.4096"),
    (dict(image="IMG", height=0), r"^height must be a multiple of 16"),
    (dict(image=torch.rand(4, H, W, 3)), r"^image: 4 frames; the first chunk takes 5"),
    (dict(image=torch.rand(5, H, W, 4)), r"^image: expected an IMAGE batch \[N, H, W, 3\]"),
    (dict(image="IMG", steps=2, parallel=3), r"^parallelism must lie in 1\.\.2"),
    (dict(image="IMG", steps=5), r"^StreamDiffusionV2 takes 1\.\.4 steps"),
    (dict(image="IMG", positive=None), r"^no prompt: connect positive"),
    (dict(image="IMG", positive=cond(768)), r"width 768"),
    (dict(image="IMG", vae=None), r"^vae: connect the Wan2\.1 VAE"),
    (dict(image="IMG", max_chunks=-1), r"^max_chunks must lie in 0\.\."),
])
def test_bad_inputs_are_one_line_before_any_model_work(tiny_model, nothing_runs, kw, message):
    given = {"IMG": frames_in(9), "VID": types.SimpleNamespace(get_components=lambda: None)}
    kw = {k: given.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    args = dict(model=tiny_model, vae=CoreVAE(), width=W, height=H, steps=2, noise_scale=0.7, parallel=1, seed=0,
                positive=cond())
    args.update(kw)
    with Recorder() as rec:
        with pytest.raises(ValueError, match=message) as e:
            run(NODE, **args)
    assert "\n" not in str(e.value) and rec.events() == []  # nothing sent: the widget never saw a run


def test_the_sampler_refuses_the_streamdiffusionv2_family_naming_the_node(tiny_model, nothing_runs):
    with pytest.raises(ValueError, match=r"^family streamdiffusionv2 restyles a video: use the Block Cascade "
                                         r"Video-to-Video node$"):
        run("BlockCascadeSampler", model=tiny_model, config=config(family="streamdiffusionv2", steps="auto",
                                                              parallel=0, attention="auto", shift=0.0),
            width=W, height=H, blocks=2, seed=0, positive=cond())
