"""The Wan text-to-video DiT's weight names in every layout :func:`weights.checkpoint.load_dit` reads, and the
checks that a state dict is one: Wan2.1 T2V (1.3B, 14B) and Wan2.2 TI2V-5B, which keeps Wan2.1's names
(Wan-Video/Wan2.2 ``wan/modules/model.py``; diffusers' ``WanTransformer3DModel`` names both alike), its
patch embedding and head taking and making 48 latent channels instead of 16.

- :func:`diffusers_name`: the diffusers ``WanTransformer3DModel`` name of each canonical (original
  Wan / ComfyUI) name; :func:`from_diffusers` renames a whole diffusers state dict with it.
- :func:`unwrap_names`: the FSDP / activation-checkpoint / torch.compile wrapper parts removed.
- :func:`dit_prefix`, :func:`is_diffusers_layout`: where the DiT sits in a file and which naming it uses.
- :func:`wan_variant`: why a Wan-family DiT is not a text-to-video one (image-to-video, VACE, ...).
- :func:`read_config`, :func:`check_keys_and_shapes`: the :class:`model.dit.WanConfig` read off the
  weights, and every canonical key present with its shape.

Guarantees: only names and shapes are looked at (no tensor is read, copied or allocated: the
model's own names come from a meta-device :class:`model.dit.WanModel`); every refusal is a
:class:`weights.safe_io.CheckpointError` naming the file and what is wrong (the first few keys of a list).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping

import torch

from ..common.messages import SHOW, first_keys
from ..model.dit import WanConfig, WanModel
from .safe_io import CheckpointError, looks_like

# Wrapper names that FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Layers only image-to-video Wan DiTs have (original and diffusers names): image cross-attention and
# the CLIP image embedding.
I2V_LAYERS = ("img_emb", "k_img", "v_img", "norm_k_img", "image_embedder", "add_k_proj", "add_v_proj", "norm_added_k")


# ---- names -------------------------------------------------------------------------------------


def unwrap_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with every wrapper part (:data:`WRAPPER_PARTS`) removed from its keys; same tensors."""
    out = {}
    for k, v in sd.items():
        for part in WRAPPER_PARTS:
            k = k.replace(part, "")
        out[k] = v
    return out


# ---- diffusers names ---------------------------------------------------------------------------

_TOP_TO_DIFFUSERS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Inside a block. Wan's norm3 is the affine LayerNorm before cross-attention (diffusers' norm2);
# Wan's norm1 / norm2 (diffusers' norm1 / norm3) have no parameters.
_BLOCK_TO_DIFFUSERS = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK_TO_DIFFUSERS.update({f"{_ours}.q": f"{_theirs}.to_q", f"{_ours}.k": f"{_theirs}.to_k",
                                f"{_ours}.v": f"{_theirs}.to_v", f"{_ours}.o": f"{_theirs}.to_out.0",
                                f"{_ours}.norm_q": f"{_theirs}.norm_q", f"{_ours}.norm_k": f"{_theirs}.norm_k"})


def diffusers_name(name: str) -> str:
    """The diffusers ``WanTransformer3DModel`` name of a canonical Wan parameter or layer name.

    The modulation tables keep their shapes ([1, 6, dim] per block, [1, 2, dim] for the head) and
    their order (shift, scale, gate of attention, then of the FFN; shift, scale of the head).
    """
    if name == "head.modulation":
        return "scale_shift_table"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        rest = m.group(2)
        if rest == "modulation":
            return f"blocks.{m.group(1)}.scale_shift_table"
        module, _, leaf = rest.rpartition(".")
        for key in (rest, module):  # a layer name, or a parameter of a layer
            if key in _BLOCK_TO_DIFFUSERS:
                tail = rest[len(key):]
                return f"blocks.{m.group(1)}.{_BLOCK_TO_DIFFUSERS[key]}{tail}"
        return name
    module, _, leaf = name.rpartition(".")
    for key in (name, module):
        if key in _TOP_TO_DIFFUSERS:
            return _TOP_TO_DIFFUSERS[key] + name[len(key):]
    return name


def canonical_names(cfg: WanConfig) -> dict[str, torch.Size]:
    """Canonical parameter names and shapes of a Wan model of this configuration (nothing allocated)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


# ---- recognising the DiT -----------------------------------------------------------------------

_ANCHOR = re.compile(r"^(.*?)blocks\.\d+\.(self_attn\.q|attn1\.to_q)\.weight$")


def dit_prefix(sd: Mapping[str, torch.Tensor], path: str) -> str:
    """The prefix of the DiT's keys in ``sd`` (``""``, ``"model.diffusion_model."``, ...), read off
    its attention weights in either naming.

    Raises CheckpointError naming ``path`` when no key is a Wan DiT's (saying what the file looks
    like instead) or when several prefixes each hold a DiT."""
    prefixes = Counter(m.group(1) for k in sd if (m := _ANCHOR.match(k)) and m.group(1)[-1:] in ("", "."))
    if not prefixes:
        looks = looks_like(list(sd))
        what = f"it looks like {looks}" if looks else \
            f"none of its {len(sd)} tensors has Wan DiT names (first: {first_keys(list(sd)[:SHOW], len(sd))})"
        raise CheckpointError(path, f"not a Wan2.1 T2V or Wan2.2 TI2V-5B DiT: {what}")
    if len(prefixes) > 1:
        raise CheckpointError(path, f"holds several DiTs (prefixes {', '.join(repr(p) for p in prefixes)}); "
                                    "extract one")
    return next(iter(prefixes))


def is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether the DiT's keys (prefix removed) use diffusers' names (``blocks.0.attn1.to_q``)."""
    return any((m := _ANCHOR.match(k)) and m.group(2) == "attn1.to_q" for k in sd)


def wan_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Why a Wan-family DiT is not a text-to-video one the engine runs (None: it is a Wan2.1 T2V DiT, 16 latent
    channels in and out, or a Wan2.2 TI2V-5B, 48 in and out; canonical or diffusers names, prefix removed)."""
    keys = list(sd)

    def has(*parts: str) -> bool:
        return any(any(p in k for p in parts) for k in keys)

    if has(*I2V_LAYERS):
        return "a Wan image-to-video DiT (img_emb / k_img: Wan2.1 I2V or FLF2V)"
    if has("vace_blocks.", "vace_patch_embedding"):
        return "a Wan VACE DiT (vace_blocks)"
    if has("control_adapter."):
        return "a Wan Fun camera-control DiT (control_adapter)"
    if has("casual_audio_encoder.", "audio_proj.", "audio_injector."):
        return "a Wan speech/audio-to-video DiT (S2V / HuMo)"
    if has("face_adapter.", "motion_encoder.", "pose_patch_embedding"):
        return "a Wan2.2 Animate DiT (face_adapter / motion_encoder)"
    if has("ref_conv."):
        return "a Wan Fun control/reference DiT (ref_conv)"
    w = sd.get("patch_embedding.weight")
    if w is not None and w.dim() == 5:
        in_dim = w.shape[1]
        if in_dim == 36:
            return ("an image-to-video DiT (36 input channels: Wan2.2 I2V-A14B or a Wan Fun InP model); "
                    "text-to-video takes 16")
        if in_dim not in (16, 48):
            return (f"a Wan-family DiT with {in_dim} input channels (a control/inpainting variant?); T2V takes 16 "
                    "(Wan2.1) or 48 (Wan2.2 TI2V-5B)")
        head = sd.get("head.head.weight", sd.get("proj_out.weight"))  # [patch volume x out channels, dim]
        out = head.shape[0] // math.prod(w.shape[2:]) if head is not None and head.dim() == 2 else in_dim
        if out != in_dim:
            name = "Wan2.2 TI2V-5B's" if in_dim == 48 else "Wan2.1's"
            return (f"a Wan-family DiT taking {in_dim} latent channels ({name}) but making {out}: a text-to-video "
                    "DiT makes the channels it takes")
    return None


# ---- reading the DiT ---------------------------------------------------------------------------

def from_diffusers(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to Wan keys (exact lookups; anything unknown is reported).

    Raises CheckpointError naming ``path`` for a transformer that lacks a layer its shape is read
    from, or for keys no Wan T2V parameter has."""
    try:
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        w = sd["patch_embedding.weight"]
        cfg = WanConfig(dim=w.shape[0], ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0], num_heads=1,
                        num_layers=layers, in_dim=w.shape[1],
                        out_dim=sd["proj_out.weight"].shape[0] // math.prod(w.shape[2:]),
                        text_dim=sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
                        freq_dim=sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
                        patch_size=tuple(w.shape[2:]), qk_norm="blocks.0.attn1.norm_q.weight" in sd,
                        cross_attn_norm="blocks.0.norm2.weight" in sd)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(path, f"incomplete diffusers Wan transformer (missing {exc})") from None
    theirs_to_ours = {diffusers_name(k): k for k in canonical_names(cfg)}
    unknown = [k for k in sd if k not in theirs_to_ours]
    if unknown:
        raise CheckpointError(path, f"unexpected keys for a diffusers Wan T2V transformer: {first_keys(unknown)}")
    return {theirs_to_ours[k]: v for k, v in sd.items()}


_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
             "blocks.0.ffn.0.weight")


def read_config(sd: dict[str, torch.Tensor], path: str, heads: int | None) -> WanConfig:
    """The :class:`model.dit.WanConfig` of canonical weights (``heads``: None for dim // 128).

    Raises CheckpointError naming ``path`` for a missing key the shape is read from, a patch
    embedding that is not a 3-D convolution, or shapes the configuration cannot come from."""
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(path, f"missing keys: {first_keys(missing)}")
    if sd["patch_embedding.weight"].dim() != 5:
        raise CheckpointError(path, f"patch_embedding.weight has shape {list(sd['patch_embedding.weight'].shape)}; "
                                    "a Wan DiT has a 3-D patch convolution [dim, 16, 1, 2, 2]")
    try:
        return WanConfig.from_state_dict(sd, heads)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(path, f"cannot read the model configuration ({exc})") from None


def check_keys_and_shapes(sd: dict[str, torch.Tensor], cfg: WanConfig, path: str) -> None:
    """Check that ``sd`` holds exactly the parameters of a ``cfg`` model, each with its shape.

    Raises CheckpointError naming ``path`` with the first few missing / unexpected keys, or the
    first tensor whose shape does not fit the rest."""
    expected = canonical_names(cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {first_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {first_keys(unexpected)}")
        raise CheckpointError(path, "; ".join(parts) + f" (a Wan T2V DiT of width {cfg.dim}, "
                                                       f"{cfg.num_layers} layers)")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CheckpointError(path, f"inconsistent shapes: {k} is {list(sd[k].shape)} but the model read from "
                                        f"the other weights (width {cfg.dim}, ffn {cfg.ffn_dim}) needs {list(shape)}")
