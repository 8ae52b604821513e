"""The phases of one tick of the cascade, named, so that :func:`sampling.loop.generate` reads in one screen.

A tick runs: :meth:`TickPhases.enter` (steered switches land, blocks entering at stage 0 take their initial
noise), :meth:`TickPhases.make_context` (LongLive's re-cache at a switch, room in the KV pool, Krea
Realtime's KV recompute), :meth:`TickPhases.denoise` (one model forward per group of equal-size blocks, the
(block, stage) pairs batched) and :meth:`TickPhases.advance` (x0 and re-noising; the blocks whose last
step this was). Before tick 0, :func:`prefix_pass` writes a context prefix's K/V. The rules behind each
phase are the loop module's guarantees.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..common.transfer import to_device
from ..model.dit import WanModel
from ..model.grid import BlockGrid
from ..model.kv_pool import KVPool
from ..model.pool_attention import FULL, REUSE, SPLIT, STORE, Exchange
from .latent_window import LatentWindow
from .noise import step_noise
from .recompute import ContextImage, recompute_pass
from .schedule import Tick
from .steer import LivePrompts

if TYPE_CHECKING:
    from .plan import RunPlan


class Interrupted(Exception):
    """The caller asked the run to stop (raised between ticks, or between a context's blocks)."""


def attention_mode(flashblock: str, stage: int, clean: bool) -> str:
    """The KV pool's attention mode for one (block, stage) pair under a FlashBlock setting."""
    if flashblock == "off" or clean:
        return FULL
    if flashblock == "exact":
        return SPLIT
    return STORE if stage == 0 else REUSE


def size_groups(blocks: Sequence[int], grid: BlockGrid) -> list[list[int]]:
    """Indices of a tick's segments grouped into runs of equal block size, oldest first: one model
    forward each (segments of one forward share a shape). Only block 0 can differ (an independent
    first frame), so a tick has at most two groups; causal attention makes two forwards in this order
    equal to one (a segment sees only older blocks, whose K/V the earlier forward wrote)."""
    groups: list[list[int]] = []
    for i, b in enumerate(blocks):
        if groups and grid.size(blocks[groups[-1][-1]]) == grid.size(b):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _clean_forward(model: WanModel, pool: KVPool, out: LatentWindow, lo: int, end: int, prompt,
                   context_noise: float, context) -> int:
    """One forward over the clean latents of frames [lo, end) in ``out`` at t = ``context_noise``, RoPE'd
    from the pool's position of frame ``lo``, writing their K/V through ``context``. Returns 1."""
    t = torch.full((1, end - lo), float(context_noise), device=out.data.device)
    model(out.read(lo, end), t, [pool.position(lo)], [prompt], context)
    return 1


def prefix_pass(model: WanModel, pool: KVPool, out: LatentWindow, grid: BlockGrid, prompt, context_noise: float,
                stop: Callable[[int], bool] = lambda index: False) -> int:
    """A context prefix's clean passes, under the run's first prompt, before block 0: its clean
    latents (frames [0, grid.offset) of ``out``) are written as the finished blocks they are made of
    (:meth:`BlockGrid.prefix_chunks`), oldest first, one forward each at t = ``context_noise`` and
    RoPE positions at their frames, each attending what a clean pass of a block there attends (the
    earlier prefix frames its window holds, and its own). A start image (one frame at t = 0) is core
    ComfyUI's ARVideoI2V and Causal Forcing's I2V (one clean pass at position 0); a longer prefix
    gets the K/V a run that had generated those frames would hold. ``stop(index)`` is asked before
    each (index -n..-1 for n blocks: the ticks before tick 0). Returns the forwards run; raises
    :class:`Interrupted` when ``stop`` says so."""
    chunks = grid.prefix_chunks()
    for i, (lo, hi) in enumerate(chunks):
        if stop(i - len(chunks)):
            raise Interrupted(f"stopped while writing the context (its block {i + 1} of {len(chunks)})")
        _clean_forward(model, pool, out, lo, hi, prompt, context_noise, pool.clean_attention(lo, hi))
    return len(chunks)


def _recache(model: WanModel, pool: KVPool, out: LatentWindow, end: int, prompt, context_noise: float) -> int:
    """LongLive's KV re-cache at a prompt switch: the committed frames before frame ``end`` that the
    new block will see (a context prefix's frames among them), run once more at ``context_noise``
    under the new prompt (one forward over them together, their own clean latents from ``out``), so
    their K/V carry it. Returns the forwards run (0 when nothing is committed yet).

    The forward runs eagerly even where the model's layers are compiled: its frame counts (the window's
    committed frames) occur only at switches, and compiling each new one stalled the stream about 10 s
    at 1.3B on an H200 (BENCHMARKS.md)."""
    found = pool.recache_attention(end)
    if found is None:
        return 0
    lo, context = found
    with torch.compiler.set_stance("force_eager"):
        return _clean_forward(model, pool, out, lo, end, prompt, context_noise, context)


class Partition:
    """How the segments of each tick are shared among processes; this base class is one process.

    Every process runs the same loop over every tick and keeps the same KV pool; only the segments it
    owns go through its model. A block keeps one owner for its whole life (its x_t never moves).
    """

    def owns(self, block: int) -> bool:
        """Whether this process computes ``block``'s segments."""
        return True

    def exchange(self, blocks: list[int], local: list[int]) -> Exchange | None:
        """How the K/V of the tick's non-local segments arrive (None: every segment is local)."""
        return None

    def collect(self, block: int, x0: torch.Tensor | None, frames: int) -> torch.Tensor | None:
        """A finished block's latents [1, 16, frames, h, w] where it is reported (None elsewhere);
        ``x0`` where owned."""
        return x0

    def stop(self, tick: Tick, requested: bool) -> bool:
        """Whether every process stops before ``tick`` (``requested``: this process's own wish; a
        negative index: a block of the context prefix, see :func:`prefix_pass`)."""
        return requested


class TickPhases:
    """One run's state across ticks (the in-flight blocks' x_t, the noise levels on the device) and the
    phases of a tick. ``noise_of(b)``: block b's initial noise [1, 16, its frames, h, w]; ``partition``:
    which segments this process computes."""

    def __init__(self, model: WanModel, run: RunPlan, pool: KVPool, live: LivePrompts, out: LatentWindow,
                 partition: Partition, noise_of: Callable[[int], torch.Tensor], seed: int, block_offset: int,
                 context_image: ContextImage | None):
        self.model, self.run, self.cfg, self.pool, self.live, self.out = model, run, run.cfg, pool, live, out
        self.part, self.noise_of, self.seed, self.block_offset = partition, noise_of, seed, block_offset
        self.context_image = context_image
        device, grid = model.device, run.grid
        self.x_t: dict[int, torch.Tensor] = {}  # in-flight blocks: current noisy input (or x0 for the clean pass)
        self.clean_t = torch.full((max(grid.first, grid.frames),), float(self.cfg.context_noise), device=device)
        self.step_t = {id(f): to_device(f.timesteps, device) for f in (run.first_flow, run.flow)}

    def enter(self, tick: Tick) -> None:
        """Steered switches land (tick 0's were polled before the prefix), prompts no block needs any more
        are forgotten, and the blocks entering at stage 0 take their initial noise."""
        if tick.index:
            self.live.poll(tick.index)
        oldest = tick.pairs[0][0]
        self.live.forget_before(max(0, oldest - 1))  # a KV recompute takes the block before's prompt
        for b, stage in tick.pairs:
            if stage == 0 and self.part.owns(b):
                self.x_t[b] = self.noise_of(b)

    def make_context(self, tick: Tick) -> int:
        """The KV pool made ready for the tick: LongLive's re-cache before a block that starts a new prompt
        (before the window makes room for it), room for the blocks in flight, Krea Realtime's recompute of
        the entering block's context. Returns the forwards run."""
        grid, cfg = self.run.grid, self.cfg
        first, newest = tick.pairs[0][0], tick.pairs[-1][0]
        entering = newest if tick.pairs[-1][1] == 0 else None
        forwards = 0
        recache = None if entering is None else self.live.recache_for(entering)  # steered switches included
        if recache is not None:
            forwards += _recache(self.model, self.pool, self.out, grid.start(first), recache, cfg.context_noise)
        self.pool.make_room(first, newest)
        if cfg.kv_recompute and entering:  # one block in flight: it is the entering one
            forwards += recompute_pass(self.model, self.pool, self.out, grid, entering, cfg.kv_recompute,
                                       self.live.prompt(entering - 1), cfg.context_noise, self.context_image)
        return forwards

    def denoise(self, tick: Tick) -> tuple[dict[int, torch.Tensor], int]:
        """One forward per group of equal-size blocks, every (block, stage) pair of the group batched with its
        own timestep, RoPE offset, prompt and attention mode. Returns ({segment index: velocity [1, 16, frames,
        h, w]} of the segments computed here, forwards run)."""
        model, run, cfg, grid, pool, part = self.model, self.run, self.cfg, self.run.grid, self.pool, self.part
        blocks_now = [b for b, _ in tick.pairs]
        newest_end = grid.end(blocks_now[-1])
        v_of: dict[int, torch.Tensor] = {}
        forwards = 0
        for group in size_groups(blocks_now, grid):
            pairs = [tick.pairs[i] for i in group]
            gb = [b for b, _ in pairs]
            clean = [run.schedule.is_clean(b, s) for b, s in pairs]
            his = [newest_end if cfg.attention == "bidirectional" and not c else grid.end(b)
                   for (b, _), c in zip(pairs, clean)]
            modes = [attention_mode(cfg.flashblock, s, c) for (_, s), c in zip(pairs, clean)]
            local = [k for k, b in enumerate(gb) if part.owns(b)]
            context = pool.attention(gb, his, modes, local, part.exchange(gb, local), clean)
            forwards += 1
            if not local:  # nothing to compute here: only take part in the K/V exchange
                context.skip(model.cfg.num_layers)
                continue
            size = grid.size(gb[0])
            t = torch.stack([self.clean_t[:size] if clean[k] else self.step_t[id(run.flow_of(gb[k]))][pairs[k][1]]
                             .expand(size) for k in local])  # [n, frames]
            mine = [gb[k] for k in local]
            v = model(torch.cat([self.x_t[b] for b in mine]), t, [pool.position(grid.start(b)) for b in mine],
                      [self.live.prompt(b) for b in mine], context)
            v_of.update({group[k]: v[r:r + 1] for r, k in enumerate(local)})
        return v_of, forwards

    def advance(self, tick: Tick, v_of: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor | None]]:
        """Each denoising pair's x0 from its velocity, re-noised to the next step's level with
        :func:`noise.step_noise` (after the last step the clean pass runs on x0 itself); a clean pass's block
        leaves. Returns the blocks whose last denoising step this was, with their x0 (None where another
        process computed it)."""
        finished = []
        for i, (b, stage) in enumerate(tick.pairs):
            if self.run.schedule.is_clean(b, stage):
                self.x_t.pop(b, None)
                continue
            flow = self.run.flow_of(b)
            last = stage + 1 == len(flow)
            x0 = None
            if i in v_of:
                x0 = flow.x0(self.x_t[b], v_of[i].to(self.model.dtype), stage)
                self.x_t[b] = x0 if last else flow.renoise(x0, stage + 1,
                                                           step_noise(self.seed, self.block_offset + b, stage, x0))
            if not last:
                continue
            if not self.run.schedule.clean_pass:  # no clean pass follows: the block is done
                self.x_t.pop(b, None)
            finished.append((b, x0))
        return finished
