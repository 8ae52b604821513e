"""Live video input of a running Block Cascade Sampler: the browser's webcam posts its frames here.

Contract:
  POST /block_cascade/webcam/{node}?run=RUN   body: one JPEG or PNG image (the widget's canvas, toBlob)
    200 {"taken": true, "width": W, "height": H, "dropped": D}: the frame went into the run's webcam source
        (resized to W x H, the run's size: post at that size; D frames were dropped so far, unseen, because
        they came faster than the run takes them; see :mod:`cascade_core.video.live_sources` for the latency bound);
    400 {"error": one line}: an empty body, no JPEG/PNG image, or one over 4K (live_sources.MAX_PIXELS pixels);
    409 {"error": one line}: node ``node`` is not running (its run has ended, even while this frame was being
        decoded: the frame went nowhere), its run reads no webcam, or ``run`` is given and names another run
        than the one going on (a page still sending for an earlier run);
    413 {"error": one line}: a body over MAX_BODY bytes;
    429 {"error": one line}: MAX_DECODING frames of the node are being decoded already (post one at a time).

The registry (:func:`register`, :func:`unregister`, or :func:`run_source` for both) holds one
:class:`Receiving` per sampler node while it runs, as :mod:`nodes.steer` holds its steered prompts: the
server's thread pushes the posted frames into the run's :class:`PushedSource`, the sampler's thread takes
them chunk by chunk. The route is added to ComfyUI's server when this module is imported inside it
(:func:`register_route`). Bounded: a body (MAX_BODY), a frame's pixels (live_sources.MAX_PIXELS), decodes at once
per node (MAX_DECODING) and the frames held (the source's buffer: newest kept, older dropped).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

from cascade_core.video.live_sources import LIVE_CAPACITY, WEBCAM, PushedSource
from cascade_core.video.sources import open_source

from . import routes

ROUTE = "/block_cascade/webcam/{node}"
MAX_BODY = 8 * 1024 * 1024  # bytes of one posted frame (a 1280x720 PNG is about 2.7 MB, a JPEG of it ~0.2 MB)
MAX_DECODING = 2  # frames of one node decoded at once (the widget keeps one request in flight)


class Receiving:
    """A running sampler node: ``node`` its id, ``run`` its run id (the widget events' ``run``), ``source``
    the :class:`PushedSource` the webcam fills, or None when the run reads another input."""

    def __init__(self, node, run, source: PushedSource | None):
        self.node, self.run, self.source = str(node), str(run), source
        self.decoding = 0  # frames being decoded now (under the registry's lock)


_lock = threading.Lock()
_running: dict[str, Receiving] = {}


def register(entry: Receiving) -> None:
    """Make ``entry`` the running sampler of its node id (frames reach it from now on)."""
    with _lock:
        _running[entry.node] = entry


def unregister(entry: Receiving | None) -> None:
    """Forget ``entry`` (None, or one already replaced: nothing happens)."""
    with _lock:
        if entry is not None and _running.get(entry.node) is entry:
            del _running[entry.node]


@contextlib.contextmanager
def run_source(node, run, given, width: int, height: int, capacity: int = LIVE_CAPACITY):
    """The frame source of one run of sampler ``node`` (run id ``run``), for the node glue:
    ``with run_source(node_id, reporter.run, video_in, width, height) as source: ...``. ``given`` is what the
    sampler's input holds (an IMAGE batch, a core VIDEO, an http(s) MJPEG URL, a video file's path or
    ``"webcam"``; see :func:`cascade_core.video.sources.open_source`, which raises ValueError for a bad one
    here, before anything is registered). The run is registered for the webcam route while the block
    runs (a run of another input is registered too, so a frame posted to it gets a clear 409); on leaving,
    it is unregistered and the source closed (a waiting take() returns None)."""
    source = open_source(given, width, height, capacity=capacity)
    entry = Receiving(node, run, source if isinstance(source, PushedSource) and given == WEBCAM else None)
    register(entry)
    try:
        yield source
    finally:
        unregister(entry)
        source.close()


def _not_running(node) -> tuple[int, dict]:
    return 409, {"error": f"node {node} is not running"}


def submit(node, run, raw: bytes) -> tuple[int, dict]:
    """Check a posted frame and push it into the running node's webcam source: (HTTP status, JSON answer)
    as the module docstring lists them (the body's size is the handler's check)."""
    with _lock:
        entry = _running.get(str(node))
        if entry is None:
            return _not_running(node)
        if run is not None and str(run) != entry.run:
            return 409, {"error": f"node {node} is running another run ({entry.run}), not {run}; start the webcam "
                                  f"again for this run"}
        if entry.source is None:
            return 409, {"error": f"node {node} reads no webcam: its run takes its video from another input"}
        if entry.source.buffer.ended:
            return _not_running(node)
        if entry.decoding >= MAX_DECODING:
            return 429, {"error": f"{MAX_DECODING} frames of node {node} are being decoded; post one at a time"}
        entry.decoding += 1
    try:
        if not raw:
            return 400, {"error": "the body must be one JPEG or PNG image (the frame), got an empty body"}
        if not entry.source.push_image(raw):  # the run ended while it was decoded
            return _not_running(node)
    except ValueError as exc:
        return 400, {"error": str(exc).splitlines()[0]}
    finally:
        with _lock:
            entry.decoding -= 1
    source = entry.source
    return 200, {"taken": True, "width": source.width, "height": source.height, "dropped": source.buffer.dropped}


async def handle(request):
    """The aiohttp handler of ``POST /block_cascade/webcam/{node}`` (see :func:`submit`); the image is
    decoded on a worker thread, not on the server's event loop."""
    from aiohttp import web

    if request.content_length is not None and request.content_length > MAX_BODY:
        return web.json_response({"error": f"the request body is {request.content_length} bytes; at most {MAX_BODY}"},
                                 status=413)
    raw = bytearray()  # read as it arrives, never more than the bound, whatever the headers said
    while len(raw) <= MAX_BODY and (chunk := await request.content.read(MAX_BODY + 1 - len(raw))):
        raw += chunk
    if len(raw) > MAX_BODY:
        return web.json_response({"error": f"the request body is over {MAX_BODY} bytes"}, status=413)
    node, run = request.match_info.get("node", ""), request.query.get("run")
    status, answer = await asyncio.get_running_loop().run_in_executor(None, submit, node, run, bytes(raw))
    return web.json_response(answer, status=status)


def register_route() -> bool:
    """Add ``POST /block_cascade/webcam/{node}`` to ComfyUI's running server, once. Returns whether a server
    takes it now (False outside ComfyUI)."""
    return routes.add_route("POST", ROUTE, handle)


register_route()
