"""Self-attention keys and values of one video, allocated once per run.

Frames live in *slots* of tokens_per_frame tokens: the sink frames (never evicted) in slots
[0, sink), then a contiguous run of recent frames. A block's K/V are written into its frames' slots
at every stage it runs (noisy while in flight, clean after its clean pass), so "committed" and
"in flight" are the same storage at different moments.

What a block's queries see (frames, absolute indices; W = window, S = sink, end = the block's end):
- without a window: every frame before ``hi``;
- with a window: frames [0, S) and [end - (W - S), hi) -- the LongLive / reference rolling cache,
  W counting the sink and the block itself;
- ``hi`` is the block's own end (causal, and always for a clean pass) or the end of the newest block
  in flight (bidirectional in-flight attention).

Guarantees: no allocation after construction; when the run of recent frames would overflow, frames no
in-flight block can see any more are dropped by moving the others down (whole frames, in place).
With ``keep_external`` the pool also holds, per in-flight block and layer, the attention output and
log-sum-exp of its queries over the keys outside the block (FlashBlock reuse).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attend, attend_lse, merge_attention

# How a segment's self-attention is computed (FlashBlock: arXiv 2602.05305):
FULL = "full"  # all visible keys at once
SPLIT = "split"  # block-external keys and in-block keys apart, merged by log-sum-exp (exact)
STORE = "store"  # like SPLIT, and keep the block-external part for later steps of this block
REUSE = "reuse"  # fresh in-block attention merged with the block-external part kept earlier
MODES = (FULL, SPLIT, STORE, REUSE)


@dataclass(frozen=True)
class PoolLayout:
    frames_per_block: int
    tokens_per_frame: int
    total_frames: int
    window: int | None = None  # latent frames a block attends to, sink and itself included
    sink: int = 0
    max_in_flight: int = 1

    def __post_init__(self):
        fpb = self.frames_per_block
        if self.window is not None:
            if self.window < self.sink + fpb:
                raise ValueError(f"window ({self.window} frames) must hold the sink ({self.sink}) and a "
                                 f"whole block ({fpb}): at least {self.sink + fpb}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")

    @property
    def capacity_frames(self) -> int:
        if self.window is None:
            return self.total_frames
        return min(self.total_frames, self.window + (self.max_in_flight - 1) * self.frames_per_block)

    def visible_frames(self, block: int, hi: int) -> list[tuple[int, int]]:
        """Frame ranges [lo, hi) seen by ``block``'s queries when the visible run ends at frame ``hi``."""
        end = (block + 1) * self.frames_per_block
        if self.window is None:
            return [(0, hi)]
        lo = max(0, end - (self.window - self.sink))
        if lo <= self.sink:
            return [(0, hi)]
        return [(0, self.sink), (lo, hi)] if self.sink else [(lo, hi)]


class KVPool:
    """Preallocated per-layer K/V [layers, slots*tokens_per_frame, heads, head_dim] (see module doc)."""

    def __init__(self, layout: PoolLayout, layers: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, keep_external: bool = False):
        self.layout = layout
        tokens = layout.capacity_frames * layout.tokens_per_frame
        self.k = torch.zeros(layers, tokens, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        if keep_external:  # [in-flight slot, layer, 1, heads, block tokens, (head_dim)]
            block_tokens = layout.frames_per_block * layout.tokens_per_frame
            shape = (layout.max_in_flight, layers, 1, heads, block_tokens)
            self.ext_out = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
            self.ext_lse = torch.zeros(*shape, dtype=torch.float32, device=device)
            self.ext_present = [False] * layout.max_in_flight
        self.base = layout.sink  # frame held in the first slot after the sink
        self.stored_end = 0  # frames [.., stored_end) have been written at least once

    # ---- frame <-> slot ---------------------------------------------------------------------------
    def slot(self, frame: int) -> int:
        s = self.layout.sink
        if frame < s:
            return frame
        if frame < self.base:
            raise RuntimeError(f"frame {frame} was evicted (oldest held: {self.base})")
        return s + frame - self.base

    def token_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Token span of frames [lo, hi) (which must be held contiguously)."""
        tpf = self.layout.tokens_per_frame
        a = self.slot(lo) * tpf
        b = a + (hi - lo) * tpf
        if hi > lo and self.slot(hi - 1) * tpf != b - tpf:
            raise RuntimeError(f"frames {lo}..{hi - 1} are not held contiguously")
        return a, b

    def held_frames(self) -> list[int]:
        """Absolute indices of the frames whose K/V the pool holds now, in slot order."""
        lay = self.layout
        sink = list(range(min(lay.sink, self.stored_end)))
        return sink + list(range(max(self.base, lay.sink), self.stored_end))

    # ---- eviction ---------------------------------------------------------------------------------
    def make_room(self, oldest_block: int, newest_block: int) -> None:
        """Ensure the newest block's frames have slots, dropping frames the oldest block can't see."""
        lay = self.layout
        fpb = lay.frames_per_block
        new_end = (newest_block + 1) * fpb
        if lay.sink + new_end - self.base <= lay.capacity_frames:
            return
        oldest_end = (oldest_block + 1) * fpb
        keep_from = max(lay.sink, oldest_end - (lay.window - lay.sink))
        if lay.sink + new_end - keep_from > lay.capacity_frames:
            raise RuntimeError("KV pool too small for the blocks in flight")
        tpf = lay.tokens_per_frame
        for f in range(keep_from, min(self.stored_end, newest_block * fpb)):
            dst, src = (lay.sink + f - keep_from) * tpf, self.slot(f) * tpf
            if dst != src:  # ascending whole-frame moves never overwrite an unread source
                self.k[:, dst:dst + tpf] = self.k[:, src:src + tpf]
                self.v[:, dst:dst + tpf] = self.v[:, src:src + tpf]
        self.base = keep_from

    # ---- attention --------------------------------------------------------------------------------
    def attention(self, blocks: list[int], hi_frames: list[int], modes: list[str] | None = None) -> "PoolAttention":
        """Self-attention context for a forward of segments ``blocks`` (one block each).

        hi_frames[i]: end of the run of frames segment i sees (its own end for causal attention and
        clean passes; the newest in-flight block's end for bidirectional attention).
        modes[i]: how segment i attends (FULL, SPLIT, STORE, REUSE; default FULL).
        """
        fpb = self.layout.frames_per_block
        writes = [self.token_range(b * fpb, (b + 1) * fpb) for b in blocks]
        self.stored_end = max(self.stored_end, max((b + 1) * fpb for b in blocks))
        reads = [[self.token_range(lo, hi) for lo, hi in self.layout.visible_frames(b, hi)]
                 for b, hi in zip(blocks, hi_frames)]
        modes = modes or [FULL] * len(blocks)
        slots = [b % self.layout.max_in_flight for b in blocks]
        return PoolAttention(self, writes, reads, modes, slots)


def _without(spans: list[tuple[int, int]], own: tuple[int, int]) -> list[tuple[int, int]]:
    """Token spans minus the span ``own`` (the block-external keys)."""
    out = []
    for a, b in spans:
        out += [(lo, hi) for lo, hi in ((a, min(b, own[0])), (max(a, own[1]), b)) if hi > lo]
    return out


class PoolAttention:
    """Writes each segment's K/V into its slots, then attends each segment over its visible spans.

    All writes of a layer happen before its reads, so within one forward a segment sees the K/V
    that the other segments of the same forward computed (the in-flight blocks' current state).
    """

    def __init__(self, pool: KVPool, writes, reads, modes, slots):
        self.pool, self.writes, self.reads, self.modes, self.slots = pool, writes, reads, modes, slots

    @torch.compiler.disable
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        pk, pv = pool.k[layer], pool.v[layer]  # [tokens, heads, hd]
        for i, (a, b) in enumerate(self.writes):
            pk[a:b] = k[i]
            pv[a:b] = v[i]

        def keys(a: int, b: int):  # pool span -> [1, heads, b-a, hd] views
            return pk[a:b].unsqueeze(0).transpose(1, 2), pv[a:b].unsqueeze(0).transpose(1, 2)

        out = torch.empty_like(q)
        for i, spans in enumerate(self.reads):
            qi = q[i].unsqueeze(0).transpose(1, 2)  # [1, heads, L, hd]
            mode, slot = self.modes[i], self.slots[i]
            if mode == FULL and len(spans) == 1:
                o = attend(qi, *keys(*spans[0]))
            elif mode == FULL:  # sink + recent window: two spans, merged exactly
                o = merge_attention([attend_lse(qi, *keys(a, b)) for a, b in spans])[0]
            else:
                own = self.writes[i]
                if mode == REUSE:
                    ext = [(pool.ext_out[slot, layer], pool.ext_lse[slot, layer])] if pool.ext_present[slot] else []
                else:
                    ext_spans = _without(spans, own)
                    ext = [merge_attention([attend_lse(qi, *keys(a, b)) for a, b in ext_spans])] if ext_spans else []
                    if mode == STORE:
                        pool.ext_present[slot] = bool(ext)
                        if ext:
                            pool.ext_out[slot, layer].copy_(ext[0][0])
                            pool.ext_lse[slot, layer].copy_(ext[0][1])
                o = merge_attention(ext + [attend_lse(qi, *keys(*own))])[0]
            out[i] = o[0].transpose(0, 1)
        return out
