"""Block Cascade Video-to-Video's live inputs when they misbehave, and its noise scale's range (stand-in comfy
modules, the tiny model and VAE, CPU).

What this proves: an MJPEG part that is no image is skipped, the run restyling every good frame as the engine
does and ending with the stream, no error; a live input that breaks off (the webcam's source ends with an error
after two chunks came in) ends the run as the input's end does, handing on the chunks made (IMAGE, LATENT, the
MP4) and logging the reason in one line, while one that breaks off before its first chunk fails with that line;
a noise scale below the settings' smallest (sampling.v2v_config.NOISE_SCALE_MIN) is refused in one line before
any model work, and the widget starts at that smallest rounded up to its step.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from test_nodes import PKG, Recorder, mm, run
from test_nodes_v2v import (  # noqa: F401 - fixtures (used by name)
    NODE,
    CoreVAE,
    H,
    W,
    cond,
    engine,
    every_state_and_no_cancel_left,
    jpeg,
    live_input,
    nothing_runs,
    prompt,
    restyle,
    tiny_model,
)

from cascade_core.sampling.v2v_config import NOISE_SCALE_MIN
from cascade_core.video.live_sources import decode_image

pytestmark = pytest.mark.usefixtures("one_thread")


def shots(n, seed):
    rng = np.random.default_rng(seed)
    return [jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


class Watchdog:
    """Cancel after ``seconds``: a run that never gets its frames waits for Cancel; the test then fails."""

    def __init__(self, seconds=60):
        self.timer = threading.Timer(seconds, mm.interrupt_current_processing, (True,))

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def test_an_mjpeg_part_that_is_no_image_is_skipped_and_the_run_ends_with_the_stream(tiny_model, prompt, caplog,
                                                                                    monkeypatch):
    # a source that holds every part: none is dropped however slowly this machine runs the model (the oracle knows
    # them all); dropping the oldest is the sources' own tests' subject
    opened, run_source = [], live_input.run_source

    def holding_every_part(*args):
        opened.append(args[2])
        return run_source(*args, capacity=64)

    monkeypatch.setattr(live_input, "run_source", holding_every_part)
    posted = shots(9, 7)
    parts = posted[:5] + [b"\xff\xd8garbage"] + posted[5:]
    started = threading.Event()

    class Stream(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=fr")
            self.end_headers()
            started.wait(30)  # the frames come once the run has started
            for data in parts:
                self.wfile.write(b"--fr\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                 + data + b"\r\n")
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"--fr--\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def on_event(event, data):
        if event == "block_cascade.start":
            started.set()

    try:
        with Watchdog(), caplog.at_level(logging.WARNING, logger="block_cascade"):
            out, raw, rec = restyle(tiny_model, prompt, live="mjpeg", url=f"http://127.0.0.1:"
                                    f"{server.server_address[1]}/", on_event=on_event)
    finally:
        server.shutdown()
        server.server_close()
    assert len(opened) == 1 and opened[0].startswith("http://127.0.0.1:")
    seen = torch.from_numpy(np.stack([decode_image(p, "t") for p in posted]))
    torch.testing.assert_close(raw, engine(tiny_model, prompt, seen, None), atol=1e-4, rtol=0)
    assert out.shape == (9, H, W, 3)
    (_, done), = rec.events("done")
    assert "error" not in done and "stopped" not in done and done["frames"] == 9
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and " at 0x" not in skipped[0] and "\n" not in skipped[0], skipped


def broken_webcam(batches, why, taken=True):
    """The widget's part: each batch posted once the run took the one before; then (once the last is taken, with
    ``taken``) the source ends with ``why`` (the input broke off)."""

    def on_event(event, data):
        if event == "block_cascade.start" and data.get("live_input") == "webcam":
            threading.Thread(target=post, args=(data["node"], data["run"]), daemon=True).start()

    def post(node, run_id):
        source = live_input._running[node].source
        for batch in batches:
            deadline = time.monotonic() + 30
            while len(source.buffer) and time.monotonic() < deadline:
                time.sleep(0.01)
            for data in batch:
                assert live_input.submit(node, run_id, data)[0] == 200
        deadline = time.monotonic() + 30
        while taken and len(source.buffer) and time.monotonic() < deadline:
            time.sleep(0.01)
        source.buffer.end(why)

    return on_event


def test_a_live_input_that_breaks_off_keeps_the_chunks_made(tiny_model, prompt, caplog):
    posted = shots(9, 8)
    why = "webcam: the camera went away"
    with Watchdog(), caplog.at_level(logging.WARNING, logger="block_cascade"):
        out, raw, rec = restyle(tiny_model, prompt, live="webcam",
                                on_event=broken_webcam([posted[:5], posted[5:]], why))
    seen = torch.from_numpy(np.stack([decode_image(p, "t") for p in posted]))
    torch.testing.assert_close(raw, engine(tiny_model, prompt, seen, None), atol=1e-4, rtol=0)
    assert out.shape == (9, H, W, 3)
    (_, done), = rec.events("done")
    assert "error" not in done and done["frames"] == 9 and done["video"]["filename"].endswith(".mp4")
    assert [r.getMessage() for r in caplog.records if why in r.getMessage()] == [
        f"Block Cascade: the input ended after 2 chunks: {why}"]
    assert not mm.processing_interrupted()


def test_a_live_input_that_breaks_off_before_its_first_chunk_fails_with_the_reason(tiny_model, prompt):
    why = "webcam: the camera went away"
    with Watchdog(), pytest.raises(RuntimeError, match=f"^{why}$"):
        restyle(tiny_model, prompt, live="webcam", on_event=broken_webcam([shots(3, 9)], why, taken=False))


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize("scale", [0.2, 0.1, 0.01])
def test_a_noise_scale_below_the_smallest_is_one_line_before_any_model_work(tiny_model, scale):
    with Recorder() as rec:
        with pytest.raises(ValueError) as e:
            run(NODE, model=tiny_model, vae=CoreVAE(), width=W, height=H, steps=2, noise_scale=scale, parallel=1,
                seed=0, positive=cond(), image=torch.rand(9, H, W, 3))
    text = str(e.value)
    assert "\n" not in text and "noise_scale" in text and f"{NOISE_SCALE_MIN:g}..1, got {scale}" in text, text
    assert rec.events() == []


def test_the_widget_starts_at_the_smallest_noise_scale_rounded_up_to_its_step():
    schema = sys.modules[f"{PKG}.nodes.v2v"].BlockCascadeVideoToVideo.GET_SCHEMA()
    spec = schema.input_types()["required"]["noise_scale"][1]
    assert spec["min"] == 0.21 and spec["step"] == 0.01 and spec["default"] == 0.7
    assert spec["min"] >= NOISE_SCALE_MIN and spec["min"] - spec["step"] < NOISE_SCALE_MIN
