"""The one plan of a run, derived once where the run enters (the CLI, the sampler node, the API's
:func:`sampling.loop.generate`, a worker pool's job) and taken by everything after it: the tick loop, the
memory estimate, the pool.

Guarantees: :func:`plan_run` checks every rule of a run's settings (the config, the size, prompt switches,
devices, steering, a prefix where one is defined) before anything is loaded or allocated, and fixes the
block grid (the prefix's frames before block 0), the noise levels, the tick plan with its blocks in flight,
the KV pool's layout and the latents' shape; :func:`check_inputs` checks the run's tensors (prompts, initial
noise, prefix, block offset) against it. Both raise ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..common.latent_space import WAN21_LATENTS, LatentSpace
from ..model.grid import BlockGrid
from ..model.kv_pool import PoolLayout
from .config import CascadeConfig, PromptSchedule
from .latent_window import held_frames
from .schedule import CascadeSchedule, FlowSchedule


class SteeringRefused(ValueError):
    """A run that cannot take prompt switches while it goes on (``plan_run(..., steered=True)``)."""


def latent_size(width: int, height: int, patch: Sequence[int] = (1, 2, 2),
                latent_space: LatentSpace = WAN21_LATENTS) -> tuple[int, int]:
    """Latent (h, w) of a video size in ``latent_space`` (pixels / its spatial factor); width and height must be
    multiples of spatial x patch (16 px for Wan2.1, 32 px for Wan2.2). Raises ValueError naming the multiple."""
    return latent_space.latent_size(width, height, patch)


@dataclass(frozen=True)
class RunPlan:
    """A checked run: block sizes (``grid.offset``: the context prefix's frames), noise levels, tick
    plan and the shape [1, C, F + T, h, w] of the latents, prefix included; an endless run's
    (``schedule.endless``) holds only its last frames, [1, C, held, h, w]
    (:func:`sampling.latent_window.held_frames`). C, h, w: the model's ``latent_space``'s channels and the
    video's size over its spatial factor (Wan2.1: 16 channels, 8 px a latent pixel; Wan2.2: 48, 16 px)."""

    cfg: CascadeConfig
    grid: BlockGrid
    first_flow: FlowSchedule
    flow: FlowSchedule
    schedule: CascadeSchedule  # the ticks; ``max_in_flight``: the blocks in flight, said here only
    shape: tuple[int, ...]
    layout: PoolLayout  # the KV pool's frames: window, sink, its anchors, the blocks in flight
    patch: tuple[int, ...]  # the model's patch (t, h, w) the size was checked against
    switches: int  # prompt switches of the schedule it was planned for
    devices: int
    steered: bool
    latent_space: LatentSpace = WAN21_LATENTS  # the model's (``WanConfig.latent_space``)

    @property
    def width(self) -> int:
        """The video's width in pixels."""
        return self.shape[-1] * self.latent_space.spatial

    @property
    def height(self) -> int:
        """The video's height in pixels."""
        return self.shape[-2] * self.latent_space.spatial

    def with_prefix(self, frames: int) -> RunPlan:
        """This plan with a context prefix of ``frames`` latent frames before block 0, for a frontend that
        learns their count from a file after planning (where a prefix is defined is checked with the prefix
        itself: :func:`check_prefix`)."""
        return _derive(self.cfg, self.first_flow, self.flow, self.schedule, *self.shape[-2:], self.patch, frames,
                       self.switches, self.devices, self.steered, self.latent_space)

    def fits(self, cfg: CascadeConfig, blocks: int, width: int, height: int, patch: Sequence[int],
             latent_space: LatentSpace | None = None) -> bool:
        """Whether this plan is the plan of a run with these arguments (``latent_space``: the model's; None: not
        compared)."""
        return (self.cfg == cfg and self.schedule.blocks == blocks and tuple(patch) == self.patch
                and (self.width, self.height) == (width, height)
                and (latent_space is None or latent_space == self.latent_space))

    def flow_of(self, block: int) -> FlowSchedule:
        return self.first_flow if block == 0 else self.flow

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The initial noise's shape [1, C, T, h, w]: the generated frames only (a finite run)."""
        return (*self.shape[:2], self.shape[2] - self.grid.offset, *self.shape[3:])


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
                 dtype: torch.dtype | None = None, latent_space: LatentSpace = WAN21_LATENTS) -> int:
    """The frames F of a context prefix of clean latents [1, C, F, h, w] (0 without one; C: ``latent_space``'s
    channels).

    Raises ValueError for anything but a real floating-point tensor of that shape with F >= 1, for NaN
    or infinite values (also once cast to the run's ``dtype``, when given), and where a prefix is not
    defined (:func:`check_prefix_config`)."""
    if prefix is None:
        return 0
    check_prefix_config(cfg)
    shape = list(prefix.shape) if isinstance(prefix, torch.Tensor) else None
    c = latent_space.channels
    if shape is None or len(shape) != 5 or shape[:2] != [1, c] or shape[3:] != [h, w] or shape[2] < 1:
        raise ValueError(f"the prefix must be clean latents [1, {c}, F, {h}, {w}] with F >= 1 frames, "
                         f"got {shape if shape is not None else type(prefix).__name__}")
    if not prefix.is_floating_point():
        raise ValueError(f"the prefix must be real floating-point latents, got {str(prefix.dtype).removeprefix('torch.')}")
    if not bool(torch.isfinite(prefix.double()).all()):  # double(): float8 has no isfinite
        raise ValueError("the prefix holds NaN or infinite values")
    if dtype is not None and not bool(torch.isfinite(prefix.to(dtype).float()).all()):
        raise ValueError(f"the prefix's values (up to {prefix.double().abs().max().item():.3g}) overflow the run's "
                         f"{str(dtype).removeprefix('torch.')}; clean latents are of order 1")
    return shape[2]


def plan_run(cfg: CascadeConfig, *, blocks: int, width: int, height: int, patch: Sequence[int] = (1, 2, 2),
             prefix_frames: int = 0, switches: int = 0, devices: int = 1, steered: bool = False,
             latent_space: LatentSpace = WAN21_LATENTS) -> RunPlan:
    """The one plan of a run, its settings checked: every rule once, before any model work and before any
    tensor exists (frontends call it where a run enters; :func:`sampling.loop.generate` takes the plan).

    ``blocks`` 0: endless; ``width``/``height`` in pixels (multiples of the ``latent_space``'s spatial factor x
    the model's ``patch``: 16 for Wan2.1, 32 for Wan2.2); ``latent_space``: the model's
    (``WanConfig.latent_space``), which gives the latents their channels and size;
    ``prefix_frames``: latent frames of a context prefix before block 0; ``switches``: prompt switches of
    the schedule; ``devices``: devices the run is spread over; ``steered``: switches may arrive while it runs
    (checked as a run with switches; :class:`SteeringRefused` where it cannot be). Raises ValueError naming the rule (the config's
    :meth:`~sampling.config.CascadeConfig.validate` and ``check_run``, the size, a prefix where none is
    defined)."""
    cfg.validate()
    first, flow = cfg.flows()
    schedule = CascadeSchedule(blocks, len(flow), cfg.parallel, cfg.fold_clean, len(first),
                               clean_pass=not cfg.kv_recompute)
    cfg.check_run(switches, devices, endless=schedule.endless)
    if steered:
        why = "steering (prompt switches while the video runs)"
        if devices > 1:
            raise SteeringRefused(f"{why} runs on one device for now: give one device")
        try:
            cfg.check_run(switches=1, devices=devices)
        except ValueError as exc:
            raise SteeringRefused(f"{why}: {exc}") from None
    h, w = latent_size(width, height, patch, latent_space)
    if prefix_frames:
        check_prefix_config(cfg)
    return _derive(cfg, first, flow, schedule, h, w, tuple(patch), prefix_frames, switches, devices, steered,
                   latent_space)


def _derive(cfg: CascadeConfig, first: FlowSchedule, flow: FlowSchedule, schedule: CascadeSchedule, h: int, w: int,
            patch: tuple[int, ...], prefix_frames: int, switches: int, devices: int, steered: bool,
            latent_space: LatentSpace) -> RunPlan:
    """The plan's derived parts: the block grid after the prefix, the latents held, the KV pool's layout."""
    grid = BlockGrid(cfg.grid.frames, cfg.grid.first, prefix_frames)
    held = held_frames(cfg, None if schedule.endless else grid.total(schedule.blocks), grid.offset)
    layout = PoolLayout(frames_per_block=grid.frames, tokens_per_frame=(h // patch[1]) * (w // patch[2]),
                        total_frames=None if schedule.endless else held, window=cfg.attended_window, sink=cfg.sink,
                        max_in_flight=schedule.max_in_flight, first_block_frames=grid.first,
                        rolling=cfg.rolling_window, prefix_frames=grid.offset)
    return RunPlan(cfg, grid, first, flow, schedule, (1, latent_space.channels, held, h, w), layout, patch, switches,
                   devices, steered, latent_space)


def check_inputs(run: RunPlan, prompts: PromptSchedule, text_dim: int | None, *, noise: torch.Tensor | None = None,
                 prefix: torch.Tensor | None = None, block_offset: int = 0, dtype: torch.dtype | None = None) -> None:
    """The run's tensors against its plan: the prompt schedule (``text_dim``: the model's; no more switches
    than planned), the initial noise, the context prefix (:func:`check_prefix`, ``dtype``: the run's) and a
    ``block_offset`` that is an int >= 0. Raises ValueError."""
    if type(block_offset) is not int or block_offset < 0:
        raise ValueError(f"block_offset (the video-wide index of block 0) must be an int >= 0, got {block_offset!r}")
    prompts.validate(run.schedule.blocks, text_dim)
    if len(prompts.entries) - 1 > run.switches:
        raise ValueError(f"the prompt schedule holds {len(prompts.entries) - 1} switches; the run was planned with "
                         f"{run.switches}")
    h, w = run.shape[-2:]
    frames = check_prefix(prefix, run.cfg, h, w, dtype, run.latent_space)
    if frames != run.grid.offset:
        raise ValueError(f"the prefix holds {frames} latent frames; the run was planned with {run.grid.offset}")
    check_noise(run, noise)


def check_noise(run: RunPlan, noise: torch.Tensor | None) -> None:
    """The initial noise against its plan (None: drawn by the run): a video of known length, of the plan's
    :attr:`RunPlan.noise_shape` ([1, C, T, H/s, W/s] of its latent space), finite. Raises ValueError. The CLI
    asks it as soon as the plan is made, before any weight is read; :func:`check_inputs` again at the run."""
    if noise is None:
        return
    if run.schedule.endless:
        raise ValueError("an endless video draws each block's initial noise as it enters (noise.block_noise): "
                         "give no initial noise, or a length in blocks")
    if tuple(noise.shape) != run.noise_shape:
        raise ValueError(f"the initial noise must be {list(run.noise_shape)}, got {list(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("the initial noise holds NaN or infinite values")


def prefix_frames_of(prefix) -> int:
    """Latent frames of a context prefix [1, C, F, h, w] for its plan (0 for None or anything of another
    form: :func:`check_inputs` names what is wrong with it)."""
    return prefix.shape[2] if isinstance(prefix, torch.Tensor) and prefix.dim() == 5 else 0
