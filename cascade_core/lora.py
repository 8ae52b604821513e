"""LoRA files merged into canonical Wan2.1 T2V weights (:func:`merge_lora`, called by ``load_dit``).

``W += lora_scale * alpha / rank * B @ A``. Key styles: peft (``base_model.model.<layer>.lora_A.weight``
/ ``lora_B.weight``, LongLive's ``generator_lora``), ComfyUI / kohya (``lora_down`` / ``lora_up`` /
``.alpha``, ``lora_unet_blocks_0_self_attn_q``), diffusers layer names, and full ``.diff`` /
``.diff_b`` deltas. Without an alpha (peft state dicts never carry one) alpha = rank, as LongLive
configures it.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .checkpoint import _unwrap_names, diffusers_name, first_keys
from .safe_io import CheckpointError, read_tensor_file

_LORA_PARTS = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
_LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.",
                  "module.", "unet.", "lora_unet_", "lycoris_", "lora_transformer_")
LORA_CONTAINERS = ("generator_lora", "lora", "state_dict")


def _lora_layer_names(names: Mapping[str, torch.Size]) -> dict[str, str]:
    """Every accepted spelling of a layer name -> canonical layer name (``blocks.0.self_attn.q``)."""
    table: dict[str, str] = {}
    for p in names:
        if p.endswith(".bias"):
            continue
        layer = p.removesuffix(".weight")  # a layer, or a bare parameter such as blocks.0.modulation
        for spelling in (layer, diffusers_name(layer)):
            table[spelling] = layer
            table[spelling.replace(".", "_")] = layer
    return table


def _resolve_layer(name: str, table: dict[str, str]) -> str | None:
    """A LoRA layer name -> canonical layer, after removing wrapper prefixes one at a time."""
    while name not in table:
        prefix = next((p for p in _LORA_PREFIXES if name.startswith(p) and len(name) > len(p)), None)
        if prefix is None:
            return None
        name = name[len(prefix):]
    return table[name]


def merge_lora(sd: dict[str, torch.Tensor], lora_path: str, scale: float = 1.0,
               dtype: torch.dtype | None = None) -> int:
    """Merge a LoRA file into canonical weights ``sd`` (tensors replaced, never modified in place).

    Returns the number of layers changed. Unknown keys, half-pairs and shape mismatches raise
    :class:`CheckpointError` naming the LoRA file.
    """
    lora_path = os.fspath(lora_path)
    obj = read_tensor_file(lora_path)
    while isinstance(obj, Mapping):
        inner = next((k for k in LORA_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(lora_path, f"holds a {type(obj).__name__}, not a dict of LoRA tensors")
    tensors = _unwrap_names({str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    if not tensors:
        raise CheckpointError(lora_path, "holds no tensors")
    table = _lora_layer_names({k: v.shape for k, v in sd.items()})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        part = next(((key[: -len(s)], role) for s, role in _LORA_PARTS if key.endswith(s)), None)
        if part is None:
            unknown.append(key)
            continue
        name, role = part
        layer = _resolve_layer(name, table)
        if layer is None:
            unknown.append(key)
            continue
        groups.setdefault(layer, {})[role] = t
    if unknown:
        looks = "" if any(k.endswith(tuple(s for s, _ in _LORA_PARTS)) for k in tensors) else \
            " (this does not look like a LoRA file)"
        layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        raise CheckpointError(lora_path, f"{len(unknown)} LoRA keys match no layer of this Wan2.1 DiT ({layers} "
                                         f"layers, width {sd['patch_embedding.weight'].shape[0]}): "
                                         f"{first_keys(unknown)}{looks}")
    changed = 0
    for layer, parts in groups.items():
        wkey = layer + ".weight" if layer + ".weight" in sd else layer
        out_dtype = dtype or sd[wkey].dtype
        if "down" in parts or "up" in parts:
            if "down" not in parts or "up" not in parts:
                have, need = ("lora_A/down", "lora_B/up") if "down" in parts else ("lora_B/up", "lora_A/down")
                raise CheckpointError(lora_path, f"{layer}: has {have} but no {need}")
            down, up = parts["down"].float(), parts["up"].float()
            rank = down.shape[0]
            w = sd[wkey]
            if up.shape[1] != rank or up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
                raise CheckpointError(lora_path, f"{layer}: LoRA shapes {list(up.shape)} x {list(down.shape)} do not "
                                                 f"fit the weight {list(w.shape)} (a LoRA for another model size?)")
            alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            sd[wkey] = (w.float() + (scale * alpha / rank) * delta).to(out_dtype)
        elif "alpha" in parts and "diff" not in parts and "diff_b" not in parts:
            raise CheckpointError(lora_path, f"{layer}: has an alpha but no LoRA matrices")
        for role, key in (("diff", wkey), ("diff_b", layer + ".bias")):
            if role in parts:
                if key not in sd or parts[role].shape != sd[key].shape:
                    got = list(sd[key].shape) if key in sd else "nothing"
                    raise CheckpointError(lora_path, f"{layer}.{role} has shape {list(parts[role].shape)} but the "
                                                     f"model has {got}")
                sd[key] = (sd[key].float() + scale * parts[role].float()).to(dtype or sd[key].dtype)
        changed += 1
    return changed
