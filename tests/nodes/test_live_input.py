"""The webcam route of a running sampler: POST /block_cascade/webcam/{node}?run=RUN (nodes/live_input.py), through
the stand-in comfy modules (aiohttp stood in, CPU, no model).

What this proves: a JPEG or PNG posted while a webcam run is registered lands in that run's pushed-frame source
(decoded, resized to the run's size, which the answer tells) and nowhere else; frames for a node that is not
running, for another run of the node, or for a run reading another input get a one-line 409; an empty body,
no image or a GIF gets 400, a body over the bound 413 (announced or not), more than MAX_DECODING frames
decoded at once 429; a frame that comes as the run ends (its source closed before or while the frame is
decoded) gets the 409 of a node that is not running, never a 200 for a frame that went nowhere; frames beyond the buffer are dropped and counted; ``run_source`` registers a run only
while its block runs (also when it raises), refuses a bad input before registering, and closes the source;
the route is added to the server once, and the pack adds it when it is loaded.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import types

import numpy as np
import pytest
import torch
from PIL import Image
from test_nodes import PKG, server_routes  # noqa: F401

from cascade_core.video.frame_source import fit_frames
from cascade_core.video.live_sources import PushedSource

live = sys.modules[f"{PKG}.nodes.live_input"]
W, H = 48, 32
PIECE = 64 * 1024  # aiohttp's stream hands out what arrived, in pieces of up to 64 KiB


def image_bytes(frame, fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format=fmt)
    return out.getvalue()


def frame(seed, h=64, w=96):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class Request:
    """aiohttp's request as far as the handler reads it: the path's node, the query, the announced length and
    the body's bytes (as a stream, in pieces of at most PIECE bytes)."""

    def __init__(self, node, body: bytes, run=None, length=None):
        self.match_info = {"node": str(node)}
        self.query = {} if run is None else {"run": run}
        self.raw = body
        self.content_length = len(body) if length is None else length
        self.content = types.SimpleNamespace(read=self.read)

    async def read(self, n):
        piece, self.raw = self.raw[:min(n, PIECE)], self.raw[min(n, PIECE):]
        return piece


@pytest.fixture
def post(monkeypatch):
    web = types.SimpleNamespace(json_response=lambda data, status=200: (status, json.loads(json.dumps(data))))
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))
    return lambda node, body, run=None, length=None: asyncio.run(live.handle(Request(node, body, run, length)))


def test_a_posted_frame_lands_in_its_runs_source_and_only_there(post):
    jpg, png = image_bytes(frame(1)), image_bytes(frame(2), "PNG")
    assert post("5", jpg, "r1") == (409, {"error": "node 5 is not running"})
    with live.run_source("5", "r1", "webcam", W, H) as source, \
            live.run_source("6", "r2", torch.rand(5, H, W, 3), W, H) as other:
        assert isinstance(source, PushedSource) and not isinstance(other, PushedSource)
        assert post("5", jpg, "r1") == (200, {"taken": True, "width": W, "height": H, "dropped": 0})
        assert post(5, png) == (200, {"taken": True, "width": W, "height": H, "dropped": 0})  # run left out: taken
        got = source.take(2, timeout=5).numpy()
        decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (jpg, png)]
        assert np.array_equal(got, fit_frames(np.stack(decoded), W, H))
        for node, run, text in (("5", "r0", "node 5 is running another run (r1), not r0"),
                                ("6", "r2", "node 6 reads no webcam"), ("7", None, "node 7 is not running")):
            status, answer = post(node, jpg, run)
            assert status == 409 and text in answer["error"] and "\n" not in answer["error"], (node, answer)
        assert len(source.buffer) == 0 and other.take(5) is not None  # nothing landed anywhere
    assert post("5", jpg, "r1") == (409, {"error": "node 5 is not running"})
    assert source.take(1, timeout=5) is None  # closed with the run


def test_bad_bodies_get_one_line_and_nothing_lands(post):
    gif = io.BytesIO()
    Image.fromarray(frame(3)).save(gif, format="GIF")
    with live.run_source("5", "r1", "webcam", W, H) as source:
        for body, text in ((b"", "got an empty body"), (b"<html>", "not a readable JPEG or PNG image"),
                           (gif.getvalue(), "must be a JPEG or PNG image, got GIF"),
                           (image_bytes(frame(4))[:200], "not a readable JPEG or PNG image")):
            status, answer = post("5", body, "r1")
            assert status == 400 and text in answer["error"] and "\n" not in answer["error"], answer
        huge = b"\xff" * (live.MAX_BODY + 1)
        assert post("5", huge, "r1")[0] == 413
        assert post("5", huge, "r1", length=10)[0] == 413  # a length header that lies
        assert post("5", b"x", "r1", length=live.MAX_BODY + 1)[0] == 413  # refused from the header
        assert len(source.buffer) == 0 and source.buffer.pushed == 0


def test_frames_beyond_the_buffer_are_dropped_and_counted(post):
    jpgs = [image_bytes(frame(10 + i, H, W)) for i in range(11)]
    with live.run_source("5", "r1", "webcam", W, H, capacity=8) as source:
        answers = [post("5", b, "r1") for b in jpgs]
        assert [a[1]["dropped"] for a in answers] == [0] * 8 + [1, 2, 3]
        got = source.take(8, timeout=5).numpy()
        newest = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpgs[3:]]
        assert np.array_equal(got, np.stack(newest))


def test_more_than_max_decoding_frames_at_once_get_429():
    jpg = image_bytes(frame(5))
    with live.run_source("5", "r1", "webcam", W, H) as source:
        release, entered = threading.Event(), threading.Semaphore(0)
        real = source.push_image

        def slow(data):
            entered.release()
            release.wait(10)
            return real(data)

        source.push_image = slow
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(live.submit("5", "r1", jpg)))
                   for _ in range(live.MAX_DECODING)]
        for t in threads:
            t.start()
        for _ in threads:
            assert entered.acquire(timeout=10)
        status, answer = live.submit("5", "r1", jpg)
        assert status == 429 and "post one at a time" in answer["error"]
        release.set()
        for t in threads:
            t.join(10)
        assert [a[0] for a in answers] == [200] * live.MAX_DECODING
        assert live.submit("5", "r1", jpg)[0] == 200  # the count came back down


def test_a_frame_posted_as_the_run_ends_is_answered_as_for_a_node_not_running():
    """run_source leaves by unregistering, then closing the source; a frame in between, or one being decoded
    when the source is closed, is not taken: the answer says so (the webcam then stops posting)."""
    jpg = image_bytes(frame(7))
    source = PushedSource(W, H)
    entry = live.Receiving("5", "r1", source)
    live.register(entry)
    try:
        source.close()  # the run has ended, not yet unregistered
        assert live.submit("5", "r1", jpg) == (409, {"error": "node 5 is not running"})
        source = entry.source = PushedSource(W, H)
        real = source.push_image

        def closed_while_decoding(data):
            source.close()
            return real(data)

        source.push_image = closed_while_decoding
        assert live.submit("5", "r1", jpg) == (409, {"error": "node 5 is not running"})
        assert source.buffer.pushed == 0 and entry.decoding == 0
    finally:
        live.unregister(entry)


def test_run_source_registers_only_while_its_block_runs():
    jpg = image_bytes(frame(6))
    with pytest.raises(RuntimeError, match="the engine failed"):
        with live.run_source("5", "r1", "webcam", W, H):
            assert live.submit("5", "r1", jpg)[0] == 200
            raise RuntimeError("the engine failed")
    assert live.submit("5", "r1", jpg)[0] == 409
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):  # a bad input: refused before anything is registered
        with live.run_source("5", "r2", torch.rand(2, 3), W, H):
            pass
    assert live.submit("5", "r2", jpg) == (409, {"error": "node 5 is not running"})
    # a newer run of the node is not unregistered by an older one leaving
    older = live.Receiving("5", "r1", None)
    live.register(older)
    with live.run_source("5", "r2", "webcam", W, H):
        live.unregister(older)
        assert live.submit("5", "r2", jpg)[0] == 200
    live.unregister(older)
    assert live.submit("5", "r2", jpg)[0] == 409


def test_the_route_is_added_to_the_server_once_and_the_pack_adds_it(server_routes, monkeypatch):  # noqa: F811
    import server

    assert live.register_route() and live.register_route()
    assert [(r.method, r.path, r.handler) for r in server_routes] == [("POST", "/block_cascade/webcam/{node}",
                                                                        live.handle)]
    monkeypatch.setattr(server.PromptServer, "instance", None)
    assert not live.register_route()
    nodes_init = sys.modules[f"{PKG}.nodes"]
    assert nodes_init.live_input is live  # imported by the pack's nodes: the route is added inside ComfyUI
