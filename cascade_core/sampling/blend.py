"""Smooth prompt transitions: a prompt switch that blends the old and the new text embeddings over N blocks.

The rule (one for a schedule's switches and steered ones; :class:`sampling.steer.LivePrompts` applies it):
a switch at block s to embeddings E with ``blend_blocks`` N conditions block s + k, 0 <= k < N, on

    lerp(e(s - 1), E, (k + 1) / (N + 1))

and every block from s + N on (until the next switch) on E itself; e(b) is the embedding block b is
conditioned on, so a switch that lands while an earlier blend is still under way blends from where that one
had got to (it cuts it). N = 0 is the hard switch: block s takes E, nothing else changes. The embeddings
interpolated are the text encoder's umt5 output, zero-padded to the model's ``text_len`` tokens, *before*
the model's text projection (``text_embedding``); the blended embedding then goes through
``model.encode_prompt`` (projection and every layer's cross-attention K/V) like any prompt. The first
prompt (block 0) has nothing to blend from. With switch mode "recache" (LongLive) each block whose
conditioning changes re-caches: a blended switch re-caches before blocks s .. s + N (N + 1 forwards).

Krea's demo server (krea-ai/realtime-video@acf4b7b), the model for it:
- ``release_server.py:459-468`` (``interpolate_prompt_embeds``): ``torch.lerp`` of the current prompt
  embeddings (the umt5 output, zero-padded to 512 tokens: ``utils/wan_wrapper.py:43-55``; the text
  projection runs later, inside the model: ``wan/modules/causal_model.py:897``) towards the new prompt's,
  with weights ``linspace(0, 1, steps)``, in bf16;
- ``release_server.py:662-666``: one interpolated embedding per *block* (not per step), taken before the
  block's denoising steps, after the cross-attention cache is cleared so its K/V are computed afresh from
  it; the self-attention KV cache is not re-cached for the blend (Krea recomputes it before every block
  anyway, ``release_server.py:647``, under the previous block's embedding: :mod:`sampling.recompute`);
- ``release_server.py:1049-1056``: the websocket's ``interp_steps`` (or ``interpolation_steps``),
  default 4, at least 1; a new prompt mid-blend starts from the current (blended) embedding.
Differences, on purpose: Krea's weights 0, 1/(n-1), ..., 1 spend the switch's first block on weight 0 (the
old prompt) and make n = 1 never reach the new prompt; here N counts the blocks strictly between the
two prompts, so N = 0 is the hard switch. Krea's ``interp_steps`` n >= 2 is this rule with
N = n - 2 at the block after. The lerp runs in float32 here (float64 for float64 embeddings).
"""
from __future__ import annotations

import torch

MAX_BLEND_BLOCKS = 64  # blocks a switch may blend over (at 0.75 s of video a block: 48 s)


def check_blend_blocks(n, what: str) -> int:
    """``n`` when it is an int in 0..:data:`MAX_BLEND_BLOCKS` (the blocks a switch blends over; 0: a hard
    switch), else ValueError (one line, naming ``what``)."""
    if type(n) is not int or not 0 <= n <= MAX_BLEND_BLOCKS:
        raise ValueError(f"{what}: blend_blocks must be an int in 0..{MAX_BLEND_BLOCKS} (the blocks the old and new "
                         f"prompts are blended over; 0: a hard switch), got {n!r}")
    return n


def blend_text_sets(blends, in_flight: int) -> int:
    """Text K/V sets that switches blending over ``blends`` blocks (an iterable of N) hold at once beyond one
    per prompt, in a run of ``in_flight`` blocks in flight: one per blended block in flight and the block
    before them, never more than the blended blocks (for the memory estimate)."""
    return min(sum(blends), in_flight + 1)


def blend_weight(k: int, n: int) -> float:
    """The new prompt's weight in block s + k of a switch at block s blending over ``n`` blocks (1 from
    k = n on)."""
    return 1.0 if k >= n else (k + 1) / (n + 1)


def padded(embeds: torch.Tensor, text_len: int) -> torch.Tensor:
    """Prompt embeddings [L, D] (L <= ``text_len``) zero-padded to [text_len, D], as ``model.encode_prompt``
    pads them."""
    if embeds.shape[0] == text_len:
        return embeds
    out = embeds.new_zeros(text_len, embeds.shape[-1])
    out[:embeds.shape[0]] = embeds
    return out


def blend(old: torch.Tensor, new: torch.Tensor, weight: float, text_len: int) -> torch.Tensor:
    """lerp(old, new, ``weight``) of two prompt embeddings [L, D] (each zero-padded to [text_len, D]), on
    ``new``'s device, in float32 (float64 where either is): [text_len, D]."""
    dtype = torch.promote_types(torch.promote_types(old.dtype, new.dtype), torch.float32)
    a = padded(old, text_len).to(new.device, dtype)
    return torch.lerp(a, padded(new, text_len).to(dtype), weight)
