"""The clean latents a run still reads, by video-wide frame index: the whole video, or the last frames
of an endless one.

Guarantees: :class:`LatentWindow` is allocated once (``capacity`` frames); frames are written in
order of their index (a context prefix, then finished blocks, which finish in block order at every
parallelism level); when a write would overflow, the oldest frames are dropped by moving the others
down (whole frames, in place, as the KV pool does), so memory stays flat however long the video runs.
Reading a dropped or unwritten frame raises RuntimeError instead of returning stale values.

What a run reads back (hence the capacity, :func:`held_frames`): a context prefix's frames, read by its
clean passes before block 0; the committed frames a LongLive re-cache runs again, and the context of a
KV recompute (Krea Realtime), both inside the window before the entering block (one block in flight,
so every earlier block is written). A finite run holds its whole video, which is its result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import CascadeConfig


def held_frames(cfg: "CascadeConfig", total: int | None, prefix: int) -> int:
    """Latent frames a run's :class:`LatentWindow` holds: the whole video's ``total`` (prefix included)
    for a run of known length; for an endless one (``total`` None; ``cfg`` has a window, checked by
    :meth:`sampling.config.CascadeConfig.check_run`) the larger of the ``prefix`` and the attended window
    (``cfg.attended_window``) plus, with a KV recompute, one block: its re-encoder may still have to
    decode that far before the context (its first call decodes from frame 0, ceil(K/N) + 1 blocks in;
    later ones up to a block before the context)."""
    if total is not None:
        return total
    reencode_lag = cfg.frames_per_block if cfg.kv_recompute else 0
    return max(cfg.attended_window + reencode_lag, prefix)


class LatentWindow:
    """``capacity`` latent frames [1, channels, capacity, h, w] of ``dtype`` on ``device``, addressed by
    video-wide frame index (see the module docstring)."""

    def __init__(self, capacity: int, channels: int, h: int, w: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.data = torch.empty(1, channels, capacity, h, w, dtype=dtype, device=device)
        self.first = 0  # video-wide index of data[:, :, 0]
        self.end = 0  # one past the last frame written

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def write(self, lo: int, frames: torch.Tensor) -> None:
        """Write ``frames`` [1, channels, n, h, w] as frames [lo, lo + n), ``lo`` the next frame in order
        (RuntimeError otherwise), dropping the oldest frames when the window is full."""
        n = frames.shape[2]
        if lo != self.end:
            raise RuntimeError(f"latent frames are written in order: frame {self.end} is next, got {lo}")
        if n > self.capacity:
            raise RuntimeError(f"{n} frames do not fit a window of {self.capacity}")
        over = lo + n - self.first - self.capacity
        if over > 0:  # drop the oldest `over` frames, moving the rest down in place
            for f in range(self.capacity - over):  # ascending: never overwrites a frame not yet moved
                self.data[:, :, f] = self.data[:, :, f + over]
            self.first += over
        self.data[:, :, lo - self.first:lo - self.first + n] = frames
        self.end = lo + n

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """A view of frames [lo, hi) [1, channels, hi - lo, h, w]; RuntimeError unless all are held."""
        if lo < self.first or hi > self.end or lo > hi:
            raise RuntimeError(f"latent frames {lo}..{hi - 1} are not held (held: {self.first}..{self.end - 1})")
        return self.data[:, :, lo - self.first:hi - self.first]

    def last(self, frames: int) -> tuple[int, torch.Tensor]:
        """(index of the first, view) of the last ``frames`` frames written, or of all held when fewer."""
        lo = max(self.first, self.end - frames)
        return lo, self.read(lo, self.end)
