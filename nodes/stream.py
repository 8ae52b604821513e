"""Frames out of finished blocks, and the widget events that carry them.

Event contract (JSON only, sent to the client that queued the prompt; META is {node, run, blocks,
frames_total, fps, width, height, stages, parallel, clean_pass, steerable (a CLIP is connected),
compiling (the layers are compiled first: until the first block is done), settings, live_input? (the live
video input a video-to-video run reads: "webcam" or "mjpeg")}, repeated so that a page reloaded mid-run joins):
  block_cascade.start  {META}
  block_cascade.state  {META, tick, ticks, pairs: [[block, stage], ...], done_blocks, elapsed}
  block_cascade.frames {META, block, first_frame, frames: [base64 JPEG, ...], elapsed, first_block_s?}
                       (``first_block_s`` on the first generated block's: the engine's seconds from the run's
                       start to it, the log's "first block after", the widget's "first frame")
  block_cascade.done   {node, run, seconds, frames, blocks (whose frames were sent), error?, stopped?, video?}
  block_cascade.switch {node, run, block, text, dropped?}: a steered or scheduled prompt landed at ``block`` (block
                       null and ``dropped`` saying why when it could not land; see :mod:`nodes.steer`)
``width``/``height`` are those of the preview JPEGs (longest side <= PREVIEW_MAX). An endless run
(``blocks`` 0) has ``frames_total`` 0 and state ``ticks`` 0 (unknown); it ends with ``stopped: true``
(Cancel, its normal end) and ``video`` {filename, subfolder, type} naming the MP4 in ComfyUI's output
folder that its frames were written to as they came (:mod:`nodes.recording`). A run of known length stopped
by Cancel ends with ``stopped: true``, ``blocks`` its final blocks and ``video`` the MP4 of their frames
(none when no block was final yet; :mod:`nodes.outputs`). A run after a
context (a start image, a video continued) sends that context's frames first, as block -1 from frame 0
(``frames_total`` counts them; ``blocks`` and ``done.blocks`` count generated blocks only). State events are
rate-limited (at most one per STATE_INTERVAL seconds, the last tick always); frames go once per block.
Frames come from cascade_core.video.frames.FrameStream (in block order, decoded on the VAE's own CUDA
stream when there is a VAE, the latent-RGB preview otherwise); the JPEG encoding and the frames
events run on its writer thread, never on the sampler's loop. With a preview decoder (the sampler's
``preview_decoder``) a second FrameStream decodes every block with it, on its own CUDA stream: its frames
are the frames events and the MJPEG feed, the first stream's the IMAGE output and the recording. The same
JPEG bytes go to the run's MJPEG feed (GET /block_cascade/stream/{node}.mjpeg, see :mod:`nodes.mjpeg`) while it
runs (start to done).
"""
from __future__ import annotations

import base64
import io as _io
import logging
import time
import uuid
from typing import Callable

import torch
import torch.nn.functional as F

from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS
from cascade_core.common.messages import first_line
from cascade_core.sampling.loop import BlockEvent
from cascade_core.video.frames import FramesEvent, FrameStream, FrameStreams, LatentRGBDecoder, video_frames

from . import mjpeg

log = logging.getLogger("block_cascade")

PREVIEW_MAX = 320
JPEG_QUALITY = 80
STATE_INTERVAL = 0.1
EVENT_PREFIX = "block_cascade."
CONTEXT_BLOCK = -1  # the block index of a context's frames (before block 0)


def preview_size(width: int, height: int, limit: int = PREVIEW_MAX) -> tuple[int, int]:
    scale = min(1.0, limit / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def client_sender() -> Callable[[str, dict], None]:
    """send(event, data) to the client that queued the running prompt (no-op outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return lambda event, data: None
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return lambda event, data: None
    sid = getattr(server, "client_id", None)
    return lambda event, data: server.send_sync(event, data, sid)


def encode_jpeg(frame: torch.Tensor, quality: int = JPEG_QUALITY) -> bytes:
    """One frame [H, W, 3] in 0..1 -> JPEG bytes."""
    from PIL import Image

    arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = _io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[F, H, W, 3] -> [F, height, width, 3] (area-averaged when shrinking, bilinear when growing)."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    shrink = height <= x.shape[2] and width <= x.shape[3]
    x = F.interpolate(x, size=(height, width), mode="area" if shrink else "bilinear",
                      **({} if shrink else {"align_corners": False}))
    return x.permute(0, 2, 3, 1)


def preview_decoder(latent_space=None):
    """The no-VAE preview: ComfyUI's own latent-to-RGB table of the run's latent space (that of its sampler
    previews: ``comfy.latent_formats.Wan21``, ``Wan22`` for Wan2.2 latents; None: Wan2.1), read at run time; a plain
    projection outside ComfyUI. Frames of the video's size: Wan2.2's 16 pixels a latent pixel too."""
    space = latent_space or WAN21_LATENTS
    try:
        import comfy.latent_formats as formats
        fmt = (formats.Wan22 if space == WAN22_LATENTS else formats.Wan21)()
        return LatentRGBDecoder(fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None),
                                latent_space=space)
    except Exception:  # noqa: BLE001 - only outside ComfyUI or if its format moved
        return LatentRGBDecoder(latent_space=space)


def fps_of(decoder) -> int:
    """Frames per second of the video ``decoder`` makes: its latent space's (:attr:`LatentSpace.fps`, Wan2.1 16,
    Wan2.2 24; the space of the run's model, which the sampler checks a decoder against)."""
    return decoder.latent_space.fps


class Reporter:
    """Sends the widget events of one run and collects the frames (see the module docstring)."""

    def __init__(self, node: str, blocks: int, latent_frames: int, stages: int, parallel: int,
                 width: int, height: int, decoder, send: Callable[[str, dict], None] | None = None,
                 progress=None, clock: Callable[[], float] = time.perf_counter,
                 settings: str = "", clean_pass: bool = True,
                 keep_frames: int | None = None, recording=None, steerable: bool = False, compiling: bool = False,
                 scheduled: tuple[int, ...] = (), preview=None, live_input: str | None = None, run: str | None = None):
        """``keep_frames``: the most (latest) frames :meth:`images` holds (None: all); ``recording``: a
        :class:`cascade_core.video.frames.VideoWriter` that every block's frames are written to as they come
        (closed by :meth:`done`); ``steerable``: a CLIP is connected (META's ``steerable``); ``compiling``: the
        run compiles the model's layers first (META's ``compiling``, until its first block is done); ``scheduled``:
        the blocks where the prompt schedule switches (each told as a ``switch`` when that block enters); ``preview``:
        a second decoder whose frames are the live view (frames events, MJPEG feed) while ``decoder``'s are the
        output (:meth:`images`, the recording); None: ``decoder``'s frames are both; ``live_input``: the live
        video input the run reads (META's ``live_input``, e.g. "webcam": the widget offers its webcam button);
        ``run``: the run's id when the caller made it first (else a new one). The video's frame rate (META's ``fps``,
        the MJPEG feed's pace, the recording's) is ``decoder``'s latent space's (:func:`fps_of`)."""
        self.node, self.run = str(node), run or uuid.uuid4().hex[:12]
        self.fps = fps_of(decoder)
        self.live_input = live_input
        self.clean_pass = clean_pass  # a block's last stage is its clean pass (not with a KV recompute)
        self.blocks, self.latent_frames, self.stages, self.parallel = blocks, latent_frames, stages, parallel
        self.settings = settings
        self.width, self.height = width, height
        self.preview_w, self.preview_h = preview_size(width, height)
        self.send, self.progress, self.clock = send or client_sender(), progress, clock
        # every pushed (final) block is decoded whole, also after Cancel: a stopped run keeps them
        self.decoding = FrameStreams(
            FrameStream(decoder, on_frames=self._send_frames if preview is None else self._keep, keep=False),
            None if preview is None else FrameStream(preview, on_frames=self._show, keep=False))
        self.frames: list[torch.Tensor] = []  # [F, H, W, 3] per block, the latest keep_frames in all
        self.video: torch.Tensor | None | bool = None  # a known-length run's frames, in place (see _into_video)
        self.keep_frames, self.recording, self.steerable = keep_frames, recording, steerable
        self.compiling = compiling
        self.scheduled = {b: k + 2 for k, b in enumerate(sorted(scheduled))}  # block -> its prompt's number
        self.first_block_s = None  # the engine's seconds to the first generated block (the log's "first block")
        self.frame_count = 0
        self.frame_blocks = 0  # blocks whose frames were sent
        self.done_blocks = 0
        self.start_time = clock()
        self._last_state = None
        self.finished = False
        self.feed = None  # the MJPEG feed of this run, from start() to done()

    def _emit(self, name: str, data: dict) -> None:
        try:
            self.send(EVENT_PREFIX + name, data)
        except Exception as exc:  # noqa: BLE001 - a broken client connection must not stop the run
            log.warning("Block Cascade: could not send %s: %s", name, exc)

    def elapsed(self) -> float:
        return round(self.clock() - self.start_time, 4)

    def meta(self) -> dict:
        """What a client needs to show this run; every event carries it, so a page reloaded during a
        run picks the stream up at its next event."""
        return {"node": self.node, "run": self.run, "blocks": self.blocks,
                "frames_total": video_frames(self.latent_frames), "fps": self.fps, "width": self.preview_w,
                "height": self.preview_h, "stages": self.stages, "parallel": self.parallel,
                "clean_pass": self.clean_pass, "steerable": self.steerable, "compiling": self.compiling,
                "settings": self.settings, **({"live_input": self.live_input} if self.live_input else {})}

    def start(self) -> None:
        self.start_time = self.clock()
        self.feed = mjpeg.open_feed(self.node, self.fps)
        self._emit("start", self.meta())

    def on_tick(self, ev) -> None:
        self.flush()
        for b, _ in ev.pairs:  # a scheduled switch lands as its block enters, and is told like a steered one
            if int(b) in self.scheduled:
                self.switch(int(b), f"scheduled prompt {self.scheduled.pop(int(b))}")
        now = self.clock()
        last = ev.tick == ev.ticks - 1
        if not last and self._last_state is not None and now - self._last_state < STATE_INTERVAL:
            return
        self._last_state = now
        self._emit("state", {**self.meta(), "tick": int(ev.tick), "ticks": int(ev.ticks),
                             "pairs": [[int(b), int(s)] for b, s in ev.pairs],
                             "done_blocks": int(ev.done_blocks), "elapsed": self.elapsed()})

    def show_context(self, latents: torch.Tensor) -> None:
        """Queue the frames of the normalised latents [1, C, F, h, w] that come before block 0 in the
        outputs (a start image, the whole video continued): decoded first, sent as block -1. Call it
        once, after :meth:`start` and before the run's first block; ``latent_frames`` counts them."""
        self.decoding.push(BlockEvent(CONTEXT_BLOCK, latents, -1, 0.0))

    def on_block(self, ev) -> None:
        if self.first_block_s is None:  # before the push: the frames thread reads it
            self.first_block_s = round(float(ev.seconds), 4)
        self.decoding.push(ev)  # decoded on each decoder's own CUDA stream while the DiT goes on (the preview's
        # first), handed out by each stream's thread
        self.done_blocks += 1
        self.compiling = False
        self.flush()
        if self.progress is not None:  # ComfyUI's own bar: blocks of blocks, or (endless) blocks done so far
            self.progress.update_absolute(self.done_blocks, self.blocks or self.done_blocks + 1)

    def flush(self, wait: bool = False) -> None:
        """Raise what sending frames raised, if anything; with ``wait``, first wait until the frames
        of every finished block are sent (they go in block order, from the FrameStream's thread)."""
        self.decoding.poll(wait=wait)

    def finish(self) -> None:
        """Send the frames of every finished block; then :meth:`images` holds them all."""
        self.decoding.finish()

    def _send_frames(self, ev: FramesEvent) -> None:
        """One decoder's frames: the output and the live view."""
        self._show(ev, self._keep(ev))

    def _keep(self, ev: FramesEvent) -> torch.Tensor:
        """The output's frames of a block: recorded, kept for :meth:`images`; returned [N, H, W, 3] in 0..1."""
        frames = ev.frames[0].permute(1, 2, 3, 0)  # [N, H, W, 3] in [-1, 1], host
        if frames.shape[1:3] != (self.height, self.width):
            frames = resize_frames(frames.float(), self.width, self.height)
        if self.recording is not None:
            self.recording.write(ev)
        # to [0, 1] straight into their place (the whole video's tensor, or a new one): one pass there, two in it
        frames = torch.add(frames, 1, out=self._video_slot(frames.shape)).mul_(0.5).clamp_(0, 1)
        self.frames.append(frames)
        self.frame_count += frames.shape[0]
        excess = 0 if self.keep_frames is None else sum(f.shape[0] for f in self.frames) - self.keep_frames
        while excess > 0:  # drop the oldest frames (a view of a block's tensor keeps it until it is all gone)
            oldest = self.frames.pop(0)
            if len(oldest) > excess:
                self.frames.insert(0, oldest[excess:])
            excess -= len(oldest)
        return frames

    def _show(self, ev: FramesEvent, frames: torch.Tensor | None = None) -> None:
        """The live view of a block: JPEGs to the MJPEG feed and a frames event. ``frames``: [N, H, W, 3] in 0..1
        (None: those of ``ev``, the preview decoder's)."""
        if frames is None:
            frames = ev.frames[0].permute(1, 2, 3, 0).float().add(1).mul_(0.5).clamp_(0, 1)
        small = resize_frames(frames, self.preview_w, self.preview_h)
        self.frame_blocks += ev.block != CONTEXT_BLOCK
        jpegs = [encode_jpeg(f) for f in small]
        if self.feed is not None:
            self.feed.publish(jpegs)
        first = {"first_block_s": self.first_block_s} if ev.block != CONTEXT_BLOCK and self.frame_blocks == 1 else {}
        self._emit("frames", {**self.meta(), "block": int(ev.block), "first_frame": int(ev.first_frame),
                              "frames": [base64.b64encode(j).decode("ascii") for j in jpegs],
                              "elapsed": self.elapsed(), **first})

    def switch(self, block: int | None, text: str, dropped: str = "", blend_blocks: int = 0) -> None:
        """Tell the client that a steered prompt ``text`` landed at ``block`` (or, with ``dropped``, why
        it did not), blending over ``blend_blocks`` blocks (sent when > 0)."""
        data = {"node": self.node, "run": self.run, "block": block, "text": text}
        if dropped:
            data["dropped"] = dropped
        if blend_blocks:
            data["blend_blocks"] = blend_blocks
        self._emit("switch", data)

    def done(self, error: str | None = None, stopped: bool = False, video: dict | None = None) -> None:
        """The run's last event, after the frames of the blocks already pushed (the frames thread ends,
        the recording is closed and named); ``stopped``: the run was ended by Cancel (an endless run's normal
        end); ``video``: the MP4 saved of a stopped run of known length ({filename, subfolder, type})."""
        if self.finished:
            return
        self.finished = True
        self.decoding.close()
        mjpeg.close_feed(self.feed)
        data = {"node": self.node, "run": self.run, "seconds": self.elapsed(), "frames": self.frame_count,
                "blocks": self.frame_blocks}
        if self.recording is not None:
            self.recording.close()
            if self.recording.count:
                data["video"] = self.recording.file()
        if video is not None:
            data["video"] = video
        if error is not None:
            data["error"] = error
        elif stopped:
            data["stopped"] = True
        self._emit("done", data)

    def failed(self, exc: BaseException) -> None:
        """The run's last event for a run that ``exc`` ended: one line to the client ("interrupted" for ComfyUI's
        interrupt); the full message and its trace stay in ComfyUI's log."""
        interrupted = type(exc).__name__ == "InterruptProcessingException"
        self.done(error="interrupted" if interrupted else f"{type(exc).__name__}: {first_line(exc)}")

    def _video_slot(self, shape: torch.Size) -> torch.Tensor:
        """Where the next frames [N, H, W, 3] go: in a run of known length, their place in the whole video's tensor
        (filled as they come, in the decoding thread while the model runs, so :meth:`images` has nothing left to
        join at the end: a join of 81 frames at 832x480 is 0.4 GB copied); else a new tensor."""
        total = video_frames(self.latent_frames)
        if self.keep_frames is not None or not total or self.video is False:
            return torch.empty(shape)
        if self.video is None:
            self.video = torch.empty(total, *shape[1:])
        n = self.frame_count
        if n + shape[0] > total or self.video.shape[1:] != shape[1:]:
            self.video = False  # more frames than announced: joined at the end after all
            return torch.empty(shape)
        return self.video[n:n + shape[0]]

    def images(self) -> torch.Tensor:
        if not self.frames:
            return torch.zeros(1, self.height, self.width, 3)
        if isinstance(self.video, torch.Tensor):
            return self.video[:self.frame_count]
        return torch.cat(self.frames)
