"""StreamDiffusionV2's self-attention KV cache, with its rules and quirks as its code runs them.

Source: chenfengxu714/StreamDiffusionV2@c5a0f20, ``models/wan/causal_model.py:268-384``
(``CausalWanSelfAttention.forward`` with a ``kv_cache``) and ``models/wan/causal_stream_inference.py:87-107``
(the sizes). The engine's :mod:`model.kv_pool` keeps frames in order and drops whole frames; this cache is a
fixed ring of ``frames`` slots whose write targets come from a per-layer queue, so it has a module of its own.

Per layer (every quantity in latent frames; the reference counts tokens, tokens_per_frame = h*w/4 times
these): the K [frames * tokens_per_frame, heads, head_dim] (stored after RoPE) and V of ``frames`` slots, a
queue of slot END positions (``evict_idx``), a countdown (``current_step``, starting at ``steps``), a fill
mark (``local_end_index``) and the end of the last write (``global_end_index``). One *forward* of one chunk
of n latent frames at RoPE frame position p (cur_end = p + n) does, in this order:

1. Adaptive sink (threshold > -1, a sink, one-frame chunks only; every forward): for each sink slot j, the
   cosine similarity of the token-mean of its cached K with the token-mean of the new K, the same for V,
   averaged; if the smallest is below the threshold, argmin + 1 is put at the FRONT of the queue
   (``causal_model.py:284-299``). A sink slot never written holds zeros (similarity 0), so the first
   one-frame chunk always puts one there.
2. If cur_end > frames or the fill mark is already ``frames`` (full): the fill mark becomes ``frames``,
   the target is the queue's head; if the countdown is above 1 it counts down, else the head is popped
   (and put back at the tail when it lies past the sink) and the countdown restarts at ``steps``; the
   chunk's K/V overwrite the n slots ending at the target (``:302-324``).
3. Else (filling): fill mark += cur_end - last end; rolling = cur_end + n is queued at the tail when
   sink < rolling <= frames and it differs from the tail; the chunk's K/V go to the n slots ending at
   the fill mark (``:326-337``).
4. The last end becomes cur_end; the chunk's queries attend slots [0, fill mark), no mask (``:339-384``).

What follows for SDv2's chunking (chunk 0: 2 latent frames at position 0, chunk k: 1 frame at k + 1),
6 slots, sink 3 and S steps (the reference doc's KV section, corrected where marked):

- While filling, every forward of a chunk rewrites the chunk's own slot, so the slot holds the chunk's
  last forward's K/V; the queue becomes [4, 5, 6] after the sink pushes.
- The chunk that fills the cache (latent frame 5) fills on its first forward only; from its second on the
  cache is full and it writes at the queue's head, so latent frame 5 is in the cache twice.
- The countdown counts full-cache forwards, not a chunk's: it starts at the filling chunk's 2nd forward,
  so (S >= 2) the pop falls on the FIRST forward of every later chunk. That forward overwrites the slot
  the previous chunk's later forwards wrote, then pops it; the chunk's forwards 2..S write the next head,
  which the next chunk's first forward overwrites in turn. So a full cache keeps, of each chunk, the K/V
  of its first forward (its noisiest), not of its last (the reference doc says the last; its code does
  this). With S = 1 every forward pops: a plain ring.
- A sink push can change the target between the forwards of one chunk, leaving stale copies; a pushed
  sink slot is never re-queued (it is not past the sink). The queues, and so the contents, differ by layer.

One :class:`SDv2Cache` serves a whole run: one shared ring, however many chunks are in flight (the
sequential path's single cache, ``cache_bs == 1``). The reference keeps the queue on the attention
module and never resets it between runs; here a new cache starts empty (the first run's semantics).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import attend


def check_cache(frames: int, sink: int, threshold: float) -> None:
    """ValueError unless ``frames`` >= 4 (chunk 0's two frames and a rotating slot: the queue gets its first
    entry, slot end 4, from chunk 0), 0 <= ``sink`` < ``frames`` and -1 <= ``threshold`` <= 1 (-1: no
    adaptive sink; SDv2's fast config: 5 frames, sink 2, -1)."""
    if type(frames) is not int or frames < 4:
        raise ValueError(f"the SDv2 KV cache needs >= 4 latent frames (chunk 0's 2 and the slots it rotates), got "
                         f"{frames!r}")
    if type(sink) is not int or not 0 <= sink < frames:
        raise ValueError(f"the SDv2 sink must lie in 0..{frames - 1} latent frames (cache of {frames}), got {sink!r}")
    if not -1 <= threshold <= 1:
        raise ValueError(f"the adaptive sink's threshold is a cosine similarity in -1..1 (-1: off), got {threshold}")


@dataclass
class LayerState:
    """One layer's ring bookkeeping (frames): the reference's ``evict_idx``, ``current_step``,
    ``local_end_index`` and ``global_end_index``."""

    countdown: int
    queue: list[int] = field(default_factory=list)
    fill: int = 0
    last_end: int = 0


class SDv2Cache:
    """The K/V of every layer, [layers, frames * tokens_per_frame, heads, head_dim] in ``dtype`` (zeros at
    first), and each layer's :class:`LayerState`; see the module docstring for the rule.

    ``steps``: the denoising forwards of a chunk (the countdown's start). Raises ValueError for a bad size
    (:func:`check_cache`) or steps < 1."""

    def __init__(self, layers: int, tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, *, frames: int = 6, sink: int = 3, threshold: float = 0.2,
                 steps: int = 2):
        check_cache(frames, sink, threshold)
        if steps < 1:
            raise ValueError(f"a chunk takes at least 1 denoising forward, got {steps}")
        self.frames, self.sink, self.threshold, self.steps = frames, sink, threshold, steps
        self.tokens_per_frame = tokens_per_frame
        shape = (layers, frames * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [LayerState(steps) for _ in range(layers)]

    def _sink_push(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Step 1 of the rule: the adaptive sink's check of one new frame's k, v [tokens, heads, hd]."""
        tpf, sink = self.tokens_per_frame, self.sink
        similarity = []
        for cached, new in ((self.k, k), (self.v, v)):
            old_mean = cached[layer, :sink * tpf].reshape(sink, tpf, -1).mean(1)  # [sink, heads*hd]
            new_mean = new.reshape(1, tpf, -1).mean(1)  # [1, heads*hd]
            similarity.append(torch.cosine_similarity(old_mean, new_mean, dim=-1))
        average = (similarity[0] + similarity[1]) / 2
        if average.min() < self.threshold:
            self.layers[layer].queue.insert(0, int(torch.argmin(average)) + 1)

    def write(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """One forward's write of a chunk's k, v [n * tokens_per_frame, heads, head_dim] (RoPE'd at frame
        ``position``) into ``layer``; returns the frames its queries attend (slots [0, that)). RuntimeError
        when a full cache finds its queue empty (which SDv2's sizes, checked at construction, rule out)."""
        tpf, state = self.tokens_per_frame, self.layers[layer]
        n = k.shape[0] // tpf
        end = position + n
        if self.sink and self.threshold > -1 and n <= 1:
            self._sink_push(layer, k, v)
        if end > self.frames or state.fill >= self.frames:
            state.fill = self.frames
            if not state.queue:
                raise RuntimeError(f"layer {layer}: the SDv2 cache is full and its eviction queue is empty")
            target = state.queue[0]
            if state.countdown > 1:
                state.countdown -= 1
            else:
                head = state.queue.pop(0)
                if head > self.sink:
                    state.queue.append(head)
                state.countdown = self.steps
        else:
            state.fill += end - state.last_end
            rolling = end + n
            if self.sink < rolling <= self.frames and (not state.queue or state.queue[-1] != rolling):
                state.queue.append(rolling)
            target = state.fill
        self.k[layer, (target - n) * tpf:target * tpf] = k
        self.v[layer, (target - n) * tpf:target * tpf] = v
        state.last_end = end
        return state.fill

    def attention(self, positions: Sequence[int]) -> "SDv2Attention":
        """The self-attention context of one model forward whose segments are chunks at RoPE frame
        ``positions`` (oldest first)."""
        return SDv2Attention(self, list(positions))


class SDv2Attention:
    """A forward's self-attention over an :class:`SDv2Cache` (``model.dit.SelfAttentionContext``): per layer,
    segment by segment in order (oldest chunk first), the segment's K/V are written by the cache's rule and
    its queries attend the slots the write leaves attended. A segment so sees what the sequential path shows
    a forward at that point: the writes of the segments before it, not those after it."""

    def __init__(self, cache: SDv2Cache, positions: list[int]):
        self.cache, self.positions = cache, positions

    @torch.compiler.disable
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, tpf = self.cache, self.cache.tokens_per_frame
        out = torch.empty_like(q)
        for i, position in enumerate(self.positions):
            seen = cache.write(layer, position, k[i], v[i]) * tpf
            keys = cache.k[layer, :seen].unsqueeze(0).transpose(1, 2)  # [1, heads, seen, hd]
            values = cache.v[layer, :seen].unsqueeze(0).transpose(1, 2)
            out[i] = attend(q[i].unsqueeze(0).transpose(1, 2), keys, values)[0].transpose(0, 1)
        return out
