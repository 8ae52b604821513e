"""A Wan2.2-A14B expert pair: two Wan DiTs of one architecture, a high-noise and a low-noise expert, switched at a
boundary timestep inside a block's step list (FastVideo's causal Wan2.2-A14B; the facts, with file and line:
``docs/references/causal_wan22_a14b.md``).

Guarantees (the reference: hao-ai-lab/FastVideo@2f3d40740 ``fastvideo/pipelines/stages/causal_denoising.py``):
- A denoising segment at timestep t >= ``boundary`` runs through the high-noise expert, t < ``boundary`` through
  the low-noise one (l.213-217: the boundary itself is the high expert's); a clean pass runs through BOTH
  (l.312-347). One forward of the pair is one forward per expert that has segments, each batching its segments.
- Each expert keeps its own KV pool (l.111-126): a forward reads and writes only its expert's pool, so each
  expert attends to K/V its own weights made (:class:`PairPool`; the clean pass fills both).
- The prompt's text K/V: by default the high expert's for both (``shared_text``; l.128-132 share one
  cross-attention cache, filled by the video's first forward, the high expert's), else each expert's own.
- The step rule (:class:`BoundaryRule`, l.268-304): a high-noise step predicts x at the boundary,
  x_b = x_t - (sigma_t - sigma_b) v, re-noised towards the next high step as alpha x_b + beta eps; the last high
  step hands x_b itself to the first low step; low steps predict x0 and re-noise as the Wan2.1 families do.
- Memory: both experts resident, or each with its last blocks streamed from host memory
  (:meth:`ExpertPair.swap_blocks`, :class:`model.block_swap.BlockSwap`; all blocks: the idle expert's blocks
  stay off the device).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch import nn

from .dit import WanModel
from .kv_pool import KVPool, PoolLayout
from .pool_attention import PoolAttention

EXPERTS = ("high", "low")
# FastVideo's SelfForcingWan2_2_T2V480PConfig boundary_ratio 0.875 x 1000 training steps
# (fastvideo/configs/pipelines/wan.py:319; the folder's model_index.json may say otherwise: the reference note)
DEFAULT_BOUNDARY = 875


class PairAttention:
    """A forward's self-attention over the pair's pools, made per expert once the pair's forward knows which
    segments each expert runs: ``make(expert, indices)`` -> that expert's pool context for those segments;
    ``clean[i]``: segment i is a clean pass. ``extra``: forwards run beyond one (set by the forward)."""

    def __init__(self, make: Callable[[str, list[int]], PoolAttention], clean: Sequence[bool]):
        self.make, self.clean, self.extra = make, list(clean), 0

    def __call__(self, layer, q, k, v):
        raise TypeError("an expert pair's attention runs through ExpertPair.forward, not a single model")


class PairPool:
    """One :class:`model.kv_pool.KVPool` per expert, of one layout (arguments as :class:`KVPool`'s); frames,
    positions and evictions move in step. :meth:`attention` and :meth:`clean_attention` return a
    :class:`PairAttention` for :meth:`ExpertPair.forward`."""

    def __init__(self, layout: PoolLayout, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, **options):
        self.layout = layout
        self.pools = {e: KVPool(layout, layers, heads, head_dim, dtype, device, **options) for e in EXPERTS}

    def position(self, frame: int) -> int:
        return self.pools["high"].position(frame)

    def make_room(self, oldest_block: int, newest_block: int) -> None:
        for pool in self.pools.values():
            pool.make_room(oldest_block, newest_block)

    def pin(self, lo: int, hi: int) -> None:
        for pool in self.pools.values():
            pool.pin(lo, hi)

    def attention(self, blocks: list[int], hi_frames: list[int], modes: list[str] | None = None,
                  local: Sequence[int] | None = None, exchange=None, clean: Sequence[bool] | None = None
                  ) -> PairAttention:
        """:meth:`KVPool.attention` of each expert's pool, for the segments that expert runs (one process:
        ValueError for ``exchange`` or a subset of ``local`` segments)."""
        if exchange is not None or (local is not None and list(local) != list(range(len(blocks)))):
            raise ValueError("an expert pair runs on one device: its segments are all computed here")
        clean = list(clean or [False] * len(blocks))
        modes = list(modes or [None] * len(blocks))

        def make(expert: str, idx: list[int]) -> PoolAttention:
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            given = None if modes[0] is None else pick(modes)
            return self.pools[expert].attention(pick(blocks), pick(hi_frames), given, clean=pick(clean))
        return PairAttention(make, clean)

    def clean_attention(self, lo: int, hi: int) -> PairAttention:
        """A context prefix's clean forward over frames [lo, hi) (:meth:`KVPool.clean_attention`) through both
        experts, each writing its own pool (the reference's image pass, l.169-199)."""
        return PairAttention(lambda expert, idx: self.pools[expert].clean_attention(lo, hi), [True])

    def recache_attention(self, end: int):
        raise ValueError("a KV re-cache at a prompt switch is not defined for an expert pair")

    def context_attention(self, lo: int, hi: int, since: int):
        raise ValueError("a KV recompute is not defined for an expert pair")


class BoundaryRule:
    """The pair's step rule (see the module docstring; ``causal_denoising.py:268-304``, ``models/utils.py:178-219``,
    ``scheduling_self_forcing_flow_match.py:106-152``). ``flow_of(block)``: its noise levels (timesteps, sigmas,
    ``x0``, ``renoise`` as :class:`sampling.schedule.FlowSchedule`); ``sigma_boundary``: the sigma of the table
    entry nearest the boundary (a float32 scalar tensor); ``draw(block, stage, like)``: the noise that re-noises
    ``block`` after ``stage``."""

    def __init__(self, flow_of: Callable[[int], object], boundary: float, sigma_boundary: torch.Tensor,
                 draw: Callable[[int, int, torch.Tensor], torch.Tensor]):
        self.flow_of, self.boundary, self.draw = flow_of, float(boundary), draw
        self.sigma_b = torch.as_tensor(sigma_boundary, dtype=torch.float32)

    def is_high(self, flow, stage: int) -> bool:
        return float(flow.timesteps[stage]) >= self.boundary

    def step(self, block: int, stage: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``block``'s x after its step ``stage`` (x, v [1, C, frames, h, w], v in x's dtype): the next step's
        input, or after the last step the block's clean latents. x_b in float64, the re-noising in float32."""
        flow = self.flow_of(block)
        last = stage + 1 == len(flow)
        if not self.is_high(flow, stage):
            x0 = flow.x0(x, v, stage)
            return x0 if last else flow.renoise(x0, stage + 1, self.draw(block, stage, x0))
        reach = float(flow.sigmas[stage].double()) - float(self.sigma_b.double())
        x_b = (x.double() - reach * v.double()).to(x.dtype)
        if last or not self.is_high(flow, stage + 1):
            return x_b  # the last high step: x at the boundary goes to the first low step as it is
        sigma = flow.sigmas[stage + 1].float().cpu()
        alpha = (1 - sigma) / (1 - self.sigma_b)
        beta = torch.sqrt(sigma ** 2 - (alpha * self.sigma_b) ** 2)
        eps = self.draw(block, stage, x_b)
        return (alpha.item() * x_b.float() + beta.item() * eps.float()).to(x_b.dtype)


def check_pair_run(cfg, boundary: int = DEFAULT_BOUNDARY, several_processes: bool = False) -> None:
    """Raise ValueError (one line) for sampling settings (``cfg``, a :class:`sampling.config.CascadeConfig`) not
    defined with two experts, before any model work (a frontend calls it before the weights are read): several
    processes, FlashBlock reuse (its kept attention is one expert's), bidirectional in-flight attention (a newer
    block's K/V may be absent from an expert's pool), a KV recompute, a re-cache at a prompt switch, a rolling
    window or another solver than re-noising."""
    clash = [name for name, on in (
        ("several devices", several_processes), ("flashblock reuse", cfg.flashblock == "reuse"),
        ("bidirectional in-flight attention", cfg.attention == "bidirectional"),
        ("a KV recompute", cfg.kv_recompute), ("switch mode recache", cfg.switch_mode == "recache"),
        ("a rolling window", cfg.rolling_window),
        (f"solver {getattr(cfg, 'solver', 'renoise')}", getattr(cfg, "solver", "renoise") != "renoise"))
        if on]
    if clash:
        raise ValueError(f"a two-expert model (Wan2.2 A14B) cannot run with {', '.join(clash)}: each expert "
                         f"keeps its own KV pool and is switched at timestep {boundary}")


class PairSwap:
    """Both experts' :class:`model.block_swap.BlockSwap` seen as one, as a frontend reads ``model.swap``:
    ``swapped`` (blocks streamed per expert), :meth:`device_bytes` (both experts' tensors on the device, slots
    included) and :meth:`detach` (every weight of both back on the CPU)."""

    def __init__(self, pair: "ExpertPair"):
        self.experts = [pair.high, pair.low]

    @property
    def swapped(self) -> int:
        return max(0 if e.swap is None else e.swap.swapped for e in self.experts)

    def device_bytes(self) -> int:
        return sum(e.swap.device_bytes() if e.swap is not None else
                   sum(t.numel() * t.element_size() for t in e.state_dict().values()) for e in self.experts)

    def detach(self) -> None:
        for e in self.experts:
            if e.swap is not None:
                e.swap.detach()


class ExpertPair(nn.Module):
    """The high-noise expert ``high`` and the low-noise expert ``low`` (two :class:`WanModel` of one
    configuration) switched at ``boundary`` (a whole timestep, 1..999, on the 0..1000 scale; the high expert takes
    t >= boundary). ``shared_text``: the high expert's text K/V serve both (the reference), else each its own.
    ``forwards``: the forwards each expert ran. Raises ValueError for experts of different configurations or a
    boundary out of range. Stands in for a :class:`WanModel` in the sampler (``cfg``, ``dtype``, ``device``,
    :meth:`encode_prompt`, :meth:`forward`, :meth:`kv_pool`, :meth:`step_rule`)."""

    def __init__(self, high: WanModel, low: WanModel, boundary: float = DEFAULT_BOUNDARY, shared_text: bool = True):
        super().__init__()
        if high.cfg != low.cfg:
            differ = [f.name for f in dataclasses.fields(high.cfg)
                      if getattr(high.cfg, f.name) != getattr(low.cfg, f.name)]
            raise ValueError(f"the two experts must share one architecture; they differ in {', '.join(differ)}")
        if not (isinstance(boundary, (int, float)) and math.isfinite(boundary) and boundary == int(boundary)
                and 1 <= boundary <= 999):
            raise ValueError(f"the boundary must be a whole timestep in 1..999 (ratio x 1000; 875 for Wan2.2 T2V "
                             f"A14B), got {boundary!r}")
        self.high, self.low = high, low
        self.boundary, self.shared_text = int(boundary), shared_text
        self.forwards = {e: 0 for e in EXPERTS}

    # ---- what the sampler reads of a model ----------------------------------------------------------
    @property
    def cfg(self):
        return self.high.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def device(self) -> torch.device:
        return self.high.device

    def expert(self, name: str) -> WanModel:
        return self.high if name == "high" else self.low

    def expert_at(self, t: float) -> str:
        """The expert of a denoising step at timestep ``t``: "high" for t >= boundary, else "low"."""
        return "high" if t >= self.boundary else "low"

    def shift_frames(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        return self.high.shift_frames(k, delta)

    def compile_layers(self, enabled: bool = True, backend="inductor") -> "ExpertPair":
        self.high.compile_layers(enabled, backend)
        self.low.compile_layers(enabled, backend)
        return self

    @property
    def compiled(self) -> bool:
        return self.high.compiled

    @property
    def swap(self) -> PairSwap | None:
        """Both experts' block swap as one (:class:`PairSwap`), None while neither streams blocks."""
        return None if self.high.swap is None and self.low.swap is None else PairSwap(self)

    def swap_blocks(self, device: torch.device | str, swapped: int) -> "ExpertPair":
        """Each expert on ``device`` with its last ``swapped`` blocks in pinned host memory, streamed in as its
        forward reaches them (0: every weight on ``device``); ``swapped`` = every layer keeps the idle expert's
        blocks off the device. On failure nothing stays on the device."""
        try:
            self.high.swap_blocks(device, swapped)
            self.low.swap_blocks(device, swapped)
        except BaseException:
            for e in (self.high, self.low):
                e.swap.detach() if e.swap is not None else e.to("cpu")
            raise
        return self

    def with_weight_dtype(self, weight_dtype: str) -> "ExpertPair":
        return ExpertPair(self.high.with_weight_dtype(weight_dtype), self.low.with_weight_dtype(weight_dtype),
                          self.boundary, self.shared_text)

    def encode_prompt(self, embeds: torch.Tensor) -> list:
        """Per-layer text K/V (:meth:`WanModel.encode_prompt`): the high expert's with ``shared_text``, else the
        high expert's layers followed by the low expert's."""
        text = self.high.encode_prompt(embeds)
        return text if self.shared_text else text + self.low.encode_prompt(embeds)

    def _text(self, prompt: list, expert: str) -> list:
        if self.shared_text:
            return prompt
        n = self.cfg.num_layers
        return prompt[:n] if expert == "high" else prompt[n:]

    # ---- the sampler's hooks ----------------------------------------------------------------------------
    def kv_pool(self, layout: PoolLayout, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device | str, **options) -> PairPool:
        """The pair's KV pool (arguments as :class:`KVPool`'s): one pool per expert."""
        return PairPool(layout, layers, heads, head_dim, dtype, device, **options)

    def step_rule(self, flow_of: Callable[[int], object], sigma_boundary: torch.Tensor,
                  draw: Callable[[int, int, torch.Tensor], torch.Tensor]) -> BoundaryRule:
        return BoundaryRule(flow_of, self.boundary, sigma_boundary, draw)

    def check_run(self, cfg, several_processes: bool = False) -> None:
        """:func:`check_pair_run` at this pair's boundary."""
        check_pair_run(cfg, self.boundary, several_processes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, frame_starts: Sequence[int], prompts: Sequence[list],
                attention: PairAttention) -> torch.Tensor:
        """:meth:`WanModel.forward` of n segments through their experts (see the module docstring): x [n, C, F, H,
        W], t [n, F] (a segment's timestep: its largest), ``attention`` from :class:`PairPool`. Returns the
        velocities [n, C, F, H, W] (a clean pass's row: the low expert's output). TypeError for another context."""
        if not isinstance(attention, PairAttention):
            raise TypeError("an expert pair attends through its PairPool (ExpertPair.kv_pool)")
        levels = t.amax(1).tolist()
        runs = {e: [] for e in EXPERTS}
        for i, (level, clean) in enumerate(zip(levels, attention.clean)):
            for e in (EXPERTS if clean else (self.expert_at(level),)):
                runs[e].append(i)
        out, ran = None, 0
        for e in EXPERTS:
            idx = runs[e]
            if not idx:
                continue
            whole = len(idx) == len(levels)
            v = self.expert(e)(x if whole else x[idx], t if whole else t[idx], [frame_starts[i] for i in idx],
                               [self._text(prompts[i], e) for i in idx], attention.make(e, idx))
            out = v if whole else (v.new_empty(len(levels), *v.shape[1:]) if out is None else out)
            if not whole:
                out[idx] = v
            self.forwards[e] += 1
            ran += 1
        attention.extra = ran - 1
        return out
