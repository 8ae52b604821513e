"""fp8 weights: stored fp8 on the device, widened per product or multiplied as fp8.

- :func:`prepare_weights` is the one reader of a DiT's stored weights for the model (the checkpoint
  loader, a core MODEL, the worker ranks): the transformer blocks' Linear weights stay fp8 when the file
  stores them so (``weight_dtype`` "default") or become fp8 when asked (``fp8_e4m3fn``,
  ``fp8_e4m3fn_fast``, ``fp8_e5m2``, the choices of ComfyUI's UNETLoader), each with one float32 scale
  per output row; every other tensor is widened to the compute dtype.
- :class:`Fp8Linear` holds such a weight. Its product either widens the weight just before it
  (``(weight.float() * scale).to(x.dtype)``: exactly the widened model's weight, so exactly its
  output) or, with ``fast`` on a GPU with fp8 units (compute capability 8.9+) and e4m3 weights, runs
  ``torch._scaled_mm`` on activations quantized per token (approximate; the CLI's ``--fp8``). The whole
  model is never widened: one layer's weight at a time.
- :func:`dequantize_state_dict` widens every tensor (the text encoder, and LoRA merging): float8 e4m3 /
  e5m2 (and their fnuz variants), unscaled or scaled (``<layer>.scale_weight`` or ``<layer>.weight_scale``,
  one scale per tensor or per output row), as ``weight.float() * scale`` and then cast.

Casting a model that holds Fp8Linear layers with ``model.to(dtype)`` casts their biases only: the stored weights
and scales keep their dtypes.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common.messages import first_keys
from . import gguf

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI "fp8 scaled"; newer files' name
DROP_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, format tags: unused
MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled fp8 file
# ComfyUI's UNETLoader choices: stored dtype of the blocks' Linear weights (None: as the file has them)
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight$")


class PreparedWeights(NamedTuple):
    """What :func:`prepare_weights` returns: the state dict for :meth:`WanModel.from_state_dict`, the
    quantization label of the source ("fp8 e4m3fn scaled", "scaled weights" or None) and whether the fp8
    layers multiply as fp8 where the GPU can (``fast``)."""

    sd: dict[str, torch.Tensor]
    label: str | None
    fast: bool


def _split(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, str | None]:
    """(weights and other tensors, scale of each scaled weight by the weight's name, source label). A GGUF
    weight's type entry (:mod:`model.gguf`) counts as its scale: the weight's int64 [] quantisation type."""
    scales, rest, gguf_types = {}, {}, {}
    for k, v in sd.items():
        if k.endswith(SCALE_SUFFIXES):
            scales[k.rsplit(".", 1)[0] + ".weight"] = v
        elif k.endswith(gguf.TYPE_SUFFIX):
            scales[k.removesuffix(gguf.TYPE_SUFFIX) + ".weight"] = gguf_types[k] = v
        elif not k.endswith(DROP_SUFFIXES) and k != MARKER:
            rest[k] = v
    if gguf_types:
        names = sorted({gguf.type_name(t) for t in gguf_types.values()})
        if any(v.dtype in FP8_DTYPES for v in rest.values()) or len(gguf_types) != len(scales):
            raise ValueError("a file of GGUF and fp8 weights at once")
    orphans = [k for k in scales if k not in rest]
    if orphans:
        raise ValueError(f"weight scales without a weight: {first_keys(orphans)}")
    fp8 = {str(v.dtype).removeprefix("torch.float8_"): None for v in rest.values() if v.dtype in FP8_DTYPES}
    if gguf_types:
        label = f"GGUF {'/'.join(names)}"
    elif fp8:
        label = f"fp8 {'/'.join(fp8)}" + (" scaled" if scales or MARKER in sd else "")
    else:
        label = "scaled weights" if scales else None
    return rest, scales, label


def _widen(name: str, w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype``: ``(w.float() * scale).to(dtype)`` when scaled (the very tensor when it has ``dtype``);
    GGUF blocks (a uint8 weight whose "scale" is its type) dequantised by :func:`model.gguf.dequantize`."""
    if scale is None:
        return w.to(dtype) if w.is_floating_point() else w
    if w.dtype == torch.uint8 and not scale.is_floating_point():
        return gguf.dequantize(w, int(scale), dtype)
    if scale.dim() == 1 and scale.numel() == w.shape[0] > 1:  # one per output row, stored flat: [out] -> [out, 1]
        scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    try:
        return (w.float() * scale.float()).to(dtype)
    except RuntimeError:
        raise ValueError(f"scale of {name} has shape {list(scale.shape)}, which does not fit the weight "
                         f"{list(w.shape)}") from None


def row_scale(name: str, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored weight's scale as float32 [out, 1] (one per output row; a per-tensor scale repeated)."""
    if scale is None:
        return torch.ones(w.shape[0], 1)
    if scale.numel() == 1:
        return scale.float().reshape(1, 1).expand(w.shape[0], 1).contiguous()
    if scale.numel() == w.shape[0]:
        return scale.float().reshape(w.shape[0], 1)
    raise ValueError(f"scale of {name} has shape {list(scale.shape)}, which does not fit the weight {list(w.shape)}")


def dequantize_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str | None]:
    """Every floating tensor in ``dtype`` -> (tensors, quantization label), fp8 and scaled weights widened.

    Scaled weights become ``(weight.float() * scale.float()).to(dtype)`` (a scale [] per tensor or
    broadcastable per row, e.g. [out, 1]); other floating tensors ``.to(dtype)`` (the very tensor when it
    already has ``dtype``); non-floating tensors pass unchanged. Scale entries, activation scales, format
    tags and the ``scaled_fp8`` marker are dropped. ``sd`` is not modified.
    Raises ValueError for a scale without its weight or one whose shape does not fit the weight."""
    rest, scales, label = _split(sd)
    return {k: _widen(k, v, scales.get(k), dtype) for k, v in rest.items()}, label


def prepare_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype, weight_dtype: str = "default"
                    ) -> PreparedWeights:
    """A DiT's state dict for the model: the blocks' Linear weights fp8 where asked or stored so, the rest in
    ``dtype``.

    ``weight_dtype`` (:data:`WEIGHT_DTYPES`): "default" keeps fp8-stored block weights as they are (values
    and scale; fast products for e4m3 weights) and widens nothing else's storage; an fp8 choice stores every
    block Linear weight in that fp8 type (re-quantized per row from the widened value unless it is stored
    so already), "_fast" asking for fp8 products. Kept weights carry ``<layer>.weight_scale`` float32
    [out, 1] (1 for unscaled files). Raises ValueError for an unknown choice or a scale that fits no weight.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    target = WEIGHT_DTYPES[weight_dtype]
    rest, scales, label = _split(sd)
    out, fast = {}, weight_dtype == "fp8_e4m3fn_fast"
    for k, v in rest.items():
        scale = scales.get(k)
        stored_fp8 = v.dtype in FP8_DTYPES or v.dtype == torch.uint8  # fp8 or GGUF blocks
        if not BLOCK_LINEAR.match(k) or (target is None and not stored_fp8):
            out[k] = _widen(k, v, scale, dtype)
        elif v.dtype == torch.uint8 and scale is None:
            raise ValueError(f"{k} is stored as bytes (uint8) without its GGUF type: not a weight this loader reads")
        elif target is None and v.dtype == torch.uint8:  # GGUF blocks, kept as stored
            out[k], out[k.removesuffix(".weight") + gguf.TYPE_SUFFIX] = v, scale
        elif target is None or v.dtype == target:  # kept as stored
            out[k], out[k[:-len("weight")] + "weight_scale"] = v, row_scale(k, v, scale)
            fast = fast or (weight_dtype == "default" and v.dtype == torch.float8_e4m3fn)
        else:
            q, s = quantize_rows(_widen(k, v, scale, torch.float32), target)
            out[k], out[k[:-len("weight")] + "weight_scale"] = q, s
    return PreparedWeights(out, label, fast)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (``dtype`` fp8 [M, K], float32 scale [M, 1]) with x ~= fp8 * scale, one scale per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(dtype).max
    return (x.float() / scale).to(dtype), scale


def has_fp8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W [out, in] stored fp8 and one float32 scale per output row [out, 1].

    ``fast``: fp8 products (activations quantized per token, ``torch._scaled_mm``) on GPUs with fp8 units
    and e4m3 weights; otherwise, and everywhere else, W is widened to x's dtype just before the product."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fast: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in] float8
        self.register_buffer("weight_scale", scale)  # [out, 1] float32
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = weight.shape
        self.fast = fast

    @classmethod
    def like(cls, linear: nn.Linear, dtype: torch.dtype, fast: bool) -> "Fp8Linear":
        """An empty layer of ``linear``'s shape (on its device, e.g. meta) to load a state dict into."""
        w = linear.weight
        bias = None if linear.bias is None else torch.empty_like(linear.bias)
        return cls(torch.empty(w.shape, dtype=dtype, device=w.device),
                   torch.empty(w.shape[0], 1, device=w.device), bias, fast)

    def _apply(self, fn, recurse=True):
        """Device moves apply; a dtype cast of the model (``model.to(torch.bfloat16)``) leaves the stored weight
        and its float32 scale as they are (it would widen the layer whole) and casts only the bias."""
        for name, t in self._buffers.items():
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if name == "bias" or moved.dtype == t.dtype else t.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self.weight.dtype == FP8 and has_fp8_matmul(x.device):
            x2 = x.reshape(-1, self.in_features)  # [..., in] -> [M, in]
            xq, x_scale = quantize_rows(x2)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                 out_dtype=x.dtype)
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, (self.weight.float() * self.weight_scale).to(x.dtype), self.bias)


def use_stored_layers(model: nn.Module, sd: dict[str, torch.Tensor], fast: bool) -> None:
    """Replace (in place) each Linear of ``model`` whose weight ``sd`` stores in fp8 or as GGUF blocks by an
    empty :class:`Fp8Linear` of that dtype or :class:`model.gguf.GGUFLinear` of that type, so that
    ``model.load_state_dict(sd, assign=True)`` fits."""
    for key, t in sd.items():
        if BLOCK_LINEAR.match(key) and (t.dtype in FP8_DTYPES or t.dtype == torch.uint8):
            parent, _, attr = key[:-len(".weight")].rpartition(".")
            owner, linear = model.get_submodule(parent), getattr(model.get_submodule(parent), attr)
            if t.dtype == torch.uint8:
                qtype = int(sd[key.removesuffix(".weight") + gguf.TYPE_SUFFIX])
                setattr(owner, attr, gguf.GGUFLinear.like(linear, tuple(t.shape), qtype))
            else:
                setattr(owner, attr, Fp8Linear.like(linear, t.dtype, fast))


def weight_dtype_of(model: nn.Module) -> str:
    """The model's weight storage in the loader's words: "fp8_e4m3fn[_fast]", "fp8_e5m2", "gguf_Q4_K/Q6_K" (its
    block layers), else the dtype of its parameters ("bfloat16", ...)."""
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            return "fp8_" + str(m.weight.dtype).removeprefix("torch.float8_") + ("_fast" if m.fast else "")
        if isinstance(m, gguf.GGUFLinear):
            return "gguf_" + "/".join(sorted({gguf.type_name(g.qtype) for g in model.modules()
                                              if isinstance(g, gguf.GGUFLinear)}))
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (where they are stored, fp8 counted as one byte)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
