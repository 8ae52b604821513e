"""Block-causal sampling with Block Cascading: the run loop (its settings: :mod:`config`, re-exported).

Guarantees:
- At parallelism 1 the order of work is the reference's: each block runs its S denoising steps
  (re-noised with fresh Gaussian noise between steps), then one clean pass at ``context_noise`` that
  writes its clean K/V, then the next block starts.
- At parallelism P, :class:`CascadeSchedule` decides which (block, stage) pairs share a tick; all
  pairs of a tick run in ONE model forward (one segment per block), except that a block 0 of its own
  size (an independent first frame) takes a forward of its own, before the others of its tick.
- A prompt switch in mode "recache" (LongLive) adds one forward before its block (see
  :data:`config.SWITCH_MODES`); ``Result.forwards`` counts every forward.
- With a KV recompute (``kv_recompute``, Krea Realtime) blocks run one at a time without clean passes,
  each after a forward that rebuilds its context's K/V (:mod:`recompute`); ``context_image``
  re-encodes the context's first frame.
- Randomness: the initial noise comes from ``seed`` (or is given); the re-noising noise of block b
  after step j is :func:`step_noise` (seed, b, j), drawn from its own generator, so every
  parallelism level uses the same noise for the same block and step, and the same seed on the same
  device gives identical latents.
- A prompt schedule assigns each block the prompt of the last entry starting at or before it; every
  prompt's text K/V is computed once per run, so a switch in mode "none" costs no model forward.
- Steering (``steer``, one process only): switches that arrive while the run goes on land at the next
  block to enter (or a later one asked for) and give exactly what the same switch in the schedule from
  the start gives (:mod:`steer`; ``on_switch`` reports each, a :class:`SwitchEvent`).
- The KV pool is allocated once per run (see :mod:`kv_pool`).
- A context prefix (``prefix``: F clean latent frames, a start image or a video to continue) is frames
  [0, F) of the video: clean forwards write their K/V before block 0, as the finished blocks they
  are made of (:func:`prefix_pass`); block b then holds frames F + its place in the grid (RoPE
  positions are these absolute indices), and the sink and window treat prefix frames as any frames.
  Block indices (``on_block``, the initial noise, prompt switches) count generated blocks only, from
  0; the re-noising noise of block b is drawn for block ``block_offset`` + b.
- A continuation equals one long run: after a first run of N blocks (latents A, initial noise
  [1, 16, T, h, w] the first frames of a long run's noise Z), ``generate(prefix=A, blocks=M,
  noise=Z[:, :, T:], block_offset=N)`` gives the long run's last M blocks, at parallelism 1 with
  the first run's grid and window, when A is the whole first video (the prefix blocks then are the
  first run's blocks, each written seeing what it saw there).
- One loop for one process and for each rank of several (:mod:`distributed`): a :class:`Partition`
  says which segments of a tick this process computes, how the other segments' K/V of each layer
  arrive, where finished blocks are reported, and whether the processes agree to stop. The default
  (one process) computes everything, receives nothing and reports every block where it finishes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import CascadeConfig, PromptSchedule
from .kv_pool import KVPool, PoolLayout
from .pool_attention import FULL, REUSE, SPLIT, STORE, Exchange
from .model import WanModel
from .schedule import BlockGrid, Tick
from .plan import plan_run
from .recompute import ContextImage, recompute_pass, why_a_vae
from .steer import LivePrompts, Steer, SwitchEvent
from .transfer import to_device


class Interrupted(Exception):
    """The caller asked the run to stop (raised between ticks, or between a context's blocks)."""


@dataclass(frozen=True)
class TickEvent:
    tick: int
    ticks: int
    pairs: tuple[tuple[int, int], ...]
    done_blocks: int
    seconds: float


@dataclass(frozen=True)
class BlockEvent:
    block: int
    latents: torch.Tensor  # [1, 16, frames_per_block, h, w], normalised latents
    tick: int
    seconds: float


@dataclass
class Result:
    latents: torch.Tensor  # [1, 16, prefix_frames + T, h, w]: T generated frames after the prefix kept
    blocks: int
    ticks: int
    forwards: int
    seconds: float
    first_block_seconds: float
    prefix_frames: int = 0  # frames of the context prefix at the start of ``latents`` (0: none or left out)

    @classmethod
    def of_run(cls, out: torch.Tensor, prefix_frames: int, include_prefix: bool, *stats) -> "Result":
        """The result of a run whose latents ``out`` [1, 16, F + T, h, w] start with a context prefix of
        F = ``prefix_frames`` frames, kept or left out (``include_prefix``); ``stats``: blocks, ticks,
        forwards, seconds, first_block_seconds."""
        if include_prefix or not prefix_frames:
            return cls(out, *stats, prefix_frames)
        return cls(out[:, :, prefix_frames:], *stats, 0)


def derived_seed(seed: int, block: int, step: int) -> int:
    """A distinct 63-bit seed per (run seed, block, step), independent of the order of work.

    With exact (unbounded Python) integers: x = seed*0x9E3779B97F4A7C15 + (block+1)*0xBF58476D1CE4E5B9
    + (step+1)*0x94D049BB133111EB, then x ^= x >> 31, and the result is x & (2**63 - 1).
    """
    x = (seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9 + (step + 1) * 0x94D049BB133111EB)
    x ^= x >> 31
    return x & 0x7FFF_FFFF_FFFF_FFFF


def initial_noise(seed: int, shape: Sequence[int], device: torch.device | str,
                  dtype: torch.dtype) -> torch.Tensor:
    """The run's starting noise [shape]: one ``torch.randn(shape)`` in float32 from a new
    ``torch.Generator`` on ``device`` seeded with ``seed``, cast to ``dtype``; block b takes frames
    [b*frames_per_block, (b+1)*frames_per_block) of it."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def step_noise(seed: int, block: int, step: int, like: torch.Tensor) -> torch.Tensor:
    """The fresh Gaussian noise that re-noises ``block`` after its denoising step ``step``.

    ``block`` is the absolute block index and ``step`` the 0-based index of the step just taken (the
    noise takes the block's x0 to the level of step ``step + 1``). The draw: a new
    ``torch.Generator`` on ``like.device`` seeded with :func:`derived_seed` (seed, block, step), one
    ``torch.randn(like.shape)`` call in float32 from it, cast to ``like.dtype``. Returns a tensor
    shaped like ``like`` ([1, 16, frames_per_block, h, w] in the sampler).
    """
    g = torch.Generator(device=like.device).manual_seed(derived_seed(seed, block, step))
    return torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32).to(like.dtype)


def attention_mode(flashblock: str, stage: int, clean: bool) -> str:
    """The KV pool's attention mode for one (block, stage) pair under a FlashBlock setting."""
    if flashblock == "off" or clean:
        return FULL
    if flashblock == "exact":
        return SPLIT
    return STORE if stage == 0 else REUSE


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


def _clean_forward(model: WanModel, pool: KVPool, out: torch.Tensor, lo: int, end: int, prompt,
                   context_noise: float, context) -> int:
    """One forward over the clean latents ``out[:, :, lo:end]`` at t = ``context_noise``, RoPE'd from
    the pool's position of frame ``lo``, writing their K/V through ``context``. Returns 1."""
    t = torch.full((1, end - lo), float(context_noise), device=out.device)
    model(out[:, :, lo:end], t, [pool.position(lo)], [prompt], context)
    return 1


def prefix_pass(model: WanModel, pool: KVPool, out: torch.Tensor, grid: BlockGrid, prompt, context_noise: float,
                stop: Callable[[int], bool] = lambda index: False) -> int:
    """A context prefix's clean passes, under the run's first prompt, before block 0: its clean
    latents ``out[:, :, :grid.offset]`` are written as the finished blocks they are made of
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


def _recache(model: WanModel, pool: KVPool, out: torch.Tensor, end: int, prompt, context_noise: float) -> int:
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


def generate(model: WanModel, prompts: PromptSchedule, cfg: CascadeConfig, *, blocks: int,
             width: int, height: int, seed: int = 0, noise: torch.Tensor | None = None,
             on_tick: Callable[[TickEvent], None] | None = None,
             on_block: Callable[[BlockEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             partition: Partition | None = None, prefix: torch.Tensor | None = None,
             include_prefix: bool = True, block_offset: int = 0,
             context_image: ContextImage | None = None, steer: Steer | None = None,
             on_switch: Callable[[SwitchEvent], None] | None = None) -> Result:
    """Generate ``blocks`` blocks of latent video; see the module docstring for the guarantees.

    ``prompts``: embeddings [L, text_dim] per entry; ``width``/``height`` in pixels (multiples of 16);
    ``noise``: the initial noise [1, 16, T, height/8, width/8] with T = ``cfg.grid.total(blocks)``
    (drawn from ``seed`` when None; the generated frames only). ``prefix``: a context prefix of clean
    normalised latents [1, 16, F, height/8, width/8] (a start image, F = 1, or frames to continue):
    its K/V are written by :func:`prefix_pass` (counted in ``Result.forwards``) and the ``blocks``
    blocks come after it. ``block_offset``: the video-wide index of block 0 for the re-noising noise
    (:func:`step_noise`; a continuation of a run of N blocks passes N, see the module docstring).
    ``context_image``: with a KV recompute, the re-encoder of the context's first frame
    (:data:`recompute.ContextImage`; a VAE decode and encode), needed once a block re-encodes one.
    Returns a :class:`Result` whose ``latents`` [1, 16, F + T, h, w] (the prefix left out unless
    ``include_prefix``; ``Result.prefix_frames`` says) are normalised (DiT-space) latents on the
    model's device, ``seconds`` the wall time of the loop. Callbacks: ``on_tick`` after every tick,
    ``on_block`` when a block is final, ``should_stop`` before every tick and every block of the
    context. Raises ValueError for a bad config, size, schedule, noise shape or prefix (before any
    model work, see :func:`plan_run`) and :class:`Interrupted` when ``should_stop`` says so.

    ``steer``: asked once before every tick (for tick 0 before the context's passes) for prompt switches
    [(block or None, embeddings [L, text_dim]), ...] that land while the run goes on (:mod:`steer`);
    ``on_switch`` gets a :class:`SwitchEvent` for each switch that lands or is dropped. A steered run
    checks its switch mode as one with switches (ValueError: a re-cache needs parallel 1, ...).

    ``partition``: this process's share of the work when several run the same video (used by
    :mod:`distributed`); the default computes everything here. Steering runs on one process only
    (ValueError with another partition).
    """
    if steer is not None and partition is not None and type(partition) is not Partition:
        raise ValueError("steering a running video (steer) runs on one device for now: give one device")
    part = partition or Partition()
    run = plan_run(model.cfg, prompts, cfg, blocks=blocks, width=width, height=height, noise=noise, prefix=prefix,
                   block_offset=block_offset, dtype=model.dtype)
    plan, grid, shape, lead = run.schedule, run.grid, run.shape, run.grid.offset
    if context_image is None and (why := why_a_vae(blocks, grid.frames, cfg.kv_recompute)):
        raise ValueError(f"{why}: it needs the VAE (context_image)")
    if steer is not None:
        try:
            cfg.check_run(switches=1)
        except ValueError as exc:
            raise ValueError(f"steering (prompt switches while the video runs): {exc}") from None
    device, dtype = model.device, model.dtype
    noise = initial_noise(seed, run.noise_shape, device, dtype) if noise is None else to_device(noise, device).to(dtype)

    h, w = shape[-2:]
    p = model.cfg.patch_size
    layout = PoolLayout(frames_per_block=grid.frames, tokens_per_frame=(h // p[1]) * (w // p[2]),
                        total_frames=shape[2], window=cfg.attended_window, sink=cfg.sink,
                        max_in_flight=plan.max_in_flight,
                        first_block_frames=grid.first, rolling=cfg.rolling_window, prefix_frames=lead)
    start = time.perf_counter()
    with torch.inference_mode():
        pool = KVPool(layout, model.cfg.num_layers, model.cfg.num_heads, model.cfg.head_dim, dtype, device,
                      keep_external=cfg.flashblock == "reuse",
                      slot_positions=cfg.rope_positions == "slots" or bool(cfg.kv_recompute),
                      sink_ema=cfg.sink_ema, shift_keys=model.shift_frames)
        live = LivePrompts(model, prompts, plan, cfg.switch_mode == "recache", steer, on_switch)
        prompt_of, recache_at = live.prompt_of, live.recache_at  # changed in place by steered switches
        out = torch.empty(shape, device=device, dtype=dtype)
        if lead:  # every process writes the prefix's K/V itself (each keeps a whole KV pool)
            out[:, :, :lead] = to_device(prefix, device).to(dtype)
        x_t: dict[int, torch.Tensor] = {}  # in-flight blocks: current noisy input (or x0 for the clean pass)
        clean_t = torch.full((max(grid.first, grid.frames),), float(cfg.context_noise), device=device)
        step_t = {id(f): to_device(f.timesteps, device) for f in (run.first_flow, run.flow)}
        done, first_block = 0, None
        wants_stop = lambda: should_stop is not None and should_stop()  # noqa: E731
        live.poll(0)  # a switch before tick 0 replaces the first prompt, which the prefix passes take too
        forwards = prefix_pass(model, pool, out, grid, prompt_of[0], cfg.context_noise,
                               lambda index: part.stop(Tick(index, ()), wants_stop()))
        ticks = plan.ticks()
        for tick in ticks:
            if part.stop(tick, wants_stop()):
                raise Interrupted(f"stopped at tick {tick.index} of {len(ticks)}")
            if tick.index:
                live.poll(tick.index)
            blocks_now = [b for b, _ in tick.pairs]
            for b, stage in tick.pairs:
                if stage == 0 and part.owns(b):
                    x_t[b] = noise[:, :, grid.start(b) - lead:grid.end(b) - lead]
            entering = blocks_now[-1] if tick.pairs[-1][1] == 0 else None
            if entering in recache_at:  # before the window makes room for the new block
                forwards += _recache(model, pool, out, grid.start(blocks_now[0]), recache_at[entering],
                                     cfg.context_noise)
            pool.make_room(blocks_now[0], blocks_now[-1])
            if cfg.kv_recompute and entering:  # one block in flight: it is the entering one
                forwards += recompute_pass(model, pool, out, grid, entering, cfg.kv_recompute, prompt_of[entering - 1],
                                           cfg.context_noise, context_image)
            newest_end = grid.end(blocks_now[-1])
            v_of: dict[int, torch.Tensor] = {}  # segment index -> velocity [1, 16, frames, h, w]
            for group in size_groups(blocks_now, grid):
                pairs = [tick.pairs[i] for i in group]
                gb = [b for b, _ in pairs]
                clean = [plan.is_clean(b, s) for b, s in pairs]
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
                t = torch.stack([clean_t[:size] if clean[k] else step_t[id(run.flow_of(gb[k]))][pairs[k][1]].expand(size)
                                 for k in local])  # [n, frames]
                mine = [gb[k] for k in local]
                v = model(torch.cat([x_t[b] for b in mine]), t, [pool.position(grid.start(b)) for b in mine],
                          [prompt_of[b] for b in mine], context)
                v_of.update({group[k]: v[r:r + 1] for r, k in enumerate(local)})
            for i, (b, stage) in enumerate(tick.pairs):
                if plan.is_clean(b, stage):
                    x_t.pop(b, None)
                    continue
                flow = run.flow_of(b)
                last = stage + 1 == len(flow)
                x0 = None
                if i in v_of:
                    x0 = flow.x0(x_t[b], v_of[i].to(dtype), stage)
                    # after the last step the clean pass runs on x0 itself
                    x_t[b] = x0 if last else flow.renoise(x0, stage + 1,
                                                          step_noise(seed, block_offset + b, stage, x0))
                if not last:
                    continue
                if not plan.clean_pass:  # no clean pass follows: the block is done
                    x_t.pop(b, None)
                done += 1
                latents = part.collect(b, x0, grid.size(b))
                if latents is None:  # finished on another process, reported there
                    continue
                out[:, :, grid.start(b):grid.end(b)] = latents
                elapsed = time.perf_counter() - start
                first_block = elapsed if first_block is None else first_block
                if on_block is not None:
                    on_block(BlockEvent(b, latents, tick.index, elapsed))
            if on_tick is not None:
                on_tick(TickEvent(tick.index, len(ticks), tick.pairs, done, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return Result.of_run(out, lead, include_prefix, blocks, len(ticks), forwards, seconds, first_block or seconds)
