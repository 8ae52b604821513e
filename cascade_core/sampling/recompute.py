"""Krea Realtime's KV cache recomputation: before every block the cache is rebuilt from a few clean
context frames, and no block gets a clean pass.

The rule (krea-ai/realtime-video ``release_server.py``: ``get_clean_context_frames`` 563-576,
``recompute_kv_cache`` 588-633, ``generate_block_internal`` 637-708), for blocks of N latent frames,
K = ``kv_recompute`` context frames and block b starting at frame E = bN:
- block 0 runs on an empty cache at RoPE positions 0..N-1;
- block b >= 1 first rebuilds the cache from C = min(E, K) context frames at t = context noise (0),
  RoPE positions 0..C-1, block-causal in blocks of N counted from the context's first frame: the
  reference's one masked forward, run here as one forward per N-frame block of the context (one for
  Krea's K = N = 3; causal attention makes them equal); the block's steps then run at positions
  C..C+N-1 and attend the context and themselves;
- the context is frame 0 followed by the last C - 1 frames before E while (b - 1)N < K; after that, the
  latent of frame E - K's last video frame (decoded with the whole video before it, encoded alone as
  an image by the VAE encoder: the oldest of the last 1 + 4(K - 1) decoded frames) followed by frames
  E - K + 1 .. E - 1;
- the positions are re-based through the KV pool's slot positions (its window is the context and the
  block); as RoPE enters attention only through position differences, absolute positions would give
  the same up to float rounding, but these are the reference's angles;
- the context forward of block b runs under block b - 1's prompt (the reference's cross-attention
  cache still holds it then; a new prompt is taken up by the block's own steps).

Frames are absolute indices of the video; a context prefix before block 0 is not defined here
(:func:`sampling.plan.check_prefix_config` refuses it).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..model.dit import WanModel
from ..model.grid import BlockGrid
from ..model.kv_pool import KVPool
from .latent_window import LatentWindow

# The first context frame re-encoded: normalised latents [1, 16, n, h, w] of frames first..j of one video
# and ``first`` -> the latent [1, 16, 1, h, w] of frame j's last video frame encoded alone (see the module
# docstring); ``first`` is at most the first frame the callable has not seen yet
ContextImage = Callable[[torch.Tensor, int], torch.Tensor]


def reencoded_frame(block: int, frames_per_block: int, context: int) -> int | None:
    """The frame whose last video frame is re-encoded as block ``block``'s first context frame, or None
    when frame 0 itself is (the first blocks, while (block - 1) * N < K)."""
    if (block - 1) * frames_per_block < context:
        return None
    return block * frames_per_block - context


def first_reencoding_block(frames_per_block: int, context: int) -> int:
    """The first block whose context starts with a re-encoded frame: the least b with (b - 1)N >= K."""
    return -(-context // frames_per_block) + 1


def why_a_vae(blocks: int, frames_per_block: int, context: int) -> str | None:
    """Why a video of ``blocks`` blocks with a KV recompute from ``context`` frames (0: none) needs the
    VAE (it re-encodes a frame), for the caller to finish with how to give one; None when it does not."""
    first = first_reencoding_block(frames_per_block, context) if context else None
    if first is None or 0 < blocks <= first:  # blocks 0: endless
        return None
    return (f"a KV cache recomputed every block (kv_recompute {context}, as Krea Realtime samples) re-encodes a "
            f"decoded frame into the context of every block from block {first + 1} on (block index {first})")


def recompute_pass(model: WanModel, pool: KVPool, out: LatentWindow, grid: BlockGrid, block: int, context: int,
                   prompt, context_noise: float, context_image: ContextImage | None) -> int:
    """Rebuild the K/V that block ``block`` (>= 1) attends, from the clean latents in ``out`` of the blocks
    before it (see the module docstring). The pool must hold frames [E - C, E) in its first slots with
    slot RoPE positions (a window of K + N frames, no sink); ``out`` the frames from the re-encoder's
    next one on (:func:`sampling.latent_window.held_frames`). Returns the forwards run."""
    end = grid.start(block)
    lo = end - min(end, context)
    again = reencoded_frame(block, grid.frames, context)
    first = out.read(0, 1) if again is None else context_image(out.read(out.first, again + 1), out.first).to(out.data)
    latents = torch.cat([first, out.read(lo + 1, end)], dim=2)  # [1, 16, C, h, w]
    forwards = 0
    for a in range(lo, end, grid.frames):  # block-causal from the context's first frame
        b = min(a + grid.frames, end)
        t = torch.full((1, b - a), float(context_noise), device=out.data.device)
        model(latents[:, :, a - lo:b - lo], t, [pool.position(a)], [prompt], pool.context_attention(a, b, lo))
        forwards += 1
    return forwards
