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
Why eviction moves frames instead of wrapping around a ring: with a window the pool holds at most
window + (in flight - 1) * block frames, so memory is bounded however long the video runs, and the
move happens about once per block. At 1.3B and 832x480 one latent frame's K/V over all layers is
30 layers x 1560 tokens x 1536 x 2 bytes x 2 = 288 MB; with a LongLive-style window (12 frames, sink
3, blocks of 3) a block moves 6 frames on average at P1 and 16 at P5: 1.7-4.6 GB moved, 3.5-9.2 GB
of memory traffic, about 0.7-1.9 ms at an H200's 4.8 TB/s, against about 0.45 s of compute per
emitted block (the median P5 tick): under 0.5 %. A ring saves the move but splits the keys of every
segment whose window crosses the wrap point into one more span, in every layer: one more attention
call and a log-sum-exp merge that reads and writes float32 outputs (4680 queries x 1536 x 4 bytes =
29 MB per piece) up to 30 x 5 times per tick, about as much traffic as the move and more kernel
launches; and a block's own span could wrap too (FlashBlock's in-block attention and the exchange
write one span per block).
RoPE positions (``slot_positions``): by default a frame's keys are rotated at its absolute index. With
slot positions (Reward Forcing's relative positions) they are rotated at the frame's slot, so the keys a
block attends at P1 ([sink | recent frames], contiguous from slot 0) sit at 0..F-1 and the block itself
at the last positions; a move down by d slots re-rotates the moved keys by -d frames.
EMA sink (``sink_ema`` = a > 0): when an eviction drops a span of the sink's size, the sink's K and V
become a*sink + (1-a)*dropped (K compared at the sink's positions: the dropped keys are re-rotated
first), before the forward that needed the room attends.
A context prefix (``prefix_frames`` = F) is frames [0, F) of the video, written before block 0 as the
finished blocks it is made of (:meth:`grid.BlockGrid.prefix_chunks`, one clean forward each,
:meth:`KVPool.clean_attention`) and held like any other frames: the sink may hold them and the window
drops them as it drops any frame.
A KV recompute (Krea Realtime, :mod:`sampling.recompute`) rewrites, before a block, the K/V of the context
frames it will see with a forward that attends those frames only (:meth:`KVPool.context_attention`);
with slot positions and a window of the context and the block, they sit at positions 0.. again.
A pinned block (``pinned`` frames, LongLive 2.0's multi-shot sink: :meth:`KVPool.pin`) is a copy of a scene cut's
first frames kept after the slots; a block whose recent run has passed them sees the sink, them, and the rest of
its recent run (it gives up as many of its oldest frames).
With ``keep_external`` the pool also holds, per in-flight block and layer, the attention output and
log-sum-exp of its queries over the keys outside the block (FlashBlock reuse).
Attention over the pool (the segments of a forward, FlashBlock, several processes): :mod:`model.pool_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .grid import BlockGrid
from .kv_store import KV_DTYPES, KVStore
from .pool_attention import FULL, PoolAttention

if TYPE_CHECKING:
    from .pool_attention import Exchange



def check_window(window: int | None, sink: int, frames_per_block: int, unlimited: str | None = None) -> None:
    """The one check of a local window and its sink (latent frames): sink >= 0, a sink only with a
    window (without one every frame is attended anyway, so a sink would silently do nothing), and a
    window (None = unlimited) must hold the sink and one whole block. ``unlimited``: how the caller
    spells "no window" (e.g. "0" for a widget where 0 means unlimited), named in the message.
    Raises ValueError."""
    if sink < 0:
        raise ValueError(f"sink must be >= 0 latent frames, got {sink}")
    if window is None and sink:
        spelled = f"window {unlimited} (unlimited)" if unlimited else "no window"
        raise ValueError(f"a sink ({sink} frames) is kept only inside a local window, and with {spelled} every "
                         f"frame is attended anyway: set a window (e.g. window 12 with sink 3) or sink 0")
    if window is not None and window < sink + frames_per_block:
        lead = f"be {unlimited} (unlimited) or" if unlimited else "hold the sink and one block:"
        raise ValueError(f"window must {lead} at least sink + one block = {sink + frames_per_block} latent "
                         f"frames (sink {sink}, blocks of {frames_per_block}), got {window}")


@dataclass(frozen=True)
class PoolLayout:
    frames_per_block: int
    tokens_per_frame: int
    total_frames: int | None  # the video's latent frames, context prefix included (None: endless)
    window: int | None = None  # latent frames a block attends to, sink and itself included
    sink: int = 0
    max_in_flight: int = 1
    first_block_frames: int | None = None  # block 0's frames (1: an independent first frame); None: the same
    rolling: bool = False  # Rolling Forcing's window (see visible_frames)
    prefix_frames: int = 0  # a context prefix: frames [0, prefix_frames) before block 0

    def __post_init__(self):
        check_window(self.window, self.sink, self.frames_per_block)
        if self.total_frames is None and self.window is None:
            raise ValueError("an endless video needs a window (the pool holds what a block attends)")

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.frames_per_block, self.first_block_frames or self.frames_per_block, self.prefix_frames)

    @property
    def capacity_frames(self) -> int:
        if self.window is None:
            return self.total_frames
        rolling_clean = self.sink if self.rolling else 0  # a clean pass's window reaches past the sink
        blocks = self.window + rolling_clean + (self.max_in_flight - 1) * self.frames_per_block
        return blocks if self.total_frames is None else min(self.total_frames, blocks)

    def visible_frames(self, end: int, hi: int, clean: bool = False) -> list[tuple[int, int]]:
        """Frame ranges [lo, hi) seen by the queries of a block ending at frame ``end`` when the visible
        run ends at frame ``hi`` (``clean``: a clean pass, which sees up to its own end).

        Rolling window (Rolling Forcing, ``pipeline/rolling_forcing_inference.py`` and
        ``wan/modules/causal_model.py`` of TencentARC/RollingForcing): a denoising step sees the sink and
        the last window - sink frames before ``hi`` (the window's frames are counted from the newest
        block in flight, not from the block's own end); a clean pass sees the last ``window`` frames
        before its end and no separate sink. See :meth:`anchor_shift` for where the sink sits."""
        if self.window is None:
            return [(0, hi)]
        if self.rolling and clean:
            return [(max(0, end - self.window), end)]
        lo = max(0, (hi if self.rolling else end) - (self.window - self.sink))
        if lo <= self.sink:
            return [(0, hi)]
        return [(0, self.sink), (lo, hi)] if self.sink else [(lo, hi)]

    def anchor_shift(self, end: int, hi: int, clean: bool = False) -> int:
        """Frames by which the sink's keys are re-positioned for these queries: with a rolling window a
        denoising step sees the sink right before its recent run (Rolling Forcing's anchor), else 0."""
        spans = self.visible_frames(end, hi, clean)
        return spans[1][0] - self.sink if self.rolling and not clean and len(spans) == 2 and self.sink else 0


class KVPool:
    """Preallocated per-layer K/V [layers, slots*tokens_per_frame, heads, head_dim] (see module doc).

    ``slot_positions``: keys are RoPE'd at their slot rather than their frame; ``sink_ema``: the EMA
    sink's weight a (0 = off); both need ``shift_keys`` (k [tokens, heads, hd], delta frames) -> k
    re-rotated by delta (:meth:`~cascade_core.model.dit.WanModel.shift_frames`). Raises ValueError otherwise.
    ``kv_dtype``: "default" stores K/V in ``dtype``; "fp8" as fp8 e4m3 with a scale per token and head
    (:class:`model.kv_store.KVStore`; about half the memory, reads widened per attention call).
    ``pinned``: frames of room for a pinned block (:meth:`pin`; 0: none)."""

    def __init__(self, layout: PoolLayout, layers: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, keep_external: bool = False,
                 slot_positions: bool = False, sink_ema: float = 0.0,
                 shift_keys: Callable[[torch.Tensor, int], torch.Tensor] | None = None, kv_dtype: str = "default",
                 pinned: int = 0):
        if (slot_positions or sink_ema) and shift_keys is None:
            raise ValueError("slot positions and an EMA sink re-rotate keys: pass shift_keys")
        self.layout = layout
        self.slot_positions, self.sink_ema, self.shift_keys = slot_positions, sink_ema, shift_keys
        if layout.rolling and shift_keys is None:
            raise ValueError("a rolling window re-positions the sink's keys: pass shift_keys")
        # a rolling window also keeps, per in-flight block, the sink's keys re-positioned ("anchors")
        anchors = layout.sink * layout.max_in_flight if layout.rolling else 0
        tokens = (layout.capacity_frames + anchors + pinned) * layout.tokens_per_frame
        self.pin_room, self.pin_at = pinned, tokens - pinned * layout.tokens_per_frame  # frames, first token
        self.pinned: tuple[int, int] | None = None  # frames [lo, hi) copied there (pin)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.dtype = dtype
        self.k, self.v = (KVStore(layers, tokens, heads, head_dim, dtype, device, kv_dtype == "fp8") for _ in "kv")
        if keep_external:  # [in-flight slot, layer, 1, heads, block tokens, (head_dim)]
            block_tokens = max(layout.grid.first, layout.grid.frames) * layout.tokens_per_frame
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

    def position(self, frame: int) -> int:
        """The RoPE frame position of a held frame's keys: its slot with slot positions, else itself."""
        return self.slot(frame) if self.slot_positions else frame

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
        """Ensure the newest block's frames have slots, dropping frames the oldest block can't see
        (blended into an EMA sink first, moved keys re-rotated with slot positions: module doc)."""
        grid = self.layout.grid
        self._make_room(grid.end(oldest_block), grid.start(newest_block), grid.end(newest_block))

    def _make_room(self, oldest_end: int, new_start: int, new_end: int) -> None:
        """Slots for frames [new_start, new_end), dropping frames a block ending at ``oldest_end`` can't see."""
        lay = self.layout
        if lay.sink + new_end - self.base <= lay.capacity_frames:
            return
        keep_from = max(lay.sink, oldest_end - (lay.window if lay.rolling else lay.window - lay.sink))
        if lay.sink + new_end - keep_from > lay.capacity_frames:
            raise RuntimeError("KV pool too small for the blocks in flight")
        if self.sink_ema and min(keep_from, self.stored_end) > self.base:
            self._fold_into_sink(self.base, min(keep_from, self.stored_end))
        tpf = lay.tokens_per_frame
        for f in range(keep_from, min(self.stored_end, new_start)):
            dst, src = (lay.sink + f - keep_from) * tpf, self.slot(f) * tpf
            if dst != src:  # ascending whole-frame moves never overwrite an unread source
                if self.slot_positions:  # per layer: float32 temporaries of one frame of one layer
                    for layer in range(self.k.shape[0]):
                        shifted = self.shift_keys(self.k.get(layer, src, src + tpf), (dst - src) // tpf)
                        self.k.put(layer, dst, dst + tpf, shifted)
                else:
                    self.k.move(dst, src, tpf)
                self.v.move(dst, src, tpf)
        self.base = keep_from

    def _fold_into_sink(self, lo: int, hi: int) -> None:
        """EMA sink: blend the dropped frames [lo, hi) into the sink, K re-rotated to the sink's
        positions first; as three rounded ops in the pool's dtype (a*sink, (1-a)*dropped, the sum).
        RuntimeError unless the span has the sink's size (CascadeConfig.validate refuses such runs)."""
        sink, tpf, a = self.layout.sink, self.layout.tokens_per_frame, self.sink_ema
        if hi - lo != sink:
            raise RuntimeError(f"an EMA sink of {sink} frames cannot take {hi - lo} dropped frames")
        src, n = self.slot(lo) * tpf, sink * tpf
        for layer in range(self.k.shape[0]):
            dropped_k = self.shift_keys(self.k.get(layer, src, src + n), -self.position(lo))
            self.k.put(layer, 0, n, self.k.get(layer, 0, n).mul_(a).add_(dropped_k * (1 - a)))
            self.v.put(layer, 0, n, self.v.get(layer, 0, n).mul_(a).add_(self.v.get(layer, src, src + n) * (1 - a)))

    # ---- attention --------------------------------------------------------------------------------
    def attention(self, blocks: list[int], hi_frames: list[int], modes: list[str] | None = None,
                  local: Sequence[int] | None = None, exchange: "Exchange | None" = None,
                  clean: Sequence[bool] | None = None) -> "PoolAttention":
        """Self-attention context for a forward of segments ``blocks`` (one block each).

        hi_frames[i]: end of the run of frames segment i sees (its own end for causal attention and
        clean passes; the newest in-flight block's end for bidirectional attention).
        modes[i]: how segment i attends (FULL, SPLIT, STORE, REUSE; default FULL).
        local: indices of the segments this process computes (default: all); the forward's q/k/v hold
        only those, in this order. exchange: brings the other segments' K/V (required when some
        segments are not local). clean[i]: segment i is a clean pass (default: none is).
        """
        lay, grid = self.layout, self.layout.grid
        clean = clean or [False] * len(blocks)
        writes = [self.token_range(grid.start(b), grid.end(b)) for b in blocks]
        self.stored_end = max(self.stored_end, max(grid.end(b) for b in blocks))
        reads, anchors = [], {}  # anchors: re-positioning (frames) -> first token of its copy of the sink
        sink_span = (0, lay.sink * lay.tokens_per_frame)
        for b, hi, c in zip(blocks, hi_frames, clean):
            spans = self._spans(lay.visible_frames(grid.end(b), hi, c))
            shift = lay.anchor_shift(grid.end(b), hi, c)
            if shift:  # the sink's keys, re-positioned, in an anchor region after the pool's slots
                at = anchors.setdefault(shift, (lay.capacity_frames + lay.sink * len(anchors)) * lay.tokens_per_frame)
                spans = [(at, at + sink_span[1]) if s == sink_span else s for s in spans]
            reads.append(spans)
        modes = modes or [FULL] * len(blocks)
        slots = [b % lay.max_in_flight for b in blocks]
        return PoolAttention(self, writes, reads, modes, slots, local, exchange,
                             anchors=[(at, shift) for shift, at in anchors.items()])

    def pin(self, lo: int, hi: int) -> None:
        """LongLive 2.0's multi-shot sink: the K/V of the held frames [lo, hi) (a scene cut's first frames, after
        its clean pass) copied to the pinned room, replacing what was pinned before. From then on a block whose
        recent run starts at or after ``hi`` sees the sink, these frames, and its recent run less its oldest
        hi - lo frames, in that order: the reference's pinned chunk, kept beside its global sink once the rolling
        cache would drop it (NVlabs/LongLive@7860ad9 ``wan_5b/modules/causal_model.py:499-534, 548-600``,
        ``pipeline/causal_diffusion_inference.py:659-664, 1017-1033``). RuntimeError beyond the room."""
        if hi - lo > self.pin_room:
            raise RuntimeError(f"the pool has room for {self.pin_room} pinned frames, not {hi - lo}")
        a, b = self.token_range(lo, hi)
        self.k.move(self.pin_at, a, b - a)
        self.v.move(self.pin_at, a, b - a)
        self.pinned = (lo, hi)

    def _spans(self, frames: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Token spans of visible frame ranges ([sink, recent run] or one run), the pinned frames (:meth:`pin`)
        put after the sink where the recent run has passed them."""
        if self.pinned is None or len(frames) != 2 or self.pinned[1] > frames[1][0]:
            return [self.token_range(lo, top) for lo, top in frames]
        n = self.pinned[1] - self.pinned[0]
        return [self.token_range(*frames[0]), (self.pin_at, self.pin_at + n * self.layout.tokens_per_frame),
                self.token_range(frames[1][0] + n, frames[1][1])]

    def clean_attention(self, lo: int, hi: int) -> "PoolAttention":
        """Context of a clean forward over frames [lo, hi) as one finished block (a context prefix's
        blocks, :meth:`grid.BlockGrid.prefix_chunks`): makes room for them, writes their K/V and
        attends what a clean pass of a block ending at ``hi`` sees (:meth:`PoolLayout.visible_frames`),
        their own frames included."""
        self._make_room(hi, lo, hi)
        writes = [self.token_range(lo, hi)]
        self.stored_end = max(self.stored_end, hi)
        reads = [self.token_range(a, b) for a, b in self.layout.visible_frames(hi, hi, clean=True)]
        return PoolAttention(self, writes, [reads], [FULL], [0])

    def context_attention(self, lo: int, hi: int, since: int) -> "PoolAttention":
        """Context of a forward over the held frames [lo, hi) that rewrites their K/V and attends frames
        [since, hi) only (a KV recompute's context, written from its first frame ``since``: the frames
        before it stay unseen)."""
        return PoolAttention(self, [self.token_range(lo, hi)], [[self.token_range(since, hi)]], [FULL], [0])

    def recache_attention(self, end: int) -> "tuple[int, PoolAttention] | None":
        """Context of a re-cache forward over the committed frames a block starting at frame ``end``
        will see (LongLive's KV re-cache at a prompt switch). Returns (lo, context): the forward runs
        frames [lo, end) as one segment, writes their K/V and attends the sink and [lo, end); None when
        no such frame is held.

        [lo, end) is the last visible run of a block ending at ``end`` (sink kept apart when the
        window has passed it), so LongLive's default (window 12, sink 3: the 9 frames before the
        switch, old-prompt sink kept) is reproduced; frames the pool already evicted are left out."""
        spans = self.layout.visible_frames(end, end)
        lo = spans[-1][0]
        if len(spans) > 1 or lo >= self.layout.sink:  # a separate sink: only frames still held count
            lo = max(lo, self.base)
        if lo >= end:
            return None
        reads = [self.token_range(a, min(b, end)) for a, b in spans[:-1]] + [self.token_range(lo, end)]
        return lo, PoolAttention(self, [self.token_range(lo, end)], [reads], [FULL], [0])
