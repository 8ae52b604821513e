"""Optional fp8 matrix products for the transformer layers (an approximation; off by default).

:func:`quantize_layers` replaces the Linear layers inside the DiT's blocks (attention q/k/v/o and the
FFN) by :class:`Fp8Linear`: weights stored as float8 e4m3 with one scale per output row, activations
quantized per token on the fly, products through ``torch._scaled_mm`` on GPUs that have fp8 units
(compute capability 8.9+). Elsewhere the same quantized numbers are multiplied in the activation dtype,
so CPU tests see the same approximation. Embeddings, the head and the norms stay in their dtype.
The weights take half the memory of bf16.
"""
from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scale [M, 1]) with x ~= fp8 * scale, one scale per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x quantized to fp8 (per output row / per token scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", w)  # [out, in] float8
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, out] float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [..., in] -> [M, in]
        xq, x_scale = quantize_rows(x2)
        if has_fp8_matmul(x.device):
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:  # the same quantized operands, multiplied in float32
            y = ((xq.float() * x_scale) @ (self.weight.float() * self.weight_scale.t()).t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_layers(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear inside ``model.blocks`` for an :class:`Fp8Linear` (in place)."""
    for block in model.blocks:
        for name, child in list(block.named_modules()):
            for attr, sub in list(child.named_children()):
                if isinstance(sub, nn.Linear):
                    setattr(child, attr, Fp8Linear(sub))
    return model
