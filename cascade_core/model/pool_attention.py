"""Self-attention of a forward's segments over the KV pool (:mod:`model.kv_pool`).

Each segment writes its K/V into its frames' slots, then attends its visible spans: in full, or split
into the keys outside its block and its own (FlashBlock, arXiv 2602.05305), merged by log-sum-exp.

Several processes (:mod:`distributed`): each holds a full replica of the pool and computes only its
*local* segments of a forward. An :class:`Exchange` brings the other segments' K/V of each layer;
while it is in flight a local segment attends to what is already final (committed frames, local
segments) and merges the rest in by log-sum-exp when it arrives. A segment that sees no remote keys
takes exactly the single-process path; so does everything when no exchange is given.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from .attention import attend, attend_lse, merge_attention

if TYPE_CHECKING:
    from .kv_pool import KVPool

# How a segment's self-attention is computed (FlashBlock: arXiv 2602.05305):
FULL = "full"  # all visible keys at once
SPLIT = "split"  # block-external keys and in-block keys apart, merged by log-sum-exp (exact)
STORE = "store"  # like SPLIT, and keep the block-external part for later steps of this block
REUSE = "reuse"  # fresh in-block attention merged with the block-external part kept earlier


def _without(spans: list[tuple[int, int]], own: tuple[int, int]) -> list[tuple[int, int]]:
    """Token spans minus the span ``own`` (the block-external keys)."""
    out = []
    for a, b in spans:
        out += [(lo, hi) for lo, hi in ((a, min(b, own[0])), (max(a, own[1]), b)) if hi > lo]
    return out


def _coalesce(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching spans joined (fewer, longer attention calls)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _minus(spans: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans minus every span of ``cuts``."""
    for cut in cuts:
        spans = _without(spans, cut)
    return _coalesce(spans)


def _within(spans: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``spans`` that lie inside some span of ``cuts`` (cuts are disjoint)."""
    return _coalesce([(max(a, c), min(b, d)) for a, b in spans for c, d in cuts if min(b, d) > max(a, c)])


class Exchange(Protocol):
    """How the K/V of segments computed by other processes arrive (one forward).

    ``start(layer, k, v)`` sends the local segments' k, v [n_local, L, heads, hd] of one layer and
    returns a handle whose ``wait()`` gives (segment index, k [L, heads, hd], v) for every segment
    of the forward that another process computes. Several layers never overlap: each handle is
    waited for before the next start.
    """

    def start(self, layer: int, k: torch.Tensor, v: torch.Tensor): ...


class PoolAttention:
    """Writes each segment's K/V into its slots, then attends each segment over its visible spans.

    All writes of a layer happen before its reads, so within one forward a segment sees the K/V
    that the other segments of the same forward computed (the in-flight blocks' current state).
    With an exchange (several processes), the K/V of non-local segments arrive from it; a local
    segment's attention to keys that are final before they arrive runs while they are in flight.
    """

    def __init__(self, pool: KVPool, writes, reads, modes, slots, local: Sequence[int] | None = None,
                 exchange: Exchange | None = None, anchors: Sequence[tuple[int, int]] = ()):
        self.pool, self.writes, self.reads, self.modes, self.slots = pool, writes, reads, modes, slots
        self.anchors = list(anchors)  # (first token, frames): the sink's K/V copied there, keys re-positioned
        self.local = list(range(len(writes))) if local is None else list(local)
        mine = set(self.local)
        self.remote = [w for i, w in enumerate(writes) if i not in mine]  # written by other processes
        if self.remote and exchange is None:
            raise ValueError("segments computed elsewhere need an exchange that brings their K/V")
        self.exchange = exchange
        # keys final only once the exchange is done: other processes' segments, and the anchors too
        # when one of those segments writes the sink (its block still in flight elsewhere)
        n = pool.layout.sink * pool.layout.tokens_per_frame
        self.anchors_late = bool(self.anchors) and any(a < n for a, _ in self.remote)
        self.late = self.remote + ([(at, at + n) for at, _ in self.anchors] if self.anchors_late else [])

    def _keys(self, layer: int, a: int, b: int):  # pool span -> [1, heads, b-a, hd] (views unless fp8)
        return (self.pool.k.get(layer, a, b).unsqueeze(0).transpose(1, 2),
                self.pool.v.get(layer, a, b).unsqueeze(0).transpose(1, 2))

    def _put(self, layer: int, a: int, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.k.put(layer, a, b, k)
        self.pool.v.put(layer, a, b, v)

    def _receive(self, layer: int, pending) -> None:
        for i, ki, vi in pending.wait():
            self._put(layer, *self.writes[i], ki, vi)

    @torch.compiler.disable
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pending = self.exchange.start(layer, k, v) if self.exchange is not None else None
        for j, i in enumerate(self.local):
            self._put(layer, *self.writes[i], k[j], v[j])
        if not self.anchors_late:
            self._fill_anchors(layer)

        out = torch.empty_like(q)
        later = []  # segments that also see keys still in flight from other processes
        for j, i in enumerate(self.local):
            qi = q[j].unsqueeze(0).transpose(1, 2)  # [1, heads, L, hd]
            waiting = _within(self.reads[i], self.late) if self.modes[i] != REUSE else []
            if waiting:
                later.append((j, i, qi, waiting, self._ready_part(layer, i, qi)))
            else:
                out[j] = self._attend(layer, i, qi)[0].transpose(0, 1)
        if pending is not None:
            self._receive(layer, pending)
        if self.anchors_late:
            self._fill_anchors(layer)
        for j, i, qi, waiting, ready in later:
            out[j] = self._finish(layer, i, qi, waiting, ready)[0].transpose(0, 1)
        return out

    def _fill_anchors(self, layer: int) -> None:
        """Rolling Forcing's anchors: the sink's K (re-positioned) and V copied after the slots."""
        pool = self.pool
        n = pool.layout.sink * pool.layout.tokens_per_frame
        for at, frames in self.anchors:
            self._put(layer, at, at + n, pool.shift_keys(pool.k.get(layer, 0, n), frames), pool.v.get(layer, 0, n))

    def _attend(self, layer: int, i: int, qi: torch.Tensor) -> torch.Tensor:
        """Segment i over its visible spans, every key already in the pool (the single-process path)."""
        pool, spans, mode, slot = self.pool, self.reads[i], self.modes[i], self.slots[i]
        keys = lambda a, b: self._keys(layer, a, b)  # noqa: E731
        if mode == FULL and len(spans) == 1:
            return attend(qi, *keys(*spans[0]))
        if mode == FULL:  # sink + recent window: two spans, merged exactly
            return merge_attention([attend_lse(qi, *keys(a, b)) for a, b in spans])[0]
        own = self.writes[i]
        if mode == REUSE:
            n = qi.shape[2]  # the block's tokens (block 0 may be shorter than the buffer)
            ext = [(pool.ext_out[slot, layer, :, :, :n], pool.ext_lse[slot, layer, :, :, :n])] \
                if pool.ext_present[slot] else []
        else:
            ext_spans = _without(spans, own)
            ext = [merge_attention([attend_lse(qi, *keys(a, b)) for a, b in ext_spans])] if ext_spans else []
            if mode == STORE:
                self._store(layer, slot, ext)
        return merge_attention(ext + [attend_lse(qi, *keys(*own))])[0]

    def _store(self, layer: int, slot: int, ext: list) -> None:
        pool = self.pool
        pool.ext_present[slot] = bool(ext)
        if ext:
            n = ext[0][0].shape[2]
            pool.ext_out[slot, layer, :, :, :n].copy_(ext[0][0])
            pool.ext_lse[slot, layer, :, :, :n].copy_(ext[0][1])

    def _ready_part(self, layer: int, i: int, qi: torch.Tensor):
        """Segment i's (out, lse) pieces over the keys that are final before the exchange ends:
        ([pieces outside the block], the in-block piece or None for FULL)."""
        keys = lambda a, b: self._keys(layer, a, b)  # noqa: E731
        if self.modes[i] == FULL:
            return [attend_lse(qi, *keys(a, b)) for a, b in _minus(self.reads[i], self.late)], None
        own = self.writes[i]
        ext_spans = _minus(_without(self.reads[i], own), self.late)
        return [attend_lse(qi, *keys(a, b)) for a, b in ext_spans], attend_lse(qi, *keys(*own))

    def _finish(self, layer: int, i: int, qi: torch.Tensor, waiting, ready) -> torch.Tensor:
        """Segment i's attention once the keys of other processes' segments are in the pool."""
        pieces, own = ready
        parts = pieces + [attend_lse(qi, *self._keys(layer, a, b)) for a, b in waiting]
        if own is None:  # FULL
            return merge_attention(parts)[0]
        ext = [merge_attention(parts)]  # SPLIT / STORE: everything outside the block
        if self.modes[i] == STORE:
            self._store(layer, self.slots[i], ext)
        return merge_attention(ext + [own])[0]

    def skip(self, layers: int) -> None:
        """Take part in the exchange of every layer of a forward none of whose segments is local."""
        if self.exchange is None:
            return
        a, b = self.writes[0]
        empty = torch.empty(0, b - a, *self.pool.k.shape[2:], dtype=self.pool.dtype, device=self.pool.k.device)
        for layer in range(layers):
            self._receive(layer, self.exchange.start(layer, empty, empty))
