"""Steering a running Block Cascade Sampler: prompts typed while it runs, through ComfyUI's server.

Contract:
  POST /block_cascade/steer  {"node": id, "text": str, "block": int (optional),
                              "blend_blocks": int (optional)}
    200 {"queued": true}: the text waits for the sampler node ``id``, which encodes it with the CLIP on
        its ``clip`` input and switches to it at the next block to enter the cascade (or at ``block``
        when that is later; see :mod:`cascade_core.sampling.steer`), blending the old and new prompts over
        ``blend_blocks`` blocks (0 or left out: a hard switch; :mod:`cascade_core.sampling.blend`);
    400 {"error": one line}: not a JSON object, an empty text or one over MAX_TEXT characters, a block
        that is no int >= 0 or beyond the video, a blend_blocks that is no int in 0..MAX_BLEND_BLOCKS, or the
        running node has no CLIP connected;
    409 {"error": "node N is not running"};
    413 {"error": one line}: a body over MAX_BODY bytes;
    429 {"error": one line}: MAX_WAITING texts already wait for the node's next block.
  Each switch that lands is sent to the client that queued the prompt as the websocket event
  ``block_cascade.switch`` {node, run, block, text} (and ``blend_blocks`` when > 0); one that could not
  land (no block left, or the text could not be encoded) as {node, run, block: null, text, dropped: why}.

The registry (:func:`register`, :func:`unregister`) holds one :class:`Running` per sampler node while it runs, each with a
thread-safe queue: the server's thread puts requests, the sampler's thread takes them between ticks
(the engine's ``steer`` poll), so the text is encoded in the sampler's thread. The route is added to
ComfyUI's server when this module is imported inside it (:func:`register_route`).
Bounded for hours-long streams: the queue (MAX_WAITING), each text (MAX_TEXT), a request's body
(MAX_BODY), the texts of switches not yet told (each is forgotten once its switch event is sent) and the
encodings kept (the ENCODED most recently used texts; one that comes back later is encoded again).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Callable

from cascade_core.common.messages import first_line
from cascade_core.sampling.blend import check_blend_blocks

from . import checks, routes

log = logging.getLogger("block_cascade")

ROUTE = "/block_cascade/steer"
NO_CLIP = "connect a CLIP (type wan) to the sampler's clip input to steer it"
MAX_WAITING = 64  # steered texts queued for one running node
MAX_TEXT = 2000  # characters of one steered text (umt5 reads 512 tokens: about 2000 characters of English)
MAX_BODY = 64 * 1024  # bytes of one request's body
ENCODED = 8  # encodings kept per run (an embedding [512, 4096] in float32 is 8 MiB)


class Running:
    """A running sampler node that takes steered prompts: ``node`` its id, ``blocks`` its video's
    length, ``clip`` the core CLIP that encodes texts (None: none connected), ``text_dim`` the width
    the model expects, ``send(block, text, dropped, blend_blocks)`` where each switch is told (the widget event)."""

    def __init__(self, node: str, blocks: int, clip, text_dim: int,
                 send: Callable[[int | None, str, str, int], None] = lambda block, text, dropped, blend=0: None):
        self.node, self.blocks, self.clip, self.text_dim, self.send = node, blocks, clip, text_dim, send
        self.requests: queue.Queue = queue.Queue(maxsize=MAX_WAITING)  # (text, block or None, blend_blocks)
        self.texts: dict[int, str] = {}  # the engine's switch index -> its text, until its switch event is told
        self._count = 0  # switches handed to the engine (its next switch index)
        self._encoded: collections.OrderedDict = collections.OrderedDict()  # text -> embeddings [L, text_dim]

    def encode(self, text: str):
        """Embeddings [L, text_dim] of ``text`` by the CLIP (the ENCODED most recently used texts kept).
        Raises ValueError."""
        if text in self._encoded:
            self._encoded.move_to_end(text)
            return self._encoded[text]
        cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        embeds = checks.conditioning_embeds(cond, "steered text")
        checks.prompt_width(embeds, self.text_dim, "steered text")
        self._encoded[text] = embeds
        while len(self._encoded) > ENCODED:
            self._encoded.popitem(last=False)
        return embeds

    def steer(self) -> list:
        """The engine's ``steer`` poll: the queued texts, encoded, as [(block or None, embeddings, blend_blocks)].
        A text that cannot be encoded is dropped (told through ``send``), the run goes on."""
        items = []
        while True:
            try:
                text, block, blend = self.requests.get_nowait()
            except queue.Empty:
                return items
            try:
                embeds = self.encode(text)
            except Exception as exc:  # noqa: BLE001 - a typed prompt must not end the run
                why = f"could not encode it: {first_line(exc)}"
                log.warning("Block Cascade: steered text %r %s", text, why)
                self.send(None, text, why, blend)
                continue
            self.texts[self._count] = text
            self._count += 1
            items.append((block, embeds, blend))

    def on_switch(self, ev) -> None:
        """The engine's ``on_switch``: a :class:`cascade_core.sampling.steer.SwitchEvent` told through ``send``."""
        text = self.texts.pop(ev.index, "")  # each switch is told once: its text is not needed after
        if ev.dropped:
            log.warning("Block Cascade: steered text %r dropped: %s", text, ev.dropped)
        self.send(ev.block, text, ev.dropped, ev.blend_blocks)


_lock = threading.Lock()
_running: dict[str, Running] = {}


def check(clip) -> None:
    """Refuse a CLIP input (to steer a run) that is no core CLIP, before any model work (whether the run can
    take switches while it goes on is the plan's rule: ``plan_run(..., steered=True)``). Raises ValueError."""
    if clip is None:
        return
    if not all(callable(getattr(clip, name, None)) for name in ("tokenize", "encode_from_tokens_scheduled")):
        raise ValueError(f"clip: expected a core CLIP (CLIPLoader with type wan), got {type(clip).__name__}")


def register(entry: Running) -> None:
    """Make ``entry`` the running sampler of its node id (steer requests reach it from now on)."""
    with _lock:
        _running[entry.node] = entry


def unregister(entry: Running | None) -> None:
    """Forget ``entry`` (None, or one already replaced: nothing happens)."""
    with _lock:
        if entry is not None and _running.get(entry.node) is entry:
            del _running[entry.node]


def submit(body) -> tuple[int, dict]:
    """Check a steer request's JSON body and queue it for its running node: (HTTP status, JSON answer)
    as the module docstring lists them."""
    if not isinstance(body, dict):
        return 400, {"error": 'the body must be a JSON object {"node": id, "text": str, "block": int (optional), '
                              '"blend_blocks": int (optional)}'}
    node, text, block, blend = body.get("node"), body.get("text"), body.get("block"), body.get("blend_blocks", 0)
    if not isinstance(text, str) or not text.strip():
        return 400, {"error": "text must be a non-empty string (the prompt to switch to)"}
    if len(text) > MAX_TEXT:
        return 400, {"error": f"text is {len(text)} characters; a steered prompt holds at most {MAX_TEXT} (the "
                              f"text encoder reads 512 tokens)"}
    if block is not None and (type(block) is not int or block < 0):
        return 400, {"error": f"block must be an int >= 0 (the block to switch at) or left out (the next block), "
                              f"got {block!r}"}
    try:
        check_blend_blocks(blend, "the steered prompt")
    except ValueError as exc:
        return 400, {"error": str(exc)}
    with _lock:
        entry = _running.get(str(node))
    if entry is None:
        return 409, {"error": f"node {node} is not running"}
    if entry.clip is None:
        return 400, {"error": NO_CLIP}
    if block is not None and entry.blocks and block >= entry.blocks:  # blocks 0: endless
        return 400, {"error": f"block {block} is beyond the video (blocks 0..{entry.blocks - 1})"}
    try:
        entry.requests.put_nowait((text, block, blend))
    except queue.Full:
        return 429, {"error": f"{MAX_WAITING} steered prompts already wait for node {node}'s next block; send "
                              f"this one after it"}
    return 200, {"queued": True}


async def handle(request):
    """The aiohttp handler of ``POST /block_cascade/steer`` (see :func:`submit`)."""
    import json

    from aiohttp import web

    if request.content_length is not None and request.content_length > MAX_BODY:
        return web.json_response({"error": f"the request body is {request.content_length} bytes; at most {MAX_BODY}"},
                                 status=413)
    raw = b""  # read as it arrives, never more than the bound, whatever the headers said
    while len(raw) <= MAX_BODY and (chunk := await request.content.read(MAX_BODY + 1 - len(raw))):
        raw += chunk
    if len(raw) > MAX_BODY:
        return web.json_response({"error": f"the request body is over {MAX_BODY} bytes"}, status=413)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    status, answer = submit(body)
    return web.json_response(answer, status=status)


def register_route() -> bool:
    """Add ``POST /block_cascade/steer`` to ComfyUI's running server, once. Returns whether a server
    takes it now (False outside ComfyUI)."""
    return routes.add_route("POST", ROUTE, handle)

register_route()
