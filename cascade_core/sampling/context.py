"""What the frontends (command line, nodes) put before the first generated block: a start image or
the end of a video to continue, as a context prefix for :func:`sampling.loop.generate`.

Guarantees (one place for both frontends):
- A start image is the video's first latent frame. A family whose block 0 is an independent first
  frame (Self-Forcing's I2V path, ``causal_inference.py`` of guandeh17/Self-Forcing) has that frame
  in the image, so every generated block has the run's frames per block; block 0's own step list
  still applies to the first generated block (Causal Forcing's I2V: ``causal_inference.py`` of
  thu-ml/Causal-Forcing).
- A continuation's block 0 is in the past: neither block 0's own step list nor an independent first
  frame applies to its first generated block.
- The context of a continuation is the last K latent frames of the video (:func:`context_of`), K
  the ``context_frames`` asked for, else the local window, else every frame; asking for more than
  the video has takes all of it, with a note (:func:`context_notes`). A sink then holds the first
  frames of the context, which are the video's first frames only when the context is all of it.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import CascadeConfig

START_IMAGE, CONTINUATION = "start image", "continuation"


def prefix_config(cfg: CascadeConfig, kind: str) -> tuple[CascadeConfig, list[str]]:
    """The config to generate after a prefix of ``kind`` (:data:`START_IMAGE` or :data:`CONTINUATION`)
    and one line per setting it changed, saying why (for a ``note:`` line or the node's text).
    Raises ValueError for another kind."""
    if kind not in (START_IMAGE, CONTINUATION):
        raise ValueError(f"unknown prefix kind {kind!r}: {START_IMAGE!r} or {CONTINUATION!r}")
    changes, notes = {}, []
    if cfg.independent_first_frame:
        changes["independent_first_frame"] = False
        notes.append("the start image is the independent first frame: every generated block has "
                     f"{cfg.frames_per_block} frames" if kind == START_IMAGE else
                     "the continued video already has its first frame: every generated block has "
                     f"{cfg.frames_per_block} frames")
    if kind == CONTINUATION and cfg.first_block_steps is not None:
        changes["first_block_steps"] = None
        notes.append("block 0's own step list is not used: the continued video's block 0 is in the past")
    return dataclasses.replace(cfg, **changes), notes


def context_frames_for(cfg: CascadeConfig, available: int, asked: int = 0) -> int:
    """Latent frames of context taken from a video of ``available`` latent frames: ``asked`` when > 0,
    else the local window (every frame without one), never more than ``available``.
    Raises ValueError for ``asked`` < 0 or an empty video."""
    if asked < 0:
        raise ValueError(f"context frames must be >= 0 (0: the window, or every frame without one), got {asked}")
    if available < 1:
        raise ValueError("the video to continue has no latent frames")
    wanted = asked or cfg.window or available
    return min(wanted, available)


def context_notes(asked: int, taken: int) -> list[str]:
    """The note line when ``asked`` context frames were asked for but the video gave only ``taken``
    (every frame it has is the context); none otherwise."""
    if asked > taken:
        return [f"{asked} context frames asked for, the video has {taken} latent frames: all {taken} are the context"]
    return []


def context_of(latents: torch.Tensor, cfg: CascadeConfig, asked: int = 0) -> torch.Tensor:
    """The last K latent frames [1, 16, K, h, w] of ``latents`` [1, 16, T, h, w], K as
    :func:`context_frames_for` says. Raises ValueError for a tensor that is not 5-D."""
    if latents.dim() != 5:
        raise ValueError(f"latents must be [1, 16, T, h, w], got {list(latents.shape)}")
    k = context_frames_for(cfg, latents.shape[2], asked)
    return latents[:, :, latents.shape[2] - k:]
