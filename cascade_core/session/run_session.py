"""The engine-facing steps of one run, the same for every frontend.

Guarantees:
- :meth:`RunSession.plan` is the run's one plan (:func:`sampling.plan.plan_run`): every rule of its settings is
  checked there, once, before any file is read into the model or any memory is allocated.
- :meth:`RunSession.memory` is the one estimate (:func:`sampling.memory.estimate_run_bytes`) of that plan, which
  each frontend holds against its device's free memory (in its own words) before model work.
- :meth:`RunSession.run` runs the planned video on one device, on a worker pool of several
  (:mod:`distributed`) or in a torchrun process group, with the plan handed on (nothing is derived again),
  and :meth:`RunSession.close` (or leaving the ``with`` block) stops what the session started.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from .. import distributed
from ..common.latent_space import WAN21_LATENTS, LatentSpace, check_decoder_space
from ..model.dit import WanModel
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.loop import Result, generate
from ..sampling.memory import estimate_run_bytes
from ..sampling.plan import RunPlan, plan_run

TORCHRUN = "torchrun"


class RunSession:
    """One run: ``cfg`` for ``blocks`` blocks (0: endless) of ``width`` x ``height`` pixels on ``devices`` (one
    device, two or more, or :data:`TORCHRUN` with ``ranks`` processes), ``prefix_frames`` latent frames of a
    context prefix before block 0, ``switches`` prompt switches scheduled, ``steered``: switches may arrive
    while it runs, ``patch``: the model's patch, ``latent_space``: its latents' (``WanConfig.latent_space``).
    Raises ValueError naming the rule a setting breaks.
    ``keep_pool``: several devices run on the process's lasting pool (:func:`distributed.get_pool`), which
    outlives the session; otherwise the session starts a pool of its own and stops it on close."""

    def __init__(self, cfg: CascadeConfig, *, blocks: int, width: int, height: int,
                 devices: Sequence[torch.device] | str, ranks: int | None = None, prefix_frames: int = 0,
                 switches: int = 0, steered: bool = False, patch: Sequence[int] = (1, 2, 2), keep_pool: bool = False,
                 latent_space: LatentSpace = WAN21_LATENTS):
        if isinstance(devices, str) and (devices != TORCHRUN or not isinstance(ranks, int) or ranks < 1):
            raise ValueError(f"devices: a list of devices, or {TORCHRUN!r} with its number of ranks; got {devices!r}")
        self.devices = devices
        self.ranks = ranks if devices == TORCHRUN else len(devices)
        self.keep_pool = keep_pool
        self.plan: RunPlan = plan_run(cfg, blocks=blocks, width=width, height=height, patch=patch,
                                      prefix_frames=prefix_frames, switches=switches, devices=self.ranks,
                                      steered=steered, latent_space=latent_space)
        self.pool: distributed.WorkerPool | None = None

    def check_decoder(self, decoder_space: LatentSpace, what: str) -> None:
        """The one check of a decoder (or VAE) against the run's model: ValueError naming both (``what``: the decoder
        as the frontend names it, e.g. "--vae wan_2.1_vae.safetensors") when it decodes another latent space than
        the plan's (:func:`common.latent_space.check_decoder_space`)."""
        check_decoder_space(self.plan.latent_space, decoder_space, what)

    @property
    def pooled(self) -> bool:
        """Whether the run goes to worker processes (two or more local devices)."""
        return self.devices != TORCHRUN and self.ranks > 1

    def memory(self, model_cfg, dtype: torch.dtype, prompts: int, vae_bytes: int, experts: int = 1) -> tuple[int, str]:
        """(bytes, what they are made of) the run needs on one device besides the DiT weights (one rank's share
        on a pool); ``prompts``: entries of the prompt schedule, ``vae_bytes``: the decoders' weights there,
        ``experts``: the model's (2: a Wan2.2 A14B pair, a KV pool each)."""
        return estimate_run_bytes(self.plan, model_cfg, dtype, prompts, vae_bytes, ranks=self.ranks, experts=experts)

    def decode_device(self, device: torch.device, choice: torch.device | None = None) -> torch.device:
        """Where the frontend decodes finished blocks (the output's and the preview's decoders): ``choice`` (a device
        of its own) where given; with several local devices the last of them, beside that rank's share of the DiT
        rather than in the caller's process on the first; else ``device`` (the run's; this rank's under torchrun).
        The blocks' latents reach it from host memory (the pool hands them out there)."""
        if choice is not None:
            return choice
        return self.devices[-1] if self.pooled else device

    def runner(self, device: torch.device | None = None) -> Callable[..., Result]:
        """The engine's generate for the session's devices (same signature and result for each): one device,
        the worker pool (started here, or the process's lasting one), or the torchrun group (``device``: this
        rank's)."""
        if self.devices == TORCHRUN:
            return functools.partial(distributed.generate_collective, device=device)
        if not self.pooled:
            return generate
        if self.keep_pool:
            return distributed.get_pool([str(d) for d in self.devices]).generate
        if self.pool is None:
            self.pool = distributed.WorkerPool(self.devices)
        return self.pool.generate

    def run(self, model: WanModel, prompts: PromptSchedule, *, device: torch.device | None = None,
            **kw) -> Result:
        """The planned video (:func:`sampling.loop.generate`'s arguments after ``prompts``: seed, noise,
        callbacks, prefix, ...); raises what it raises (Interrupted when stopped)."""
        p = self.plan
        return self.runner(device)(model, prompts, p.cfg, blocks=p.schedule.blocks, width=p.width, height=p.height,
                                   plan=p, **kw)

    def close(self) -> None:
        """Stop what the session started (its own worker pool)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
