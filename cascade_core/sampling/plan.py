"""A run's arguments checked and planned before any model work: the one place for one process and
for several (:mod:`parallel.wire` validates a pool's job with it).

Guarantees: :func:`plan_run` raises ValueError for a bad config, size, prompt schedule, initial noise,
context prefix or block offset before anything is allocated; the :class:`RunPlan` it returns fixes the
block grid (the prefix's frames before block 0), the noise levels, the tick plan and the latents'
shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..common.constants import LATENT_CHANNELS, PIXELS_PER_LATENT
from ..model.dit import WanConfig
from ..model.grid import BlockGrid
from ..model.kv_pool import PoolLayout
from .config import CascadeConfig, PromptSchedule
from .latent_window import held_frames
from .schedule import CascadeSchedule, FlowSchedule


def latent_size(width: int, height: int, patch: Sequence[int] = (1, 2, 2)) -> tuple[int, int]:
    """Latent (h, w) of a video size; width and height must be multiples of 8*patch (16 for Wan)."""
    mult = PIXELS_PER_LATENT * max(patch[1], patch[2])
    for name, v in (("width", width), ("height", height)):
        if v < mult or v % mult:
            raise ValueError(f"{name} must be a positive multiple of {mult}, got {v}")
    return height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT


@dataclass(frozen=True)
class RunPlan:
    """A checked run: block sizes (``grid.offset``: the context prefix's frames), noise levels, tick
    plan and the shape [1, 16, F + T, h, w] of the latents, prefix included; an endless run's
    (``schedule.endless``) holds only its last frames, [1, 16, held, h, w]
    (:func:`latent_window.held_frames`)."""

    grid: BlockGrid
    first_flow: FlowSchedule
    flow: FlowSchedule
    schedule: CascadeSchedule
    shape: tuple[int, ...]
    layout: PoolLayout  # the KV pool's frames: window, sink, its anchors, the blocks in flight

    def flow_of(self, block: int) -> FlowSchedule:
        return self.first_flow if block == 0 else self.flow

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The initial noise's shape [1, 16, T, h, w]: the generated frames only (a finite run)."""
        return (*self.shape[:2], self.shape[2] - self.grid.offset, *self.shape[3:])


def schedule_of(cfg: CascadeConfig, blocks: int) -> CascadeSchedule:
    """The tick plan of ``blocks`` blocks (0: endless) under ``cfg``: the one place that says how many blocks
    are in flight (``max_in_flight``). Raises ValueError for a bad step list or parallelism."""
    first, flow = cfg.flows()
    return CascadeSchedule(blocks, len(flow), cfg.parallel, cfg.fold_clean, len(first), clean_pass=not cfg.kv_recompute)


def layout_of(model_cfg: WanConfig, cfg: CascadeConfig, schedule: CascadeSchedule, grid: BlockGrid, h: int, w: int,
              total_frames: int | None) -> PoolLayout:
    """The KV pool's layout for latents of h x w: tokens per frame from the model's patch, the window and sink,
    the blocks in flight of ``schedule``; ``total_frames`` None: an endless video (a bounded pool)."""
    p = model_cfg.patch_size
    return PoolLayout(frames_per_block=grid.frames, tokens_per_frame=(h // p[1]) * (w // p[2]),
                      total_frames=total_frames, window=cfg.attended_window, sink=cfg.sink,
                      max_in_flight=schedule.max_in_flight, first_block_frames=grid.first, rolling=cfg.rolling_window,
                      prefix_frames=grid.offset)


def check_prefix_config(cfg: CascadeConfig) -> None:
    """Raises ValueError where a context prefix is not defined yet: with a rolling window (its clean
    passes' own window and the re-positioned sink), slot RoPE positions or an EMA sink (Reward
    Forcing's positions and blend are defined for blocks only), or a KV recompute (Krea Realtime's
    context comes from generated blocks). Frontends ask before reading a file."""
    why = ("a rolling window" if cfg.rolling_window else "slot RoPE positions" if cfg.rope_positions != "absolute"
           else "an EMA sink" if cfg.sink_ema else "a KV cache recomputed every block (kv_recompute 0 turns it off)"
           if cfg.kv_recompute else None)
    if why:
        raise ValueError(f"a context prefix is not defined with {why}; run without the prefix or without {why}")


def check_prefix(prefix: torch.Tensor | None, cfg: CascadeConfig, h: int, w: int,
                 dtype: torch.dtype | None = None) -> int:
    """The frames F of a context prefix of clean latents [1, 16, F, h, w] (0 without one).

    Raises ValueError for anything but a real floating-point tensor of that shape with F >= 1, for NaN
    or infinite values (also once cast to the run's ``dtype``, when given), and where a prefix is not
    defined (:func:`check_prefix_config`)."""
    if prefix is None:
        return 0
    check_prefix_config(cfg)
    shape = list(prefix.shape) if isinstance(prefix, torch.Tensor) else None
    if shape is None or len(shape) != 5 or shape[:2] != [1, LATENT_CHANNELS] or shape[3:] != [h, w] or shape[2] < 1:
        raise ValueError(f"the prefix must be clean latents [1, {LATENT_CHANNELS}, F, {h}, {w}] with F >= 1 frames, "
                         f"got {shape if shape is not None else type(prefix).__name__}")
    if not prefix.is_floating_point():
        raise ValueError(f"the prefix must be real floating-point latents, got {str(prefix.dtype).removeprefix('torch.')}")
    if not bool(torch.isfinite(prefix.double()).all()):  # double(): float8 has no isfinite
        raise ValueError("the prefix holds NaN or infinite values")
    if dtype is not None and not bool(torch.isfinite(prefix.to(dtype).float()).all()):
        raise ValueError(f"the prefix's values (up to {prefix.double().abs().max().item():.3g}) overflow the run's "
                         f"{str(dtype).removeprefix('torch.')}; clean latents are of order 1")
    return shape[2]


def plan_run(model_cfg: WanConfig, prompts: PromptSchedule, cfg: CascadeConfig, *, blocks: int, width: int,
             height: int, noise: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
             block_offset: int = 0, dtype: torch.dtype | None = None) -> RunPlan:
    """Every check of a run's arguments, before any model work (one place for one process and for
    several). Raises ValueError for a bad config, size, prompt schedule, initial noise or context
    prefix (:func:`check_prefix`, ``dtype``: the run's) or a ``block_offset`` that is no int >= 0."""
    cfg.validate()
    if type(block_offset) is not int or block_offset < 0:
        raise ValueError(f"block_offset (the video-wide index of block 0) must be an int >= 0, got {block_offset!r}")
    first, flow = cfg.flows()
    schedule = schedule_of(cfg, blocks)
    prompts.validate(blocks, model_cfg.text_dim)
    cfg.check_run(len(prompts.entries) - 1, endless=schedule.endless)
    h, w = latent_size(width, height, model_cfg.patch_size)
    grid = BlockGrid(cfg.grid.frames, cfg.grid.first, check_prefix(prefix, cfg, h, w, dtype))
    held = held_frames(cfg, None if schedule.endless else grid.total(blocks), grid.offset)
    run = RunPlan(grid, first, flow, schedule, (1, LATENT_CHANNELS, held, h, w),
                  layout_of(model_cfg, cfg, schedule, grid, h, w, None if schedule.endless else held))
    if noise is not None and schedule.endless:
        raise ValueError("an endless video draws each block's initial noise as it enters (noise.block_noise): "
                         "give no initial noise, or a length in blocks")
    if noise is not None and tuple(noise.shape) != run.noise_shape:
        raise ValueError(f"the initial noise must be {list(run.noise_shape)}, got {list(noise.shape)}")
    if noise is not None and not bool(torch.isfinite(noise).all()):
        raise ValueError("the initial noise holds NaN or infinite values")
    return run
