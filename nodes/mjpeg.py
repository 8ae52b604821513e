"""The running sampler's frames as MJPEG, for tools outside ComfyUI (OBS' browser or media source, a browser).

Contract:
  GET /block_cascade/stream/{node}.mjpeg
    404 (one line of text): the sampler node ``node`` is not running;
    503 (one line of text): MAX_VIEWERS clients already watch it;
    200 ``multipart/x-mixed-replace; boundary=frame``: each frame the node sends to its widget from now
        on (the preview JPEGs of ``block_cascade.frames``, longest side <= PREVIEW_MAX) as one part
        (``Content-Type: image/jpeg``, ``Content-Length``), paced at the video's fps as frames arrive;
        the response ends with the run (after the frames still queued) or when the client goes away.

The feed (:class:`Feed`) of a node exists only while it runs (:func:`open_feed`, :func:`close_feed`, by
the node's :class:`nodes.stream.Reporter`): the Reporter's writer thread offers it the JPEG bytes it
already encoded for the widget; each subscriber (one per HTTP client) keeps at most QUEUED frames, the
oldest dropped first for a reader that falls behind, and nothing is kept when nobody subscribes.
"""
from __future__ import annotations

import asyncio
import collections
import threading

from . import routes

ROUTE = "/block_cascade/stream/{node}.mjpeg"
BOUNDARY = "frame"
QUEUED = 64  # frames a subscriber may fall behind by (4 s at 16 fps) before its oldest are dropped
MAX_VIEWERS = 16  # clients reading one node's stream at once


class Subscriber:
    """One reader of a :class:`Feed`: a bounded queue of JPEG bytes, filled from any thread and read on
    the event loop it subscribed in."""

    def __init__(self, feed: "Feed", loop: asyncio.AbstractEventLoop):
        self.feed, self._loop = feed, loop
        self.frames: collections.deque[bytes] = collections.deque(maxlen=QUEUED)
        self._wake = asyncio.Event()

    def offer(self, jpegs: list[bytes]) -> None:
        """Queue ``jpegs`` (dropping the oldest beyond QUEUED) and wake the reader; any thread."""
        self.frames.extend(jpegs)
        self.wake()

    def wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the reader's loop is closed: nobody is left to wake
            pass

    async def next(self) -> bytes | None:
        """The next queued JPEG, waiting for one; None once the feed has ended and the queue is empty."""
        while True:
            self._wake.clear()
            if self.frames:
                return self.frames.popleft()
            if self.feed.ended:
                return None
            await self._wake.wait()

    def close(self) -> None:
        """Stop reading: the feed forgets this subscriber (its queue goes with it)."""
        self.feed.unsubscribe(self)


class Feed:
    """The frames of one running sampler node ``node`` (video at ``fps``), offered to its subscribers."""

    def __init__(self, node: str, fps: float):
        self.node, self.fps = str(node), fps
        self.ended = False
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def subscribe(self) -> Subscriber | None:
        """A new subscriber, read on the running event loop (call it from a coroutine); None when MAX_VIEWERS
        already read this feed."""
        sub = Subscriber(self, asyncio.get_running_loop())
        with self._lock:
            if len(self._subscribers) >= MAX_VIEWERS:
                return None
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, jpegs: list[bytes]) -> None:
        """Offer the JPEG bytes of some frames to every subscriber (none: nothing is kept); any thread."""
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            sub.offer(jpegs)

    def end(self) -> None:
        """The run is over: each subscriber reads what it has queued, then ends."""
        self.ended = True
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            sub.wake()


_lock = threading.Lock()
_feeds: dict[str, Feed] = {}


def open_feed(node: str, fps: float) -> Feed:
    """The feed of node ``node``'s run starting now (it replaces any earlier one of that node)."""
    feed = Feed(node, fps)
    with _lock:
        _feeds[feed.node] = feed
    return feed


def close_feed(feed: Feed | None) -> None:
    """End ``feed`` and forget it (None: nothing happens; one already replaced is only ended)."""
    if feed is None:
        return
    feed.end()
    with _lock:
        if _feeds.get(feed.node) is feed:
            del _feeds[feed.node]


def running_feed(node: str) -> Feed | None:
    with _lock:
        return _feeds.get(str(node))


def part(jpeg: bytes) -> bytes:
    """One multipart part holding the JPEG ``jpeg``."""
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode("ascii")
    return head + jpeg + b"\r\n"


async def handle(request):
    """The aiohttp handler of ``GET /block_cascade/stream/{node}.mjpeg`` (see the module docstring)."""
    from aiohttp import web

    node = request.match_info["node"]
    feed = running_feed(node)
    if feed is None:
        return web.Response(status=404, text=f"node {node} is not running")
    sub = feed.subscribe()
    if sub is None:
        return web.Response(status=503, text=f"{MAX_VIEWERS} clients already watch node {node}; close one first")
    response = web.StreamResponse(headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                           "Cache-Control": "no-cache, no-store"})
    loop, period = asyncio.get_running_loop(), 1.0 / feed.fps
    try:
        await response.prepare(request)
        due = loop.time()  # when the next frame may go: a period after the last one went, never sooner
        while (jpeg := await sub.next()) is not None:
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            due = loop.time() + period  # from when it really goes: a late wake-up delays, never hurries, the next
            await response.write(part(jpeg))
        await response.write(f"--{BOUNDARY}--\r\n".encode("ascii"))
    except ConnectionError:  # the client went away
        pass
    finally:
        sub.close()
    return response


def register_route() -> bool:
    """Add ``GET /block_cascade/stream/{node}.mjpeg`` to ComfyUI's running server, once. Returns whether
    a server takes it now (False outside ComfyUI)."""
    return routes.add_route("GET", ROUTE, handle)


register_route()
