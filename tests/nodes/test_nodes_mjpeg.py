"""The running sampler's frames as MJPEG: GET /block_cascade/stream/{node}.mjpeg and the per-node feed
(stand-in comfy modules and aiohttp, tiny model, CPU).

What this proves: a subscriber gets exactly the JPEG bytes the widget gets, from the time it subscribes,
each as one multipart part, paced at the feed's fps, and the response ends after the run's last frame;
a reader that falls behind keeps only the newest QUEUED frames and nothing is kept without subscribers;
a client that goes away (or a cancelled handler) leaves no subscriber; a node that is not running gets a
one-line 404; a sampler's feed exists only while it runs (also after an error).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import sys
import time
import types

import pytest
import torch
from oracles import mjpeg_parts
from test_nodes import PKG, H, Recorder, W, config, model, prompts, run, server_routes, stream_mod  # noqa: F401

from cascade_core.common.latent_space import WAN21_LATENTS
from cascade_core.sampling.loop import BlockEvent
from cascade_core.video.frames import LatentRGBDecoder

mjpeg_mod = sys.modules[f"{PKG}.nodes.mjpeg"]


class Response:
    """aiohttp.web.Response as far as the handler uses it."""

    def __init__(self, status=200, text=""):
        self.status, self.text = status, text


class StreamResponse:
    """aiohttp.web.StreamResponse as far as the handler uses it: records the writes and when they came;
    ``fail_after`` writes, a write raises as one to a client that went away does."""
    made: list = []

    def __init__(self, status=200, headers=None):
        self.status, self.headers, self.prepared, self.writes, self.times = status, dict(headers or {}), False, [], []
        self.fail_after = StreamResponse.fail_after
        StreamResponse.made.append(self)

    async def prepare(self, request):
        self.prepared = True

    async def write(self, data: bytes):
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise ConnectionResetError("Cannot write to closing transport")
        self.writes.append(bytes(data))
        self.times.append(time.monotonic())


@pytest.fixture
def web(monkeypatch):
    StreamResponse.made, StreamResponse.fail_after = [], None
    stand_in = types.SimpleNamespace(Response=Response, StreamResponse=StreamResponse)
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=stand_in))
    return StreamResponse


def request(node: str):
    return types.SimpleNamespace(match_info={"node": node})


def test_a_feed_keeps_nothing_without_subscribers_and_a_slow_reader_keeps_the_newest_frames():
    async def main():
        feed = mjpeg_mod.open_feed("31", 16)
        feed.publish([b"early"])  # nobody subscribes: nothing kept
        sub = feed.subscribe()
        frames = [b"f%d" % i for i in range(mjpeg_mod.QUEUED + 10)]
        for i in range(0, len(frames), 12):  # block by block, as the Reporter offers them
            feed.publish(frames[i:i + 12])
        assert len(sub.frames) == mjpeg_mod.QUEUED
        mjpeg_mod.close_feed(feed)
        got = []
        while (jpeg := await sub.next()) is not None:
            got.append(jpeg)
        sub.close()
        return feed, got

    feed, got = asyncio.run(main())
    assert got == [b"f%d" % i for i in range(10, mjpeg_mod.QUEUED + 10)]  # the oldest 10 dropped
    assert feed.subscribers() == 0 and mjpeg_mod.running_feed("31") is None


def reporter_run(node: str, blocks: int, fps: int):
    """A Reporter of ``blocks`` blocks (3 latent frames each) whose video plays at ``fps`` (its decoder's latent
    space's rate) and a function that runs it to done, returning the base64 JPEGs of its frames events."""
    g = torch.Generator().manual_seed(7)
    factors = torch.randn(16, 3, generator=g) * 0.05
    sent = []
    decoder = LatentRGBDecoder(factors, torch.zeros(3), latent_space=dataclasses.replace(WAN21_LATENTS, fps=fps))
    r = stream_mod.Reporter(node, blocks, 3 * blocks, 5, 1, 64, 32, decoder, send=lambda e, d: sent.append((e, d)))
    z = torch.randn(1, 16, 3 * blocks, 2, 4, generator=g)

    def go():
        for b in range(blocks):
            r.on_block(BlockEvent(b, z[:, :, 3 * b:3 * b + 3], b, 0.0))
        r.finish()
        r.done()
        return [f for e, d in sent if e.endswith(".frames") for f in d["frames"]]
    return r, go


def test_the_stream_sends_the_widgets_jpegs_as_parts_at_the_fps_until_the_run_ends(web, monkeypatch):
    real_sleep, waits = asyncio.sleep, []

    async def late_sleep(delay, *a):  # every other pacing wait wakes 10 ms late, as on a busy machine
        if delay > 0.005:
            waits.append(delay)
            delay += 0.01 * (len(waits) % 2)
        return await real_sleep(delay, *a)

    monkeypatch.setattr(asyncio, "sleep", late_sleep)

    async def main():
        r, go = reporter_run("32", 2, fps=50)  # the feed's pace: 20 ms a frame
        r.start()
        handler = asyncio.create_task(mjpeg_mod.handle(request("32")))
        while mjpeg_mod.running_feed("32").subscribers() == 0:
            await asyncio.sleep(0.001)
        widget = await asyncio.to_thread(go)
        response = await asyncio.wait_for(handler, 30)
        return response, widget

    response, widget = asyncio.run(main())
    assert response is web.made[0] and response.prepared and response.status == 200
    assert response.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
    parts, closed = mjpeg_parts(b"".join(response.writes))
    assert closed and len(widget) == 21 and parts == [base64.b64decode(f) for f in widget]
    assert all(p[:2] == b"\xff\xd8" and p[-2:] == b"\xff\xd9" for p in parts)  # JPEG SOI ... EOI
    gaps = [b - a for a, b in zip(response.times, response.times[1:len(parts)])]
    assert waits and min(gaps) >= 1 / 50 - 2e-3, min(gaps)  # a late frame delays the next, never hurries it
    assert mjpeg_mod.running_feed("32") is None


def test_a_client_that_goes_away_leaves_no_subscriber(web):
    web.fail_after = 2

    async def main():
        feed = mjpeg_mod.open_feed("33", 1000)
        handler = asyncio.create_task(mjpeg_mod.handle(request("33")))
        while feed.subscribers() == 0:
            await asyncio.sleep(0.001)
        feed.publish([b"\xff\xd8a\xff\xd9"] * 5)
        await asyncio.wait_for(handler, 10)  # ends at the failed write, the run still going
        assert feed.subscribers() == 0 and not feed.ended
        web.fail_after = None
        waiting = asyncio.create_task(mjpeg_mod.handle(request("33")))  # cancelled while it waits for frames
        while feed.subscribers() == 0:
            await asyncio.sleep(0.001)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert feed.subscribers() == 0
        mjpeg_mod.close_feed(feed)
        return web.made[0]

    first = asyncio.run(main())
    assert len(mjpeg_parts(b"".join(first.writes))[0]) == 2


def test_a_node_that_is_not_running_gets_a_one_line_404(web):
    async def get(node):
        return await mjpeg_mod.handle(request(node))

    for node in ("4242", "34"):
        answer = asyncio.run(get(node))
        assert (answer.status, answer.text) == (404, f"node {node} is not running")
    feed = mjpeg_mod.open_feed("34", 16)
    mjpeg_mod.close_feed(feed)
    assert asyncio.run(get("34")).status == 404 and not web.made


def test_viewers_of_one_node_are_bounded_and_one_leaving_makes_room(web):
    async def main():
        feed = mjpeg_mod.open_feed("35", 16)
        subs = [feed.subscribe() for _ in range(mjpeg_mod.MAX_VIEWERS)]
        assert None not in subs and feed.subscribe() is None
        refused = await mjpeg_mod.handle(request("35"))
        subs.pop().close()
        again = feed.subscribe()
        mjpeg_mod.close_feed(feed)
        return refused, again

    refused, again = asyncio.run(main())
    assert refused.status == 503 and f"{mjpeg_mod.MAX_VIEWERS} clients already watch node 35" in refused.text
    assert "\n" not in refused.text and again is not None


def test_the_stream_route_is_added_to_the_server_once(server_routes):
    assert mjpeg_mod.register_route() and mjpeg_mod.register_route()
    assert [(r.method, r.path, r.handler) for r in server_routes] == \
        [("GET", "/block_cascade/stream/{node}.mjpeg", mjpeg_mod.handle)]


@pytest.mark.parametrize("stop", ["none", "error"])
def test_a_samplers_feed_exists_only_while_it_runs(model, prompts, stop, monkeypatch):  # noqa: F811
    seen = []
    real_on_tick = stream_mod.Reporter.on_tick

    def on_tick(reporter, ev):
        real_on_tick(reporter, ev)
        feed = mjpeg_mod.running_feed("35")
        seen.append(feed is not None and feed is reporter.feed and feed.node == "35" and not feed.ended)
        if stop == "error" and ev.tick == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(stream_mod.Reporter, "on_tick", on_tick)
    with Recorder():
        if stop == "error":
            with pytest.raises(RuntimeError, match="boom"):
                run("BlockCascadeSampler", unique_id="35", model=model, config=config(), width=W, height=H,
                    blocks=2, seed=1, positive=prompts[0])
        else:
            run("BlockCascadeSampler", unique_id="35", model=model, config=config(), width=W, height=H,
                blocks=2, seed=1, positive=prompts[0])
    assert seen and all(seen) and mjpeg_mod.running_feed("35") is None
