"""The phases of one tick of the cascade, named, so that :func:`sampling.loop.generate` reads in one screen.

A tick runs: :meth:`TickPhases.enter` (steered switches land, blocks entering at stage 0 take their initial
noise), :meth:`TickPhases.make_context` (LongLive's re-cache at a switch, room in the KV pool, Krea
Realtime's KV recompute), :meth:`TickPhases.denoise` (one model forward per group of equal-size blocks, the
(block, stage) pairs batched) and :meth:`TickPhases.advance` (each block moved to its next step by the run's
step rule; the blocks whose last step this was). Before tick 0, :func:`prefix_pass` writes a context prefix's
K/V. The rules behind each phase are the loop module's guarantees.

Step rules (how a block moves from one step to the next; :func:`step_rule` picks the config's ``solver``):
:class:`RenoiseRule` (the Wan2.1 families: x0, then fresh noise to the next step's level) and
:class:`sampling.unipc.UniPCRule` (LongLive 2.0: a UniPC solver per block, no random draw). Both keep what
they need per block, so the cascade runs any number of blocks in flight under either.
LongLive 2.0's scene cuts (``scene_cuts``: blocks of the prompt schedule that start a new shot) add
``cfg.shot_rope_offset`` frames to the RoPE positions of their block and every later one, per cut; with
``cfg.multi_shot_sink`` a cut block's first ``sink`` frames are pinned in the KV pool after its clean pass
(:meth:`model.kv_pool.KVPool.pin`; ``pipeline/causal_diffusion_inference.py:545-551, 630-664`` of
NVlabs/LongLive@7860ad9). An image latent (``image_latent``) is block 0's frame 0 at timestep 0 in every
forward: written over the block's initial noise and after every step, its timestep 0 in every forward, the
clean pass included (LongLive 2.0's image-to-video, ``causal_diffusion_inference.py:553-627``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..common.transfer import to_device
from ..model.dit import WanModel
from ..model.experts import ExpertPair
from ..model.grid import BlockGrid
from ..model.kv_pool import KVPool
from ..model.pool_attention import FULL, REUSE, SPLIT, STORE, Exchange
from .latent_window import LatentWindow
from .noise import step_noise
from .recompute import ContextImage, recompute_pass
from .schedule import FlowSchedule, Tick
from .steer import LivePrompts
from .unipc import UniPCRule

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
    return 1 + getattr(context, "extra", 0)  # an expert pair runs both experts


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
    chunks, forwards = grid.prefix_chunks(), 0
    for i, (lo, hi) in enumerate(chunks):
        if stop(i - len(chunks)):
            raise Interrupted(f"stopped while writing the context (its block {i + 1} of {len(chunks)})")
        forwards += _clean_forward(model, pool, out, lo, hi, prompt, context_noise, pool.clean_attention(lo, hi))
    return forwards


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


class RenoiseRule:
    """The re-noising step rule (Self-Forcing and the Wan2.1 families): x0 = x - sigma*v
    (:meth:`FlowSchedule.x0`), then x0 re-noised to the next step's level with :func:`noise.step_noise` (seed,
    ``block_offset`` + block, stage); after the last step x0 itself. ``flow_of(block)``: its noise levels."""

    def __init__(self, flow_of: Callable[[int], FlowSchedule], seed: int, block_offset: int):
        self.flow_of, self.seed, self.block_offset = flow_of, seed, block_offset

    def step(self, block: int, stage: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``block``'s x after its step ``stage`` (x, v [1, C, frames, h, w]; v in x's dtype): the next step's
        input, or after the last step the block's clean latents."""
        flow = self.flow_of(block)
        x0 = flow.x0(x, v, stage)
        if stage + 1 == len(flow):
            return x0
        return flow.renoise(x0, stage + 1, step_noise(self.seed, self.block_offset + block, stage, x0))


def step_rule(run: RunPlan, seed: int, block_offset: int) -> RenoiseRule | UniPCRule:
    """The step rule of the run's ``cfg.solver``: "renoise" -> :class:`RenoiseRule`, "unipc" ->
    :class:`sampling.unipc.UniPCRule` (which draws nothing: ``seed`` does not reach it)."""
    if run.cfg.solver == "unipc":
        return UniPCRule(run.flow_of)
    return RenoiseRule(run.flow_of, seed, block_offset)


def check_image_latent(image: torch.Tensor | None, run: RunPlan) -> None:
    """Raise ValueError unless ``image`` (an image latent held as block 0's frame 0, see the module docstring)
    is None or clean latents [1, C, 1, h, w] of the run's shape, real and finite, for a run whose block 0 holds
    two frames or more and that has no context prefix (a start image before block 0 is the prefix's rule)."""
    if image is None:
        return
    c, h, w = run.shape[1], *run.shape[-2:]
    shape = list(image.shape) if isinstance(image, torch.Tensor) else None
    if shape != [1, c, 1, h, w] or not image.is_floating_point():
        raise ValueError(f"the image latent must be one real latent frame [1, {c}, 1, {h}, {w}], got "
                         f"{shape if shape is not None else type(image).__name__}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("the image latent holds NaN or infinite values")
    if run.grid.first < 2:
        raise ValueError("an image latent is frame 0 of block 0, which holds 1 frame here (an independent first "
                         "frame): the block would hold nothing to generate; give a start image as a prefix instead")
    if run.grid.offset:
        raise ValueError("an image latent (block 0's frame 0) and a context prefix before block 0 exclude each "
                         "other: give one of them")


class TickPhases:
    """One run's state across ticks (the in-flight blocks' x_t, the noise levels on the device, the step
    rule's per-block state) and the phases of a tick. ``noise_of(b)``: block b's initial noise [1, C, its
    frames, h, w]; ``partition``: which segments this process computes; ``scene_cuts``: blocks that start a
    new shot; ``image_latent``: block 0's frame 0 [1, C, 1, h, w] or None (see the module docstring)."""

    def __init__(self, model: WanModel, run: RunPlan, pool: KVPool, live: LivePrompts, out: LatentWindow,
                 partition: Partition, noise_of: Callable[[int], torch.Tensor], seed: int, block_offset: int,
                 context_image: ContextImage | None, scene_cuts=frozenset(), image_latent: torch.Tensor | None = None):
        self.model, self.run, self.cfg, self.pool, self.live, self.out = model, run, run.cfg, pool, live, out
        self.part, self.noise_of, self.seed, self.block_offset = partition, noise_of, seed, block_offset
        self.context_image = context_image
        device, grid = model.device, run.grid
        self.x_t: dict[int, torch.Tensor] = {}  # in-flight blocks: current noisy input (or x0 for the clean pass)
        self.clean_t = torch.full((max(grid.first, grid.frames),), float(self.cfg.context_noise), device=device)
        self.step_t = {id(f): to_device(f.timesteps, device) for f in (run.first_flow, run.flow)}
        self.rule = step_rule(run, seed, block_offset)
        if isinstance(model, ExpertPair):  # Wan2.2 A14B: high-noise steps predict x at the boundary
            self.rule = model.step_rule(run.flow_of, FlowSchedule((model.boundary,), self.cfg.shift, False).sigmas[0],
                                        lambda b, s, x: step_noise(seed, block_offset + b, s, x))
        self.cuts = sorted(b for b in scene_cuts if b > 0)
        self.image = None if image_latent is None else to_device(image_latent, device).to(model.dtype)

    def rope_shift(self, block: int) -> int:
        """Frames added to ``block``'s RoPE positions: ``cfg.shot_rope_offset`` per scene cut at or before it."""
        return self.cfg.shot_rope_offset * sum(1 for c in self.cuts if c <= block)

    def _hold_image(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """x with frame 0 replaced by the image latent where ``block`` is 0 and there is one (x itself otherwise)."""
        if block or self.image is None:
            return x
        x = x.clone()
        x[:, :, :1] = self.image
        return x

    def enter(self, tick: Tick) -> None:
        """Steered switches land (tick 0's were polled before the prefix), prompts no block needs any more
        are forgotten, and the blocks entering at stage 0 take their initial noise."""
        if tick.index:
            self.live.poll(tick.index)
        oldest = tick.pairs[0][0]
        self.live.forget_before(max(0, oldest - 1))  # a KV recompute takes the block before's prompt
        for b, stage in tick.pairs:
            if stage == 0 and self.part.owns(b):
                self.x_t[b] = self._hold_image(b, self.noise_of(b))

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
            if self.image is not None and mine[0] == 0:  # the image frame at timestep 0 in every forward
                t = t.clone()
                t[0, 0] = 0
            v = model(torch.cat([self.x_t[b] for b in mine]), t,
                      [pool.position(grid.start(b)) + self.rope_shift(b) for b in mine],
                      [self.live.prompt(b) for b in mine], context)
            forwards += getattr(context, "extra", 0)  # an expert pair's second expert
            v_of.update({group[k]: v[r:r + 1] for r, k in enumerate(local)})
        return v_of, forwards

    def advance(self, tick: Tick, v_of: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor | None]]:
        """Each denoising pair moved to its next step by the step rule (after the last step the clean pass runs
        on the block's clean latents); a clean pass's block leaves (a scene cut's block pinned in the KV pool
        with ``cfg.multi_shot_sink``). Returns the blocks whose last denoising step this was, with their clean
        latents (None where another process computed them)."""
        finished = []
        for i, (b, stage) in enumerate(tick.pairs):
            if self.run.schedule.is_clean(b, stage):
                self.x_t.pop(b, None)
                if self.cfg.multi_shot_sink and b in self.cuts:  # every process: each holds the whole pool
                    start = self.run.grid.start(b)
                    self.pool.pin(start, start + min(self.cfg.sink, self.run.grid.size(b)))
                continue
            last = stage + 1 == len(self.run.flow_of(b))
            x = None
            if i in v_of:
                x = self._hold_image(b, self.rule.step(b, stage, self.x_t[b], v_of[i].to(self.model.dtype)))
                self.x_t[b] = x
            if not last:
                continue
            if not self.run.schedule.clean_pass:  # no clean pass follows: the block is done
                self.x_t.pop(b, None)
            finished.append((b, x))
        return finished
