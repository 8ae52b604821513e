"""GGUF-quantised Linear weights kept quantised on the device, each dequantised just before its product.

A GGUF weight travels in a state dict as ``<layer>.weight``: its raw blocks, uint8 [out, bytes a row], and
``<layer>.gguf_type``: the GGML quantisation type (int64 []), as ComfyUI-GGUF's Wan files store them (Q8_0,
Q6_K, Q5_K_M, Q4_K_M, ...). Dequantisation is diffusers' (``diffusers.quantizers.gguf.utils``: torch ops per
quantisation type, traceable by torch.compile), imported on first use; nothing here decodes a format itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TYPE_SUFFIX = ".gguf_type"


def _library():
    from diffusers.quantizers.gguf import utils

    return utils


def type_name(qtype: int) -> str:
    """"Q4_K", "Q8_0", ... of a GGML quantisation type number."""
    import gguf

    return gguf.GGMLQuantizationType(int(qtype)).name


def logical_shape(raw: torch.Tensor, qtype: int) -> tuple[int, ...]:
    """The weight's shape [..., in] of raw blocks [..., bytes a row] of type ``qtype``."""
    block, size = _library().GGML_QUANT_SIZES[int(qtype)]
    return (*raw.shape[:-1], raw.shape[-1] // size * block)


def dequantize(raw: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """Raw GGUF blocks uint8 [..., bytes a row] -> the weight [..., in] in ``dtype`` (diffusers' dequantisers).
    Raises KeyError for a type diffusers does not dequantise."""
    lib = _library()
    qtype = int(qtype)
    block, size = lib.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)  # [n_blocks, bytes a block]
    # the block scales widened to float32 before they multiply (the library's default keeps float16 products)
    weight = lib.dequantize_functions[qtype](blocks, block, size, dtype=torch.float32)
    return weight.reshape(logical_shape(raw, qtype)).to(dtype)


class GGUFLinear(nn.Module):
    """y = x W^T + b with W kept as GGUF blocks (``weight`` uint8 [out, bytes a row], type ``qtype``),
    dequantised to x's dtype just before the product."""

    def __init__(self, weight: torch.Tensor, qtype: int, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("gguf_type", torch.tensor(int(qtype)))
        self.register_buffer("bias", bias)
        self.qtype = int(qtype)  # read once here: a forward never syncs on the buffer
        self.out_features, self.in_features = logical_shape(weight, qtype)

    @classmethod
    def like(cls, linear: nn.Linear, raw_shape: tuple[int, ...], qtype: int) -> "GGUFLinear":
        """An empty layer for ``linear``'s place (its device, e.g. meta) to load a state dict into."""
        w = linear.weight
        bias = None if linear.bias is None else torch.empty_like(linear.bias)
        return cls(torch.empty(raw_shape, dtype=torch.uint8, device=w.device), qtype, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.qtype, x.dtype), self.bias)
