"""Noise levels of the flow-matching sampler and the tick plan of Block Cascading.

Guarantees:
- :class:`FlowSchedule` reproduces the reference's numbers: sigma(s) = shift*s / (1 + (shift-1)*s) on
  1000 training steps (float32 table), the step list warped through that table (1000, 750, 500, 250
  at shift 5 -> t = 1000, 937.5, 833.3, 625), x0 = x_t - sigma*v in float64, and re-noising
  x = (1-sigma')*x0 + sigma'*eps in float32. A last step 0 (Krea Realtime) is t = 0 with the sigma of
  the nearest table entry, the smallest (about 0.005 at shift 5), as krea-ai/realtime-video reads it
  from its zero-padded table (``release_server.py:559-560``, ``v2v.py:133-136``).
- :class:`BlockGrid` says which latent frames each block holds: every block N frames (3 chunk-wise, 1
  frame-wise), or, with an independent first frame (CausVid, Self-Forcing and Causal Forcing's
  ``independent_first_frame``), block 0 one frame and every later block N; a context prefix of F
  clean frames (``offset``) moves every block F frames later (the block count excludes it).
- :class:`CascadeSchedule` is pure bookkeeping (no tensors): it lists the ticks of a video of n blocks,
  each tick a set of (block, stage) pairs, stage 0..S_b-1 a denoising step of block b and stage S_b
  its clean pass. Every block has S steps except block 0, which may have its own S0 (a first-block
  step list). Block b >= 1 enters at tick floor(b*(S+1)/P) + d with d = max(S0 - S, 1 - floor((S+1)/P))
  (d = 0 when S0 = S), so at most P blocks are in flight; P=1 is the reference's sequential order and
  P=S+1 emits one block per tick. ``fold_clean`` (P1 only) runs a block's clean pass in the same
  forward as the next block's first step: the same result, one tick fewer per block. An endless
  schedule (n = 0: until the caller stops) has the same ticks as a long enough finite one, listed
  lazily (:meth:`CascadeSchedule.iter_ticks`). Without clean
  passes (``clean_pass=False``: a KV cache recomputed before every block, Krea Realtime) a block's last
  stage is its last denoising step.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

TRAIN_STEPS = 1000


class FlowSchedule:
    """Timesteps and sigmas of a denoising step list (see module docstring)."""

    def __init__(self, steps: Sequence[int] = (1000, 750, 500, 250), shift: float = 5.0, warp: bool = True):
        steps = [int(s) for s in steps]
        if not steps:
            raise ValueError("the step list is empty")
        if any(not 0 <= s <= TRAIN_STEPS for s in steps):
            raise ValueError(f"steps must lie in 0..{TRAIN_STEPS}, got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must strictly decrease, got {steps}")
        if not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a positive finite number, got {shift}")
        self.steps = tuple(steps)
        s = torch.linspace(1.0, 0.0, TRAIN_STEPS + 1)[:-1]  # float32, as the reference builds it
        table_sigma = shift * s / (1 + (shift - 1) * s)
        table_t = table_sigma * TRAIN_STEPS
        if warp:  # entry 1000 of the table padded with t = 0 is step 0
            idx = torch.tensor([TRAIN_STEPS - st for st in steps])
            self.timesteps = torch.cat([table_t, torch.zeros(1)])[idx]
        else:
            self.timesteps = torch.tensor(steps, dtype=torch.float32)
        # sigma of a timestep: the nearest table entry, as the reference looks it up
        nearest = (table_t.unsqueeze(0) - self.timesteps.unsqueeze(1)).abs().argmin(1)
        self.sigmas = table_sigma[nearest]

    def __len__(self) -> int:
        return len(self.steps)

    def x0(self, x_t: torch.Tensor, velocity: torch.Tensor, step: int) -> torch.Tensor:
        """Clean estimate x_t - sigma*v, computed in float64, returned in x_t's dtype."""
        sigma = float(self.sigmas[step].double())
        return (x_t.double() - sigma * velocity.double()).to(x_t.dtype)

    def renoise(self, x0: torch.Tensor, step: int, eps: torch.Tensor) -> torch.Tensor:
        """x0 taken to the noise level of ``step`` with fresh noise eps, in float32, x0's dtype out."""
        sigma = self.sigmas[step]
        return ((1 - sigma) * x0.float() + sigma * eps.float()).to(x0.dtype)


@dataclass(frozen=True)
class Tick:
    index: int
    pairs: tuple[tuple[int, int], ...]  # (block, stage), oldest block first


class CascadeSchedule:
    """Which (block, stage) pairs run together; see the module docstring."""

    def __init__(self, blocks: int, steps: int, parallel: int = 1, fold_clean: bool = False,
                 first_steps: int | None = None, clean_pass: bool = True):
        if blocks < 0:
            raise ValueError(f"the video needs at least 1 block (0: endless), got {blocks}")
        first_steps = steps if first_steps is None else first_steps
        if min(steps, first_steps) < 1:
            raise ValueError(f"at least 1 denoising step is needed, got {min(steps, first_steps)}")
        if not 1 <= parallel <= steps + 1:
            raise ValueError(f"parallelism must lie in 1..{steps + 1} (steps + 1), got {parallel}")
        self.blocks, self.steps, self.parallel, self.first_steps = blocks, steps, parallel, first_steps
        self.endless = blocks == 0  # blocks until the caller stops
        if not clean_pass and parallel > steps:
            raise ValueError(f"without clean passes a block has {steps} stages: parallelism must lie in 1..{steps}, "
                             f"got {parallel}")
        if fold_clean and parallel > 1:
            raise ValueError(f"fold-clean works at parallel 1 only (at P>1 clean passes already share ticks), got "
                             f"parallel {parallel}")
        self.clean_pass = clean_pass
        self.stages = steps + clean_pass
        # P1 only: the clean pass of block b shares a tick with the first step of block b+1. Exact,
        # since in one forward every segment's K/V are written before any is read (block b+1 sees
        # block b's clean K/V at every layer, as in the sequential order); one tick fewer per block.
        self.fold_clean = fold_clean and clean_pass
        # later blocks follow the uniform cascade, delayed so block 0's span fits inside the span the
        # uniform block 0 would have had (hence still at most P in flight; see the module docstring)
        self._delay = max(first_steps - steps, 1 - self.stages // parallel)

    def steps_of(self, block: int) -> int:
        """Denoising steps of ``block`` (its clean pass, if any, is stage ``steps_of(block)``)."""
        return self.first_steps if block == 0 else self.steps

    def is_clean(self, block: int, stage: int) -> bool:
        return self.clean_pass and stage == self.steps_of(block)

    def entry(self, block: int) -> int:
        """The tick at which ``block`` runs its first denoising step."""
        if block == 0:
            return 0
        if self.fold_clean:
            return self.first_steps + (block - 1) * self.steps
        return block * self.stages // self.parallel + self._delay

    def next_entering(self, tick: int) -> int:
        """The first block that enters at ``tick`` or later (``blocks`` when none is left)."""
        lo, hi = 0, tick + self.stages + 1  # entry(b) >= b + delay >= b - stages (parallel <= stages)
        if not self.endless:
            hi = min(hi, self.blocks)
        while lo < hi:  # entry() increases with the block
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.entry(mid) < tick else (lo, mid)
        return lo

    @functools.cached_property
    def max_in_flight(self) -> int:
        """The most blocks any tick holds (an endless schedule: those of a finite one long enough for
        the steady state, every block's span overlapping those it can)."""
        if self.endless:
            longest = self.first_steps + 2 * (self.stages + 1)
            return CascadeSchedule(longest, self.steps, self.parallel, self.fold_clean, self.first_steps,
                                   self.clean_pass).max_in_flight
        return max(len(t.pairs) for t in self.ticks())

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless schedule has no length")
        last = self.blocks - 1
        return self.entry(last) + self.steps_of(last) + self.clean_pass

    def ticks(self) -> list[Tick]:
        """Every tick of a finite schedule."""
        return list(self.iter_ticks())

    def iter_ticks(self) -> Iterator[Tick]:
        """The ticks in order, made one at a time (endless: without end); a block's stages run in
        consecutive ticks from its entry, oldest block first in each tick."""
        in_flight: list[int] = []  # blocks entered and not done, oldest first
        entering, tick = 0, 0
        while in_flight or self.endless or entering < self.blocks:
            while (self.endless or entering < self.blocks) and self.entry(entering) == tick:
                in_flight.append(entering)
                entering += 1
            pairs = tuple((b, tick - self.entry(b)) for b in in_flight)
            in_flight = [b for b, stage in pairs if stage + 1 < self.steps_of(b) + self.clean_pass]
            yield Tick(tick, pairs)
            tick += 1
