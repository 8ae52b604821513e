"""Block-causal sampling with Block Cascading: the run loop (its settings: :mod:`sampling.config`; its plan:
:mod:`sampling.plan`; the phases of a tick: :mod:`sampling.ticks`).

Guarantees:
- At parallelism 1 the order of work is the reference's: each block runs its S denoising steps
  (re-noised with fresh Gaussian noise between steps; with ``cfg.solver`` "unipc", LongLive 2.0's, moved by
  a UniPC solver of its own that draws nothing: :mod:`sampling.unipc`), then one clean pass at
  ``context_noise`` that writes its clean K/V, then the next block starts.
- At parallelism P, :class:`CascadeSchedule` decides which (block, stage) pairs share a tick; all
  pairs of a tick run in ONE model forward (one segment per block), except that a block 0 of its own
  size (an independent first frame) takes a forward of its own, before the others of its tick.
- A prompt switch in mode "recache" (LongLive) adds one forward before its block (see
  :data:`sampling.config.SWITCH_MODES`); ``Result.forwards`` counts every forward.
- With a KV recompute (``kv_recompute``, Krea Realtime) blocks run one at a time without clean passes,
  each after a forward that rebuilds its context's K/V (:mod:`sampling.recompute`); ``context_image``
  re-encodes the context's first frame.
- Randomness (:mod:`sampling.noise`): the initial noise comes from ``seed`` (or is given; an endless run draws
  each block's from its own generator); the re-noising noise of block b
  after step j is :func:`step_noise` (seed, b, j), drawn from its own generator, so every
  parallelism level uses the same noise for the same block and step, and the same seed on the same
  device gives identical latents.
- A prompt schedule assigns each block the prompt of the last entry starting at or before it; every
  prompt's text K/V is computed once per run, so a switch in mode "none" costs no model forward. A switch
  with ``blend_blocks`` N conditions its first N blocks on blends of the old and new embeddings
  (:mod:`sampling.blend`; N = 0: the hard switch).
- Steering (``steer``, one process only): switches that arrive while the run goes on land at the next
  block to enter (or a later one asked for) and give exactly what the same switch in the schedule from
  the start gives (:mod:`sampling.steer`; ``on_switch`` reports each, a :class:`SwitchEvent`).
- The KV pool and the latents the run reads back are allocated once per run (see :mod:`model.kv_pool`,
  :mod:`sampling.latent_window`); an endless run (``blocks`` 0, with a window) keeps them, and its prompt
  table, bounded however long it goes.
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
from typing import Callable

import torch

from ..common.transfer import to_device
from ..model.dit import WanModel
from ..model.experts import ExpertPair
from ..model.kv_pool import KVPool
from .config import CascadeConfig, PromptSchedule
from .latent_window import LatentWindow
from .noise import block_noise, initial_noise
from .plan import RunPlan, check_inputs, plan_run, prefix_frames_of
from .recompute import ContextImage, why_a_vae
from .schedule import Tick
from .steer import LivePrompts, Steer, SwitchEvent
from .ticks import Interrupted, Partition, TickPhases, check_image_latent, prefix_pass


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
    first_frame: int = 0  # video-wide index of latents' first frame (prefix counted): > 0 when frames before it
    # are left out (the prefix, or all but an endless run's last window)

    @classmethod
    def of_run(cls, latents: torch.Tensor, first_frame: int, prefix_frames: int, include_prefix: bool,
               *stats) -> "Result":
        """The result of a run that holds ``latents`` [1, 16, n, h, w], frames [first_frame, first_frame +
        n) of a video that starts with a context prefix of ``prefix_frames`` frames, those among them
        kept or left out (``include_prefix``); ``stats``: blocks, ticks, forwards, seconds,
        first_block_seconds."""
        held_prefix = max(0, prefix_frames - first_frame)
        cut = 0 if include_prefix else held_prefix
        return cls(latents[:, :, cut:], *stats, held_prefix - cut, first_frame + cut)


def generate(model: WanModel, prompts: PromptSchedule, cfg: CascadeConfig, *, blocks: int,
             width: int, height: int, seed: int = 0, noise: torch.Tensor | None = None,
             on_tick: Callable[[TickEvent], None] | None = None,
             on_block: Callable[[BlockEvent], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             partition: Partition | None = None, prefix: torch.Tensor | None = None,
             include_prefix: bool = True, block_offset: int = 0,
             context_image: ContextImage | None = None, steer: Steer | None = None,
             on_switch: Callable[[SwitchEvent], None] | None = None, plan: RunPlan | None = None,
             image_latent: torch.Tensor | None = None) -> Result:
    """Generate ``blocks`` blocks of latent video (0: endless, until ``should_stop``); see the module
    docstring for the guarantees.

    ``prompts``: embeddings [L, text_dim] per entry; ``width``/``height`` in pixels (multiples of 16);
    ``noise``: the initial noise [1, 16, T, height/8, width/8] with T = ``cfg.grid.total(blocks)``
    (drawn from ``seed`` when None; the generated frames only). ``prefix``: a context prefix of clean
    normalised latents [1, 16, F, height/8, width/8] (a start image, F = 1, or frames to continue):
    its K/V are written by :func:`prefix_pass` (counted in ``Result.forwards``) and the ``blocks``
    blocks come after it. ``block_offset``: the video-wide index of block 0 for the re-noising noise
    (:func:`step_noise`; a continuation of a run of N blocks passes N, see the module docstring).
    ``context_image``: with a KV recompute, the re-encoder of the context's first frame
    (:data:`sampling.recompute.ContextImage`; a VAE decode and encode), needed once a block re-encodes one.
    Returns a :class:`Result` whose ``latents`` [1, 16, F + T, h, w] (the prefix left out unless
    ``include_prefix``; ``Result.prefix_frames`` says) are normalised (DiT-space) latents on the
    model's device, ``seconds`` the wall time of the loop. Callbacks: ``on_tick`` after every tick,
    ``on_block`` when a block is final, ``should_stop`` before every tick and every block of the
    context. Raises ValueError for a bad config, size, schedule, noise shape or prefix (before any
    model work, see :func:`plan_run`) and :class:`Interrupted` when ``should_stop`` says so.

    An endless run (``blocks`` 0; a window is needed, one device, no ``noise``) draws each block's
    initial noise as it enters (:func:`sampling.noise.block_noise`, its video-wide index ``block_offset`` + b),
    holds a bounded KV pool, latent window and prompt table however long it runs, and ends normally
    when ``should_stop`` says so before a tick once a block is final: its :class:`Result` then counts
    the blocks finished and holds the last window's latents (``Result.first_frame`` says where they
    start; blocks still in flight are dropped); stopped before that, it raises :class:`Interrupted`
    (nothing was made). ``on_tick``'s ``ticks`` is 0 (unknown).

    ``steer``: asked once before every tick (for tick 0 before the context's passes) for prompt switches
    [(block or None, embeddings [L, text_dim][, blend_blocks]), ...] that land while the run goes on
    (:mod:`sampling.steer`);
    ``on_switch`` gets a :class:`SwitchEvent` for each switch that lands or is dropped. A steered run
    checks its switch mode as one with switches (ValueError: a re-cache needs parallel 1, ...).

    ``partition``: this process's share of the work when several run the same video (used by
    :mod:`distributed`); the default computes everything here. Steering runs on one process only
    (ValueError with another partition).

    ``plan``: the run's plan where the caller made it at its entry (:func:`sampling.plan.plan_run`, its rules
    checked there); without it the run is planned here. ValueError for a plan of another run.

    ``image_latent``: a clean latent frame [1, C, 1, h, w] held as block 0's frame 0 at timestep 0 in every
    forward (LongLive 2.0's image-to-video; :mod:`sampling.ticks`, ValueError: :func:`ticks.check_image_latent`).
    The prompt schedule's ``scene_cuts`` move the RoPE positions and pin blocks as the config says
    (``shot_rope_offset``, ``multi_shot_sink``).
    """
    if steer is not None and partition is not None and type(partition) is not Partition:
        raise ValueError("steering a running video (steer) runs on one device for now: give one device")
    part = partition or Partition()
    run = plan or plan_run(cfg, blocks=blocks, width=width, height=height, patch=model.cfg.patch_size,
                           prefix_frames=prefix_frames_of(prefix), switches=len(prompts.entries) - 1,
                           steered=steer is not None, latent_space=model.cfg.latent_space)
    if not run.fits(cfg, blocks, width, height, model.cfg.patch_size, model.cfg.latent_space) \
            or (steer is not None and not run.steered) \
            or (partition is None and run.devices != 1):
        raise ValueError("the plan given to generate is the plan of another run (its settings, size, steering or "
                         "devices)")
    check_inputs(run, prompts, model.cfg.text_dim, noise=noise, prefix=prefix, block_offset=block_offset,
                 dtype=model.dtype)
    check_image_latent(image_latent, run)
    if isinstance(model, ExpertPair):  # two experts (Wan2.2 A14B): one KV pool each, one process
        model.check_run(cfg, type(part) is not Partition)
    schedule, grid, shape, lead = run.schedule, run.grid, run.shape, run.grid.offset
    if context_image is None and (why := why_a_vae(blocks, grid.frames, cfg.kv_recompute)):
        raise ValueError(f"{why}: it needs the VAE (context_image)")
    device, dtype = model.device, model.dtype
    endless = schedule.endless
    if noise is None and not endless:
        noise = initial_noise(seed, run.noise_shape, device, dtype)
    elif noise is not None:
        noise = to_device(noise, device).to(dtype)

    h, w = shape[-2:]

    def noise_of(b: int) -> torch.Tensor:  # block b's initial noise [1, 16, its frames, h, w]
        if endless:
            return block_noise(seed, block_offset + b, (*shape[:2], grid.size(b), h, w), device, dtype)
        return noise[:, :, grid.start(b) - lead:grid.end(b) - lead]

    start = time.perf_counter()
    with torch.inference_mode():
        new_kv = model.kv_pool if isinstance(model, ExpertPair) else KVPool  # an expert pair: a pool per expert
        pool = new_kv(run.layout, model.cfg.num_layers, model.cfg.num_heads, model.cfg.head_dim, dtype, device,
                      keep_external=cfg.flashblock == "reuse",
                      slot_positions=cfg.rope_positions == "slots" or bool(cfg.kv_recompute),
                      sink_ema=cfg.sink_ema, shift_keys=model.shift_frames, kv_dtype=cfg.kv_dtype,
                      pinned=cfg.sink if cfg.multi_shot_sink and prompts.scene_cuts else 0)
        live = LivePrompts(model, prompts, schedule, cfg.switch_mode == "recache", steer, on_switch)
        out = LatentWindow(shape[2], shape[1], h, w, dtype, device)
        if lead:  # every process writes the prefix's K/V itself (each keeps a whole KV pool)
            out.write(0, to_device(prefix, device).to(dtype))
        phases = TickPhases(model, run, pool, live, out, part, noise_of, seed, block_offset, context_image,
                            prompts.scene_cuts, image_latent)
        done, first_block, ticks_run = 0, None, 0
        wants_stop = lambda: should_stop is not None and should_stop()  # noqa: E731
        live.poll(0)  # a switch before tick 0 replaces the first prompt, which the prefix passes take too
        forwards = prefix_pass(model, pool, out, grid, live.prompt(0), cfg.context_noise,
                               lambda index: part.stop(Tick(index, ()), wants_stop()))
        ticks_total = 0 if endless else len(schedule)
        for tick in schedule.iter_ticks():
            if part.stop(tick, wants_stop()):
                if endless and done:  # the normal end of an endless video, once it made something
                    break
                raise Interrupted(f"stopped at tick {tick.index}" + (" before block 0 was final" if endless else
                                                                     f" of {ticks_total}"))
            ticks_run += 1
            phases.enter(tick)
            forwards += phases.make_context(tick)
            v_of, forwarded = phases.denoise(tick)
            forwards += forwarded
            for b, x0 in phases.advance(tick, v_of):
                done += 1
                latents = part.collect(b, x0, grid.size(b))
                if latents is None:  # finished on another process, reported there
                    continue
                out.write(grid.start(b), latents)
                elapsed = time.perf_counter() - start
                first_block = elapsed if first_block is None else first_block
                if on_block is not None:
                    on_block(BlockEvent(b, latents, tick.index, elapsed))
            if on_tick is not None:
                on_tick(TickEvent(tick.index, ticks_total, tick.pairs, done, time.perf_counter() - start))
    seconds = time.perf_counter() - start
    first, latents = out.last(cfg.attended_window if endless else out.end)
    return Result.of_run(latents, first, lead, include_prefix, done if endless else blocks, ticks_run, forwards,
                         seconds, first_block or seconds)
