"""Where the KV pool's keys or values are stored: in the pool's dtype, or as fp8 with one scale a token and head.

:class:`KVStore` holds one of K or V for every layer, [layers, tokens, heads, head_dim]. With ``fp8`` the
values are float8 e4m3 with one float32 scale per (token, head) row of head_dim values (amax / 448: the
row's largest value maps to e4m3's largest), 1 + 4/head_dim bytes a value instead of 2 (bf16): 0.52x at
head_dim 128. Reads widen the span asked for to the pool's dtype (one attention call's keys at a time:
the whole cache is never widened); writes quantize. Each value's rounding error is at most half an e4m3
unit in the last place of its row's largest value, 2^-4 of it (3 mantissa bits).
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
KV_DTYPES = ("default", "fp8")  # the pool's dtype (the model's compute dtype), or fp8 e4m3 with scales


class KVStore:
    """K or V of every layer (see the module docstring): ``get`` a span, ``put`` a span, ``move`` tokens."""

    def __init__(self, layers: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, fp8: bool = False):
        self.dtype, self.fp8 = dtype, fp8
        self.data = torch.zeros(layers, tokens, heads, head_dim, dtype=FP8 if fp8 else dtype, device=device)
        self.scale = torch.zeros(layers, tokens, heads, 1, device=device) if fp8 else None  # float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) if t is not None)

    def get(self, layer: int, a: int, b: int) -> torch.Tensor:
        """Tokens [a, b) of ``layer``: [b-a, heads, head_dim] in the pool's dtype (a view unless fp8)."""
        if not self.fp8:
            return self.data[layer, a:b]
        return (self.data[layer, a:b].float() * self.scale[layer, a:b]).to(self.dtype)

    def put(self, layer: int, a: int, b: int, x: torch.Tensor) -> None:
        """Store x [b-a, heads, head_dim] as tokens [a, b) of ``layer`` (quantized per token and head if fp8)."""
        if not self.fp8:
            self.data[layer, a:b] = x
            return
        scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
        self.data[layer, a:b] = (x.float() / scale).to(FP8)
        self.scale[layer, a:b] = scale

    def move(self, dst: int, src: int, n: int) -> None:
        """Copy tokens [src, src+n) to [dst, dst+n) in every layer, stored values and scales as they are."""
        self.data[:, dst:dst + n] = self.data[:, src:src + n]
        if self.scale is not None:
            self.scale[:, dst:dst + n] = self.scale[:, src:src + n]

    def copy_(self, other: "KVStore") -> None:
        """Take ``other``'s contents (same shape and storage)."""
        self.data.copy_(other.data)
        if self.scale is not None:
            self.scale.copy_(other.scale)
