"""The random numbers of a run: every draw has its own generator, so the order of work never changes them.

Guarantees: the same seed on the same device gives the same noise; a finite run's initial noise is one
``torch.randn`` over the whole video (as the families' reference pipelines draw it); an endless run
(no length, so no whole-video draw) takes each block's initial noise from its own generator
(:func:`block_noise`); the re-noising noise of a block after a step is :func:`step_noise`, the same at
every parallelism level.
"""
from __future__ import annotations

from typing import Sequence

import torch

BLOCK_NOISE_STEP = -1  # the step index under which a block's initial noise is derived (steps count from 0)


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


def block_noise(seed: int, block: int, shape: Sequence[int], device: torch.device | str,
                dtype: torch.dtype) -> torch.Tensor:
    """The initial noise [shape] ([1, 16, frames of the block, h, w]) of ``block`` (its video-wide
    index) in an endless run: one ``torch.randn(shape)`` in float32 from a new ``torch.Generator`` on
    ``device`` seeded with :func:`derived_seed` (seed, block, ``BLOCK_NOISE_STEP``), cast to ``dtype``.
    A run of known length draws :func:`initial_noise` instead (the reference's single draw)."""
    g = torch.Generator(device=device).manual_seed(derived_seed(seed, block, BLOCK_NOISE_STEP))
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
