"""The sources of a video-to-video run's pixel frames (cascade_core/video/frame_source.py, live_sources.py and
sources.py), on CPU, nothing downloaded.

What this proves: a video file written here with PyAV (lossless PNG frames) is read back frame for frame, 5 then
4 at a time, the frames left over at the end dropped; an IMAGE batch gives its frames rounded to uint8 and a
core VIDEO (duck-typed get_components()) the same with its frame rate; an MJPEG stream served by a local
http.server gives each JPEG part as Pillow decodes it (parts with and without Content-Length); the live buffer
keeps the newest frames, drops the oldest, and holds the same bytes after 10,000 pushed frames as after 100
(its own count and tracemalloc); a consumer slower than the input never gets a frame older than the buffer's
capacity; resizing is the antialiased bilinear filter written out in the test (the aspect ratio not kept);
every bad input (missing or undecodable file, wrong IMAGE shapes, non-MJPEG URL, a stream that breaks off) is one
line, with no object's address in it; an MJPEG part that is no image is skipped and counted, and 30 of them in a
row end the stream as its end does (one line logged); 16-bit grey PNG frames are scaled to 8 bits as the CLI's
image loader scales them; a frame pushed after the end is not taken, and the push says so.
"""
from __future__ import annotations

import io
import threading
import time
import tracemalloc
import types
import wave
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cascade_core.video import live_sources
from cascade_core.video import multipart as multipart_mod
from cascade_core.video.frame_source import InputBrokeOff, fit_frames, to_pixels
from cascade_core.video.live_sources import MjpegSource, NewestFrames, PushedSource, decode_image
from cascade_core.video.sources import FileSource, ImageBatchSource, count_frames, open_source, video_source

H, W = 32, 48


def random_frames(n, h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_video(path, frames, fps=16):
    """Frames uint8 [n, h, w, 3] -> a .mov of lossless PNG frames (PyAV)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for p in parts:
        assert p in text, text


# --- files -------------------------------------------------------------------------------------------------


def test_a_video_file_is_read_frame_for_frame_five_then_four_at_a_time(tmp_path):
    frames = random_frames(11)
    write_video(tmp_path / "in.mov", frames)
    src = open_source(str(tmp_path / "in.mov"), W, H)
    assert isinstance(src, FileSource) and not src.live and src.fps == 16.0 and src.frames == 11
    first = src.take(5)
    assert first.dtype == torch.uint8 and first.shape == (5, H, W, 3)
    assert np.array_equal(first.numpy(), frames[:5])
    assert np.array_equal(src.take(4).numpy(), frames[5:9])
    assert src.take(4) is None  # 2 frames left: not a chunk
    assert src.take(1) is None
    src.close()


def test_a_video_file_is_resized_to_the_runs_size(tmp_path):
    frames = random_frames(5, 64, 96, seed=1)
    write_video(tmp_path / "big.mov", frames)
    got = FileSource(tmp_path / "big.mov", 48, 32).take(5)
    assert got.shape == (5, 32, 48, 3)
    assert np.array_equal(got.numpy(), fit_frames(frames, 48, 32))


def test_count_frames_decodes_the_whole_file_and_refuses_as_the_source_does(tmp_path):
    write_video(tmp_path / "in.mov", random_frames(7))
    assert count_frames(tmp_path / "in.mov") == 7 and count_frames(str(tmp_path / "in.mov")) == 7
    with pytest.raises(ValueError) as e:
        count_frames(tmp_path / "nope.mp4")
    one_line(e, "nope.mp4", "no such file")
    (tmp_path / "bad.mp4").write_bytes(b"this is no video" * 100)
    with pytest.raises(ValueError) as e:
        count_frames(tmp_path / "bad.mp4")
    one_line(e, "bad.mp4", "not a readable video")


def test_a_missing_or_undecodable_file_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        FileSource(tmp_path / "nope.mp4", W, H)
    one_line(e, "nope.mp4", "no such file")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is no video" * 100)
    with pytest.raises(ValueError) as e:
        open_source(str(bad), W, H)
    one_line(e, "bad.mp4", "not a readable video")
    sound = tmp_path / "sound.wav"  # a readable file without video
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    with pytest.raises(ValueError) as e:
        FileSource(sound, W, H)
    one_line(e, "sound.wav", "holds no video stream")
    with pytest.raises(ValueError) as e:
        FileSource(tmp_path / "x.mov", 0, H)
    one_line(e, "whole numbers >= 1")


# --- IMAGE and VIDEO ---------------------------------------------------------------------------------------


def test_an_image_batch_gives_its_frames_rounded_to_uint8():
    images = torch.rand(7, H, W, 3, generator=torch.Generator().manual_seed(2))
    images[0, 0, 0] = torch.tensor([0.0, 1.0, 0.7])  # the ends of the scale and 178.5 (a tie: either neighbour)
    images[1, 0, 0] = torch.tensor([-0.5, 1.5, 0.1])  # out of 0..1: clamped
    src = open_source(images, W, H)
    assert isinstance(src, ImageBatchSource) and src.frames == 7 and not src.live
    got = src.take(5).numpy()
    scaled = images.double().clamp(0, 1).numpy()[:5] * 255
    assert got.dtype == np.uint8 and np.abs(got - scaled).max() <= 0.5 + 1e-4  # the nearest level
    assert got[0, 0, 0, :2].tolist() == [0, 255] and got[1, 0, 0].tolist() == [0, 255, 26]
    assert src.take(4) is None  # 2 left


@pytest.mark.parametrize("bad", [torch.rand(H, W, 3), torch.rand(2, H, W, 4), torch.rand(2, 3, H, W),
                                 torch.zeros(2, H, W, 3, dtype=torch.uint8), torch.rand(0, H, W, 3), [[0.5]]])
def test_an_image_batch_of_the_wrong_shape_is_one_line(bad):
    with pytest.raises(ValueError) as e:
        ImageBatchSource(bad, W, H)
    one_line(e, "IMAGE", "[N, H, W, 3]")


def test_a_core_video_gives_its_images_and_frame_rate():
    images = torch.rand(9, H, W, 3, generator=torch.Generator().manual_seed(3))

    class Video:  # comfy_api.input.VideoInput as far as the source uses it
        def get_components(self):
            return types.SimpleNamespace(images=images, frame_rate=Fraction(30000, 1001), audio=None)

    src = open_source(Video(), W, H)
    assert src.fps == pytest.approx(29.97, abs=1e-3) and src.frames == 9
    assert np.array_equal(src.take(5).numpy(), ImageBatchSource(images, W, H).take(5).numpy())
    with pytest.raises(ValueError) as e:
        video_source(object(), W, H)
    one_line(e, "expected a core VIDEO")

    class Broken:
        def get_components(self):
            return types.SimpleNamespace(images=torch.rand(2, H, W), frame_rate=Fraction(16))

    with pytest.raises(ValueError) as e:
        open_source(Broken(), W, H)
    one_line(e, "VIDEO's images", "[N, H, W, 3]")
    with pytest.raises(ValueError) as e:
        open_source(3.5, W, H)
    one_line(e, "video input", "got float")


# --- resizing ----------------------------------------------------------------------------------------------


def halve_oracle(x: np.ndarray, axis: int) -> np.ndarray:
    """Antialiased bilinear downscaling by 2 along ``axis``, written out: the triangle filter stretched by the
    scale (half-width 2 input pixels) at output centre 2i + 1 gives taps 2i-1, 2i, 2i+1, 2i+2 weights
    1/8, 3/8, 3/8, 1/8; taps outside the image are left out and the rest renormalised."""
    x = np.moveaxis(x.astype(np.float64), axis, 0)
    n = x.shape[0]
    out = []
    for i in range(n // 2):
        taps = [(2 * i - 1, 1), (2 * i, 3), (2 * i + 1, 3), (2 * i + 2, 1)]
        taps = [(t, w) for t, w in taps if 0 <= t < n]
        out.append(sum(w * x[t] for t, w in taps) / sum(w for _, w in taps))
    return np.moveaxis(np.stack(out), 0, axis)


def test_resizing_is_the_antialiased_bilinear_filter_and_keeps_no_aspect_ratio():
    frames = random_frames(2, 40, 64, seed=4)
    expect = np.floor(halve_oracle(halve_oracle(frames, 1), 2) + 0.5)
    got = fit_frames(frames, 32, 20)
    assert got.shape == (2, 20, 32, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.float64) - expect)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 arithmetic vs float64: ties may round apart
    same = fit_frames(torch.from_numpy(frames), 64, 40)
    assert np.array_equal(same, frames) and not np.shares_memory(same, frames)  # a copy: a pushed array may be reused
    # stretched, not cropped: the left half black and the right half white stay so at another aspect ratio
    split = np.zeros((1, 40, 64, 3), np.uint8)
    split[:, :, 32:] = 255
    wide = fit_frames(split, 128, 16)
    assert wide.shape == (1, 16, 128, 3) and (wide[:, :, :60] == 0).all() and (wide[:, :, 68:] == 255).all()


def test_to_pixels_is_the_encoders_scale():
    frames = torch.from_numpy(random_frames(5, seed=5))
    px = to_pixels(frames)
    assert px.shape == (1, 3, 5, H, W)
    assert torch.equal(px[0, :, 2], frames[2].permute(2, 0, 1).float() / 127.5 - 1)
    # in bf16 as StreamDiffusionV2 orders it: scaled in float32, then cast (scaling in bf16 rounds twice)
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    got = to_pixels(every, torch.bfloat16)
    want = (every.float() / 127.5 - 1).to(torch.bfloat16).permute(3, 0, 1, 2).unsqueeze(0)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# --- the live buffer ---------------------------------------------------------------------------------------


def numbered(i, h=16, w=16):
    f = np.zeros((h, w, 3), np.uint8)
    f[0, 0, :2] = divmod(i, 256)
    return f


def number(f):
    return int(f[0, 0, 0]) * 256 + int(f[0, 0, 1])


def test_the_drop_policy_keeps_the_newest_frames_and_memory_stays_flat_over_10000_frames():
    src = PushedSource(16, 16, capacity=8)
    one = numbered(0).nbytes
    tracemalloc.start()
    try:
        held, traced = [], []
        for i in range(10_000):
            src.push(numbered(i))
            if i % 100 == 99:
                held.append((len(src.buffer), src.buffer.held_bytes()))
                traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert set(held) == {(8, 8 * one)}  # full from the first sample on, never more
    assert max(traced) - traced[0] < 16 * 1024, (traced[0], max(traced))  # flat: no queue grows
    assert (src.buffer.pushed, src.buffer.dropped) == (10_000, 10_000 - 8)
    got = src.take(5)
    assert [number(f) for f in got.numpy()] == list(range(9992, 9997))
    assert [number(f) for f in src.take(3).numpy()] == [9997, 9998, 9999]


def test_a_slow_consumer_gets_frames_in_order_never_older_than_the_capacity():
    cap, total = 8, 600
    src = PushedSource(16, 16, capacity=cap)

    def produce():
        for i in range(total):
            src.push(numbered(i))
            if i % 20 == 0:
                time.sleep(0.001)
        src.close()

    thread = threading.Thread(target=produce)
    thread.start()
    seen, n = [], 5
    while True:
        before = src.buffer.pushed
        chunk = src.take(n, timeout=10)
        if chunk is None:
            break
        ids = [number(f) for f in chunk.numpy()]
        assert ids == list(range(ids[0], ids[0] + n))  # consecutive within a chunk
        assert ids[0] >= before - cap  # the latency bound, in frames
        seen += ids
        n = 4
        time.sleep(0.002)  # slower than the producer
    thread.join()
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] >= total - cap - 1


def test_take_waits_with_a_timeout_asks_should_stop_and_ends_at_close():
    buf = NewestFrames(4, "webcam")
    buf.push(numbered(1))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        buf.take(2, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    one_line(e, "webcam", "1 of 2 frames")
    assert buf.take(2, timeout=5, should_stop=lambda: True) is None
    with pytest.raises(ValueError) as e:
        buf.take(5)
    one_line(e, "5 frames asked of a buffer that holds 4")
    threading.Timer(0.1, buf.end).start()
    assert buf.take(2) is None  # woken by the end; the one frame left is dropped
    buf.push(numbered(2))
    assert len(buf) == 0  # nothing is taken after the end
    with pytest.raises(ValueError):
        NewestFrames(0)


def test_pushed_images_are_decoded_resized_and_refused_in_one_line():
    src = open_source("webcam", W, H)
    assert isinstance(src, PushedSource) and src.live
    big = random_frames(1, 64, 96, seed=6)[0]
    png = io.BytesIO()
    Image.fromarray(big).save(png, format="PNG")
    src.push_image(png.getvalue())
    assert np.array_equal(src.take(1).numpy(), fit_frames(big[None], W, H))
    for data, text in ((b"", "not a readable JPEG or PNG"), (b"GIF89a" + b"\0" * 50, "not a readable"),
                       (png.getvalue()[:100], "not a readable")):
        with pytest.raises(ValueError) as e:
            src.push_image(data)
        one_line(e, "webcam", text)
    gif = io.BytesIO()
    Image.fromarray(big).save(gif, format="GIF")
    with pytest.raises(ValueError) as e:
        src.push_image(gif.getvalue())
    one_line(e, "must be a JPEG or PNG image, got GIF")
    huge = io.BytesIO()
    Image.new("L", (4000, 2200)).save(huge, format="PNG")
    with pytest.raises(ValueError) as e:
        src.push_image(huge.getvalue())
    one_line(e, "4000x2200", "over the")
    with pytest.raises(ValueError) as e:
        src.push(np.zeros((4, 4), np.uint8))
    one_line(e, "uint8 [h, w, 3]")


# --- MJPEG -------------------------------------------------------------------------------------------------


def jpeg(frame, comment=b"") -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=90, comment=comment)
    return out.getvalue()


class Served:
    """A local http.server thread: ``routes`` maps a path to (status, content type, body bytes)."""

    def __init__(self, routes):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                status, ctype, body = routes.get(self.path, (404, "text/plain", b"no"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def multipart(parts, boundary="frame", lengths=True):
    body = b"preamble\r\n"
    for i, data in enumerate(parts):
        head = b"Content-Type: image/jpeg\r\n"
        if lengths and i % 2 == 0:  # every other part without Content-Length: read up to the boundary
            head += f"Content-Length: {len(data)}\r\n".encode()
        body += b"--" + boundary.encode() + b"\r\n" + head + b"\r\n" + data + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n"


def test_an_mjpeg_stream_gives_each_jpeg_part_as_pillow_decodes_it():
    frames = random_frames(10, seed=7)
    # a JPEG whose bytes hold CRLF and "--frame"-like runs is read whole with or without a length
    parts = [jpeg(f, comment=b"\r\n--frame2\r\n\r\n--\n") for f in frames]
    assert all(b"\r\n--frame2\r\n" in p for p in parts)
    routes = {"/a.mjpg": (200, "multipart/x-mixed-replace; boundary=frame", multipart(parts)),
              "/b.mjpg": (200, 'multipart/x-mixed-replace;boundary="--frame"', multipart(parts, "--frame", False))}
    with Served(routes) as srv:
        for path in routes:
            src = open_source(srv.url(path), W, H, capacity=16)
            assert isinstance(src, MjpegSource) and src.live
            got = src.take(10, timeout=10)
            expect = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in parts])
            assert np.array_equal(got.numpy(), expect), path
            assert src.take(1, timeout=10) is None  # the stream ended
            src.close()


def test_an_mjpeg_url_that_is_no_stream_or_breaks_off_is_one_line(monkeypatch):
    good = jpeg(random_frames(1, seed=8)[0])
    monkeypatch.setattr(multipart_mod, "MAX_PART", len(good) + 10)
    routes = {"/page": (200, "text/html", b"<html></html>"),
              "/broken": (200, "multipart/x-mixed-replace; boundary=frame", multipart([good, b"x" * (len(good) + 20),
                                                                                       good]))}
    with Served(routes) as srv:
        with pytest.raises(ValueError) as e:
            open_source(srv.url("/page"), W, H)
        one_line(e, "/page", "not an MJPEG stream", "text/html")
        with pytest.raises(ValueError) as e:
            open_source(srv.url("/missing"), W, H)
        one_line(e, "/missing", "could not open it", "404")
        src = MjpegSource(srv.url("/broken"), W, H)
        assert src.take(1, timeout=10) is not None
        with pytest.raises(InputBrokeOff) as e:
            src.take(1, timeout=10)
        one_line(e, "MJPEG stream", "/broken", f"over {len(good) + 10}")
        port = srv.server.server_address[1]
    with pytest.raises(ValueError) as e:
        open_source(f"http://127.0.0.1:{port}/gone", W, H)  # the server is down
    one_line(e, "could not open it")
    with pytest.raises(ValueError) as e:
        MjpegSource("ftp://example.invalid/x", W, H)
    one_line(e, "starts with http://")


def test_mjpeg_parts_that_are_no_image_are_skipped_and_30_in_a_row_end_the_stream(caplog):
    """One bad part (not an image, a GIF) costs that part, not the run: the frames around it are taken in order
    and it is counted; MAX_BAD_PARTS in a row end the stream as a closed one does (take: None, no error), with one
    line logged; the frames after them are not read."""
    frames = random_frames(14, seed=10)
    good = [jpeg(f) for f in frames]
    gif = io.BytesIO()
    Image.fromarray(frames[0]).save(gif, format="GIF")
    bad = [b"\xff\xd8garbage", gif.getvalue(), b"not an image at all"]
    assert live_sources.MAX_BAD_PARTS == 30
    parts = (good[:5] + [bad[0]] + good[5:7] + [bad[i % 3] for i in range(29)] + good[7:9]
             + [bad[i % 3] for i in range(30)] + good[9:])
    routes = {"/bad.mjpg": (200, "multipart/x-mixed-replace; boundary=frame", multipart(parts))}
    with caplog.at_level("WARNING", logger="block_cascade"), Served(routes) as srv:
        src = MjpegSource(srv.url("/bad.mjpg"), W, H, capacity=16)
        got = src.take(9, timeout=10)
        assert src.take(1, timeout=10) is None  # ended, not broken off
        src.close()
    expect = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in good[:9]])
    assert np.array_equal(got.numpy(), expect)
    assert src.bad_parts == 60 and src.buffer.pushed == 9 and src.buffer.error is None
    ended = [r.getMessage() for r in caplog.records if "ended" in r.getMessage()]
    assert ended == [f"Block Cascade: MJPEG stream {srv.url('/bad.mjpg')} ended: its last 30 parts were no image"]
    assert all("\n" not in r.getMessage() and " at 0x" not in r.getMessage() for r in caplog.records)


def test_a_16_bit_grey_png_frame_is_scaled_to_8_bits_as_the_cli_reads_it(tmp_path):
    from cascade_core.video.vae_encode import load_image

    levels = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    png = io.BytesIO()
    Image.fromarray(levels).save(png, format="PNG")
    assert Image.open(io.BytesIO(png.getvalue())).mode.startswith("I;16")
    got = decode_image(png.getvalue(), "webcam")
    expect = np.round(levels / 257.0).astype(np.uint8)
    assert np.array_equal(got, np.repeat(expect[..., None], 3, -1))
    (tmp_path / "g.png").write_bytes(png.getvalue())
    cli = ((load_image(str(tmp_path / "g.png"), 4, 2)[0, :, 0] + 1) * 127.5).round().permute(1, 2, 0)
    assert np.array_equal(got, cli.to(torch.uint8).numpy())


def test_an_unreadable_frame_is_one_line_without_an_objects_address():
    for data in (b"\xff\xd8garbage", b"\x00" * 100, jpeg(random_frames(1, seed=11)[0])[:200]):
        with pytest.raises(ValueError) as e:
            decode_image(data, "webcam")
        one_line(e, "webcam: not a readable JPEG or PNG image")
        assert " at 0x" not in str(e.value) and "object" not in str(e.value), str(e.value)


def test_a_frame_pushed_after_the_end_is_not_taken_and_the_push_says_so():
    src = PushedSource(W, H)
    frame = jpeg(random_frames(1, seed=12)[0])
    assert src.push_image(frame) is True and src.push(random_frames(1, seed=13)[0]) is True
    src.close()
    assert src.push_image(frame) is False and src.buffer.pushed == 2


def test_close_ends_a_live_mjpeg_reader():
    class Endless(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=f")
            self.end_headers()
            data = jpeg(random_frames(1, seed=9)[0])
            try:
                while True:
                    self.wfile.write(b"--f\r\nContent-Type: image/jpeg\r\n\r\n" + data + b"\r\n")
                    time.sleep(0.005)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        src = MjpegSource(f"http://127.0.0.1:{server.server_address[1]}/", W, H, capacity=4)
        assert src.take(4, timeout=10).shape == (4, H, W, 3)
        assert src.buffer.held_bytes() <= 4 * H * W * 3
        src.close()
        assert src.take(4, timeout=10) is None
        src._thread.join(5)
        assert not src._thread.is_alive()
    finally:
        server.shutdown()
        server.server_close()


def test_the_latency_bound_is_stated():
    assert "capacity x the input's frame interval" in live_sources.__doc__ and live_sources.LIVE_CAPACITY == 8
