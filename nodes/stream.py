"""Frames out of finished blocks, and the widget events that carry them.

Event contract (JSON only, sent to the client that queued the prompt):
  block_cascade.start  {node, run, blocks, frames_total, fps, width, height, stages, parallel}
  block_cascade.state  {node, run, tick, ticks, pairs: [[block, stage], ...], done_blocks, elapsed}
  block_cascade.frames {node, run, block, first_frame, frames: [base64 JPEG, ...], elapsed}
  block_cascade.done   {node, run, seconds, frames, error?}
``width``/``height`` are those of the preview JPEGs (longest side <= PREVIEW_MAX). State events are
rate-limited (at most one per STATE_INTERVAL seconds, the last tick always); frames go once per block.

Wan2.1's VAE turns latent frame 0 into 1 video frame and every later latent frame into 4, so block b
of F latent frames starts at video frame 0 (b = 0) or 1 + 4*(b*F - 1).
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

log = logging.getLogger("block_cascade")

FPS = 16
PREVIEW_MAX = 320
JPEG_QUALITY = 80
STATE_INTERVAL = 0.1
EVENT_PREFIX = "block_cascade."


def video_frames(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


def block_frame_range(block: int, frames_per_block: int) -> tuple[int, int]:
    """(first video frame, number of video frames) of a block."""
    start = video_frames(block * frames_per_block) if block else 0
    return start, video_frames((block + 1) * frames_per_block) - start


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


def encode_jpeg(frame: torch.Tensor, quality: int = JPEG_QUALITY) -> str:
    """One frame [H, W, 3] in 0..1 -> base64 JPEG text."""
    from PIL import Image

    arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = _io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[F, H, W, 3] -> [F, height, width, 3] (area-averaged when shrinking, bilinear when growing)."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    shrink = height <= x.shape[2] and width <= x.shape[3]
    x = F.interpolate(x, size=(height, width), mode="area" if shrink else "bilinear",
                      **({} if shrink else {"align_corners": False}))
    return x.permute(0, 2, 3, 1)


class LatentPreview:
    """Cheap latent -> RGB without a VAE: a linear map of the 16 channels, upscaled to the video size.

    The map comes from ComfyUI's own Wan2.1 latent format (the one its sampler previews use) when
    available, otherwise a grey level from the channel mean.
    """

    def __init__(self, width: int, height: int, frames_per_block: int):
        self.width, self.height, self.fpb = width, height, frames_per_block
        self.factors, self.bias = None, None
        try:
            from comfy.latent_formats import Wan21
            fmt = Wan21()
            self.factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [16, 3]
            if getattr(fmt, "latent_rgb_factors_bias", None) is not None:
                self.bias = torch.tensor(fmt.latent_rgb_factors_bias, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - only outside ComfyUI or if its format moved
            pass

    def __call__(self, block: int, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, 16, F, h, w] of one block -> frames [N, H, W, 3] in 0..1."""
        z = z[0].float().cpu()  # [16, F, h, w]
        if self.factors is not None and self.factors.shape[0] == z.shape[0]:
            rgb = torch.einsum("cfhw,cr->frhw", z, self.factors)
            if self.bias is not None:
                rgb = rgb + self.bias.view(1, 3, 1, 1)
        else:
            rgb = z.mean(0, keepdim=True).transpose(0, 1).expand(-1, 3, -1, -1) * 0.5
        rgb = ((rgb + 1) / 2).clamp(0, 1)  # [F, 3, h, w]
        rgb = F.interpolate(rgb, size=(self.height, self.width), mode="bilinear", align_corners=False)
        repeats = torch.full((rgb.shape[0],), 4, dtype=torch.long)
        if block == 0:
            repeats[0] = 1
        return rgb.repeat_interleave(repeats, dim=0).permute(0, 2, 3, 1).clamp(0, 1)


class VAEFrames:
    """Streamed decoding with cascade_core's Wan2.1 decoder (its causal cache carried across blocks).

    On CUDA a block's decode is queued on the decoder's own CUDA stream and overlaps the next ticks of
    the DiT; :meth:`__call__` returns a handle whose frames are fetched once ready.
    """

    def __init__(self, decoder):
        self.stream = decoder.stream()

    def __call__(self, block: int, z: torch.Tensor):
        return _Decoding(self.stream.decode_async(z))


class _Decoding:
    def __init__(self, handle):
        self.handle = handle

    def ready(self) -> bool:
        return self.handle.ready()

    def frames(self) -> torch.Tensor:
        x = self.handle.result()  # [1, 3, N, H, W] in -1..1
        return ((x[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()


class _Ready:
    def __init__(self, frames: torch.Tensor):
        self._frames = frames

    def ready(self) -> bool:
        return True

    def frames(self) -> torch.Tensor:
        return self._frames


class Reporter:
    """Sends the widget events of one run and collects the frames (see the module docstring)."""

    def __init__(self, node: str, blocks: int, frames_per_block: int, stages: int, parallel: int,
                 width: int, height: int, to_frames: Callable[[int, torch.Tensor], torch.Tensor],
                 send: Callable[[str, dict], None] | None = None, progress=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.node, self.run = str(node), uuid.uuid4().hex[:12]
        self.blocks, self.fpb, self.stages, self.parallel = blocks, frames_per_block, stages, parallel
        self.width, self.height = width, height
        self.preview_w, self.preview_h = preview_size(width, height)
        self.to_frames, self.send, self.progress, self.clock = to_frames, send or client_sender(), progress, clock
        self.frames: list[torch.Tensor] = []
        self.pending: list = []  # (block, frames or pending decode), oldest first
        self.frame_count = 0
        self.done_blocks = 0
        self.start_time = clock()
        self._last_state = None
        self.finished = False

    def _emit(self, name: str, data: dict) -> None:
        try:
            self.send(EVENT_PREFIX + name, data)
        except Exception as exc:  # noqa: BLE001 - a broken client connection must not stop the run
            log.warning("Block Cascade: could not send %s: %s", name, exc)

    def elapsed(self) -> float:
        return round(self.clock() - self.start_time, 4)

    def start(self) -> None:
        self.start_time = self.clock()
        self._emit("start", {"node": self.node, "run": self.run, "blocks": self.blocks,
                             "frames_total": video_frames(self.blocks * self.fpb), "fps": FPS,
                             "width": self.preview_w, "height": self.preview_h, "stages": self.stages,
                             "parallel": self.parallel})

    def on_tick(self, ev) -> None:
        self.flush()
        now = self.clock()
        last = ev.tick == ev.ticks - 1
        if not last and self._last_state is not None and now - self._last_state < STATE_INTERVAL:
            return
        self._last_state = now
        self._emit("state", {"node": self.node, "run": self.run, "tick": int(ev.tick), "ticks": int(ev.ticks),
                             "pairs": [[int(b), int(s)] for b, s in ev.pairs],
                             "done_blocks": int(ev.done_blocks), "elapsed": self.elapsed()})

    def on_block(self, ev) -> None:
        out = self.to_frames(ev.block, ev.latents)  # frames [N, H, W, 3] in 0..1, or a pending decode
        self.pending.append((ev.block, out if hasattr(out, "ready") else _Ready(out)))
        self.done_blocks += 1
        self.flush()
        if self.progress is not None:
            self.progress.update_absolute(self.done_blocks, self.blocks)

    def flush(self, wait: bool = False) -> None:
        """Send the frames of finished blocks whose decode is done (all of them when ``wait``), in order."""
        while self.pending and (wait or self.pending[0][1].ready()):
            block, item = self.pending.pop(0)
            self._send_frames(block, item.frames())

    def finish(self) -> None:
        self.flush(wait=True)

    def _send_frames(self, block: int, frames: torch.Tensor) -> None:
        first, count = block_frame_range(block, self.fpb)
        if frames.shape[0] != count:
            log.warning("Block Cascade: block %d gave %d frames, expected %d", block, frames.shape[0], count)
        frames = resize_frames(frames, self.width, self.height).float().contiguous()
        self.frames.append(frames)
        self.frame_count += frames.shape[0]
        small = resize_frames(frames, self.preview_w, self.preview_h)
        self._emit("frames", {"node": self.node, "run": self.run, "block": int(block), "first_frame": first,
                              "frames": [encode_jpeg(f) for f in small], "elapsed": self.elapsed()})

    def done(self, error: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        data = {"node": self.node, "run": self.run, "seconds": self.elapsed(), "frames": self.frame_count}
        if error is not None:
            data["error"] = error
        self._emit("done", data)

    def images(self) -> torch.Tensor:
        if not self.frames:
            return torch.zeros(1, self.height, self.width, 3)
        return torch.cat(self.frames)
