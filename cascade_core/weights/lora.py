"""LoRA files merged into canonical Wan T2V weights (:func:`merge_lora`, called by ``load_dit``): Wan2.1 T2V and
Wan2.2 TI2V-5B alike (LongLive 2.0's peft LoRA, rank 128 and alpha 128 on every Linear of each block, in its
``generator_lora`` container or bare: NVlabs/LongLive ``utils/lora_utils.py:19-66``, ``utils/inference_utils.py``).

What a layer's delta is, before the strength ``lora_scale``:
- a low-rank pair: ``alpha / rank * B @ A``;
- LyCORIS LoHa: ``alpha / rank * (W1a @ W1b) * (W2a @ W2b)`` (element-wise; rank = W1b's rows);
- LyCORIS LoKr: ``s * kron(W1, W2)``, each factor whole or a low-rank product ``Wk_a @ Wk_b`` (s = alpha / that
  product's rank when the file gives an alpha and a factor is low-rank, else 1), as LyCORIS defines them;
- a full ``.diff`` / ``.diff_b``.
``W += lora_scale * delta``; with a ``dora_scale`` (DoRA), W moves by ``lora_scale`` toward ``W + delta`` rescaled to
those magnitudes (:func:`_dora`), as ComfyUI applies a strength to it.
Key styles: peft (``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``, LongLive's
``generator_lora``), ComfyUI / kohya (``lora_down`` / ``lora_up`` / ``.alpha``,
``lora_unet_blocks_0_self_attn_q``), LyCORIS (``lycoris_<layer>.hada_w1_a`` ..., ``.lokr_w1`` ...), diffusers
layer names, and full ``.diff`` / ``.diff_b`` deltas. A ``<layer>.alpha`` is honoured in every style;
without one (peft state dicts never carry it) alpha = rank, as LongLive configures it. The strength
``lora_scale`` applies to pairs, LyCORIS deltas and full deltas alike.

Layer names are normalised once, whatever the style: dots and runs of underscores all become one
underscore, so ``lora_unet__blocks_0_self_attn_q`` and ``lora_unet_blocks_0.self_attn.q`` name the
same layer as ``blocks.0.self_attn.q``. Image-to-video layers (``k_img``, ``v_img``, ``norm_k_img``,
``img_emb`` and their diffusers names) have no counterpart in a text-to-video model: they are left
out, and the one-line note saying so is logged as a warning and kept in :class:`LoraMerge`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..common.messages import first_keys
from .dit_names import I2V_LAYERS, diffusers_name, unwrap_names
from .safe_io import CheckpointError, read_tensor_file

_LORA_PARTS = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".dora_scale", "dora_scale"),
)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
# Wrapper prefixes of the styles, normalised (see _normalise); removed one at a time.
_LORA_PREFIXES = ("base_model_model_", "model_diffusion_model_", "diffusion_model_", "transformer_", "model_",
                  "module_", "unet_", "lora_unet_", "lycoris_", "lora_transformer_")
LORA_CONTAINERS = ("generator_lora", "lora", "state_dict")
# Key endings of LoRA variants this loader does not merge (core ComfyUI's LoRA loader does): name -> endings
_VARIANTS = {"a LyCORIS LoKr with a Tucker core": (".lokr_t2",),
             "a LyCORIS LoHa with a Tucker core": (".hada_t1", ".hada_t2"), "an OFT LoRA": (".oft_blocks", ".oft_diag")}
_I2V_LONGEST_FIRST = sorted(I2V_LAYERS, key=len, reverse=True)

log = logging.getLogger("block_cascade")


@dataclass
class LoraMerge:
    """What :func:`merge_lora` did: ``layers`` changed, and the image-to-video layers it ``left_out``
    (kind such as ``k_img`` or ``img_emb`` -> number of layers of that kind)."""

    layers: int
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def note(self) -> str | None:
        """One line on the layers left out (None when none were)."""
        if not self.left_out:
            return None
        n = sum(self.left_out.values())
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.left_out.items()))
        return (f"left out {n} image-to-video layer{'s' if n != 1 else ''} ({kinds}): a text-to-video model "
                "has no image input for them")


def _normalise(name: str) -> str:
    """One spelling for every separator style: ``a.b__c`` -> ``a_b_c``."""
    return re.sub(r"[._]+", "_", name).strip("_")


def _lora_layer_names(names: Mapping[str, torch.Size]) -> dict[str, str]:
    """Normalised spelling (original and diffusers name) -> canonical layer name (``blocks.0.self_attn.q``)."""
    table: dict[str, str] = {}
    for p in names:
        if p.endswith(".bias"):
            continue
        layer = p.removesuffix(".weight")  # a layer, or a bare parameter such as blocks.0.modulation
        for spelling in (layer, diffusers_name(layer)):
            table[_normalise(spelling)] = layer
    return table


def _resolve_layer(name: str, table: dict[str, str]) -> str | None:
    """A normalised LoRA layer name -> canonical layer, after removing wrapper prefixes one at a time."""
    while name not in table:
        prefix = next((p for p in _LORA_PREFIXES if name.startswith(p) and len(name) > len(p)), None)
        if prefix is None:
            return None
        name = name[len(prefix):]
    return table[name]


def _i2v_kind(name: str) -> str | None:
    """The image-to-video layer kind a normalised name holds (``norm_k_img``, ``k_img``, ...), if any."""
    padded = f"_{name}_"
    return next((kind for kind in _I2V_LONGEST_FIRST if f"_{kind}_" in padded), None)


def _read_lora(lora_path: str) -> dict[str, torch.Tensor]:
    obj = read_tensor_file(lora_path)
    while isinstance(obj, Mapping):
        inner = next((k for k in LORA_CONTAINERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(lora_path, f"holds a {type(obj).__name__}, not a dict of LoRA tensors")
    tensors = unwrap_names({str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    if not tensors:
        raise CheckpointError(lora_path, "holds no tensors")
    return tensors


def _check_layer(layer: str, parts: dict[str, torch.Tensor], sd: Mapping[str, torch.Tensor], lora_path: str) -> None:
    """Raise :class:`CheckpointError` unless the parts of one layer fit its weights."""
    wkey = layer + ".weight" if layer + ".weight" in sd else layer
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            have, need = ("lora_A/down", "lora_B/up") if "down" in parts else ("lora_B/up", "lora_A/down")
            raise CheckpointError(lora_path, f"{layer}: has {have} but no {need}")
        down, up, w = parts["down"], parts["up"], sd[wkey]
        if down.dim() < 2 or up.dim() < 2 or down.shape[0] == 0 or up.shape[1] != down.shape[0] or \
                up.shape[0] != w.shape[0] or down[0].numel() != w[0].numel():
            raise CheckpointError(lora_path, f"{layer}: LoRA shapes {list(up.shape)} x {list(down.shape)} do not "
                                             f"fit the weight {list(w.shape)} (a LoRA for another model size?)")
    elif any(role.startswith(("hada_", "lokr_")) for role in parts):
        w = sd[wkey]
        try:
            delta, _ = _lycoris_delta(parts)
        except (KeyError, RuntimeError, IndexError) as exc:
            raise CheckpointError(lora_path, f"{layer}: an incomplete or ill-shaped LyCORIS "
                                             f"{'LoHa' if 'hada_w1_a' in parts else 'LoKr'} ({exc.args[0]})") from None
        if delta.shape[0] != w.shape[0] or delta.numel() != w.numel():
            raise CheckpointError(lora_path, f"{layer}: the LyCORIS delta {list(delta.shape)} does not fit the weight "
                                             f"{list(w.shape)} (a LoRA for another model size?)")
    elif "alpha" in parts and "diff" not in parts and "diff_b" not in parts:
        raise CheckpointError(lora_path, f"{layer}: has an alpha but no LoRA matrices")
    if "alpha" in parts and parts["alpha"].numel() != 1:
        raise CheckpointError(lora_path, f"{layer}.alpha has shape {list(parts['alpha'].shape)}; an alpha is "
                                         "one number")
    if "dora_scale" in parts:
        w, magnitude = sd[wkey], parts["dora_scale"]
        if not any(role in parts for role in ("down", *_LOHA, "lokr_w1", "lokr_w1_a")):
            raise CheckpointError(lora_path, f"{layer}: has a dora_scale but no LoRA matrices")
        if magnitude.numel() != (w.shape[0] if _dora_on_rows(w, magnitude) else w.shape[1]):
            raise CheckpointError(lora_path, f"{layer}.dora_scale has shape {list(magnitude.shape)}; the weight "
                                             f"{list(w.shape)} needs one value an output row or an input channel")
    for role, key in (("diff", wkey), ("diff_b", layer + ".bias")):
        if role in parts and (key not in sd or parts[role].shape != sd[key].shape):
            got = list(sd[key].shape) if key in sd else "nothing"
            raise CheckpointError(lora_path, f"{layer}.{role} has shape {list(parts[role].shape)} but the "
                                             f"model has {got}")


def _lycoris_delta(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    """A LoHa's or LoKr's weight delta [out, in...] (float32, before alpha and strength) and the rank its alpha
    divides by (None: alpha does not apply). Raises KeyError for a missing part, RuntimeError for shapes that do not
    multiply."""
    f = {k: v.float().flatten(1) if v.dim() > 2 else v.float() for k, v in parts.items() if k != "alpha"}
    if "hada_w1_a" in parts or "hada_w2_a" in parts:
        missing = [k for k in _LOHA if k not in f]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]), f["hada_w1_b"].shape[0]
    rank = None
    factors = []
    for k in ("lokr_w1", "lokr_w2"):
        if k in f:
            factors.append(f[k])
        else:
            factors.append(f[k + "_a"] @ f[k + "_b"])
            rank = f[k + "_b"].shape[0]
    return torch.kron(*factors), rank


def _weight_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor | None:
    """The layer's weight delta (float32, ``shape``) with alpha applied, before the strength: a low-rank pair's
    ``alpha / rank * up @ down``, a LoHa's or LoKr's (:func:`_lycoris_delta`); None without either."""
    if "down" in parts:
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
        return (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(shape)
    if any(role.startswith(("hada_", "lokr_")) for role in parts):
        delta, rank = _lycoris_delta(parts)
        factor = float(parts["alpha"].float().item()) / rank if "alpha" in parts and rank else 1.0
        return factor * delta.reshape(shape)
    return None


def _dora_on_rows(w: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """Whether a ``dora_scale`` holds one magnitude an output row (its first size is the weight's, as peft's and
    kohya's [out, 1]) rather than one an input channel (LyCORIS's default [1, in, ...]); ComfyUI decides so."""
    return magnitude.dim() > 0 and magnitude.shape[0] == w.shape[0]


def _dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the direction
    ``w + delta`` [out, in, ...] scaled to ``magnitude`` along each output row or each input channel
    (:func:`_dora_on_rows`)."""
    merged = w + delta
    if _dora_on_rows(w, magnitude):
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))  # [out, 1, ...]
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))  # [1, in, ...]
    return merged * (magnitude.float().reshape(norm.shape) / norm)


def merge_lora(sd: dict[str, torch.Tensor], lora_path: str, scale: float = 1.0,
               dtype: torch.dtype | None = None) -> LoraMerge:
    """Merge a LoRA file into canonical weights ``sd`` (tensors replaced, never modified in place).

    ``scale``: the strength, applied to every style (low-rank pairs and full deltas alike).
    Returns a :class:`LoraMerge`; image-to-video layers are left out with a logged warning. Unknown
    keys, half-pairs, shapes that do not fit (a LoRA for another model size) and LoRA variants it does not
    merge (OFT, LoHa/LoKr with a Tucker core: named, with the core nodes that do) raise :class:`CheckpointError`
    naming the LoRA file, before any weight is changed.
    """
    lora_path = os.fspath(lora_path)
    tensors = _read_lora(lora_path)
    for kind, endings in _VARIANTS.items():
        if (key := next((k for k in tensors if k.endswith(endings)), None)) is not None:
            raise CheckpointError(lora_path, f"{kind} ({key}): this loader merges low-rank LoRAs, DoRA, LoHa and "
                                             f"LoKr, not this kind; "
                                             f"load the model with core Load Diffusion Model, apply this one with "
                                             f"core LoraLoaderModelOnly and connect Causal Model from MODEL")
    table = _lora_layer_names({k: v.shape for k, v in sd.items()})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    left_out: dict[str, set[str]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        part = next(((key[: -len(s)], role) for s, role in _LORA_PARTS if key.endswith(s)), None)
        if part is None:
            unknown.append(key)
            continue
        name, role = _normalise(part[0]), part[1]
        layer = _resolve_layer(name, table)
        if layer is not None:
            groups.setdefault(layer, {})[role] = t
        elif (kind := _i2v_kind(name)) is not None:
            left_out.setdefault(kind, set()).add(name)
        else:
            unknown.append(key)
    for layer, parts in groups.items():  # shapes first: a LoRA for another size is named as such
        _check_layer(layer, parts, sd, lora_path)
    if unknown:
        looks = "" if any(k.endswith(tuple(s for s, _ in _LORA_PARTS)) for k in tensors) else \
            " (this does not look like a LoRA file)"
        layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        base = "Wan2.2 TI2V-5B" if sd["patch_embedding.weight"].shape[1] == 48 else "Wan2.1"
        raise CheckpointError(lora_path, f"{len(unknown)} LoRA keys match no layer of this {base} DiT ({layers} "
                                         f"layers, width {sd['patch_embedding.weight'].shape[0]}): "
                                         f"{first_keys(unknown)}{looks}")
    for layer, parts in groups.items():
        wkey = layer + ".weight" if layer + ".weight" in sd else layer
        delta = _weight_delta(parts, sd[wkey].shape)
        if delta is not None:
            w = sd[wkey].float()
            if "dora_scale" in parts:  # the strength moves the weight toward the DoRA-merged one, as ComfyUI does
                sd[wkey] = (w + scale * (_dora(w, delta, parts["dora_scale"]) - w)).to(dtype or sd[wkey].dtype)
            else:
                sd[wkey] = (w + scale * delta).to(dtype or sd[wkey].dtype)
        for role, key in (("diff", wkey), ("diff_b", layer + ".bias")):
            if role in parts:
                sd[key] = (sd[key].float() + scale * parts[role].float()).to(dtype or sd[key].dtype)
        for key in (wkey, layer + ".bias"):
            if key in sd and not bool(torch.isfinite(sd[key]).all()):
                raise CheckpointError(lora_path, f"merging it at strength {scale:g} gives NaN or infinite "
                                                 f"weights in {key}")
    result = LoraMerge(len(groups), {kind: len(names) for kind, names in left_out.items()})
    if result.note:
        log.warning("LoRA %s: %s", os.path.basename(lora_path), result.note)
    return result
