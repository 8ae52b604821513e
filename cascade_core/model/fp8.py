"""Optional fp8 matrix products for the transformer layers (an approximation; off by default).

:func:`quantize_layers` replaces the Linear layers inside the DiT's blocks (attention q/k/v/o and the
FFN) by :class:`Fp8Linear`: weights stored as float8 e4m3 with one scale per output row, activations
quantized per token on the fly, products through ``torch._scaled_mm`` on GPUs that have fp8 units
(compute capability 8.9+). Elsewhere the same quantized numbers are multiplied in the activation dtype,
so CPU tests see the same approximation. Embeddings, the head and the norms stay in their dtype.
The weights take half the memory of bf16.

:func:`dequantize_state_dict` is the one reader of fp8-stored weights (the checkpoint loader, the text
encoder loader and the nodes' core-MODEL path use it): float8 e4m3 / e5m2 (and their fnuz variants),
unscaled or scaled (``<layer>.scale_weight`` or ``<layer>.weight_scale``, one scale per tensor or per
output row), dequantised as ``weight.float() * scale`` and then cast.
"""
from __future__ import annotations

import torch
from torch import nn

from ..common.messages import first_keys

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI "fp8 scaled"; newer files' name
DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, format tags: unused
MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled fp8 file


def dequantize_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str | None]:
    """Weights in ``dtype`` from fp8-stored (or any floating) ones -> (tensors, quantization label).

    Scaled weights become ``(weight.float() * scale.float()).to(dtype)`` (a scale [] per tensor or
    broadcastable per row, e.g. [out, 1]); other floating tensors ``.to(dtype)`` (the very tensor
    when it already has ``dtype``); non-floating tensors pass unchanged. Scale entries, activation
    scales, format tags and the ``scaled_fp8`` marker are dropped. The label is e.g. "fp8 e4m3fn
    scaled", "scaled weights" or None. ``sd`` is not modified.
    Raises ValueError for a scale without its weight or one whose shape does not fit the weight."""
    scales, rest = {}, {}
    marker = MARKER in sd
    for k, v in sd.items():
        if k.endswith(SCALE_SUFFIXES):
            scales[k.rsplit(".", 1)[0] + ".weight"] = v
        elif not k.endswith(DROP_SUFFIXES) and k != MARKER:
            rest[k] = v
    orphans = [k for k in scales if k not in rest]
    if orphans:
        raise ValueError(f"weight scales without a weight: {first_keys(orphans)}")
    fp8 = {str(v.dtype).removeprefix("torch.float8_"): None for v in rest.values() if v.dtype in FP8_DTYPES}
    out = {}
    for k, v in rest.items():
        scale = scales.get(k)
        if scale is not None:
            try:
                out[k] = (v.float() * scale.float()).to(dtype)
            except RuntimeError:
                raise ValueError(f"scale of {k} has shape {list(scale.shape)}, which does not fit the weight "
                                 f"{list(v.shape)}") from None
        else:
            out[k] = v.to(dtype) if v.is_floating_point() else v
    if fp8:
        return out, f"fp8 {'/'.join(fp8)}" + (" scaled" if scales or marker else "")
    return out, "scaled weights" if scales else None


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
