"""Scaled dot-product attention over several backends, chosen once per device.

Guarantees: every backend computes softmax(q k^T / sqrt(d)) v for q [B, H, Lq, d] and k, v
[B, H, Lk, d] (any strides with a contiguous last dim); the choice changes speed, not the function.
``set_backend`` picks one by name; "auto" lets torch dispatch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *SDPA_BACKENDS)

_backend = "auto"


def set_backend(name: str) -> None:
    """Use one backend for every following call ("auto": torch's own dispatch)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [B, H, Lq, d]; ``mask`` (bool, True = attend) broadcasts to [B, H, Lq, Lk]."""
    ctx = contextlib.nullcontext() if _backend == "auto" or mask is not None else sdpa_kernel(
        [SDPA_BACKENDS[_backend]])
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
