"""One loader for Wan2.1 text-to-video DiT weights, whatever layout they were saved in.

:func:`load_dit` returns a state dict with the canonical parameter names of :class:`model.WanModel`
(the original Wan / ComfyUI names) in the requested dtype, and a :class:`CheckpointInfo` saying
what was found.

Guarantees:
- Files are read only through :mod:`safe_io`: safetensors memory-mapped, ``.pt`` through
  ``torch.load(weights_only=True)``; no pickled code ever runs. Files are never written.
- Layouts understood: training checkpoints of Self-Forcing, CausVid, Causal Forcing and LongLive
  (``generator_ema`` / ``generator`` / ``model`` / ``state_dict`` / ``module`` containers, possibly
  nested, keys under ``model.``, ``module.`` and FSDP / activation-checkpoint / compile wrapper names);
  ComfyUI and repackaged safetensors with or without ``model.diffusion_model.`` / ``diffusion_model.``
  / ``model.`` prefixes; the diffusers ``WanTransformer3DModel`` layout; a folder of (sharded)
  ``diffusion_pytorch_model*.safetensors`` with its ``config.json`` (original Wan or diffusers).
- Precision: fp32 / fp16 / bf16 sources, and fp8 (``float8_e4m3fn``, ``float8_e5m2``) with or
  without a per-tensor scale (ComfyUI "fp8 scaled": ``<layer>.scale_weight`` beside
  ``<layer>.weight`` and a ``scaled_fp8`` marker; newer files name it ``<layer>.weight_scale``),
  dequantised as ``weight.float() * scale`` and then cast.
- A LoRA (``lora=``) is merged at load by :func:`lora.merge_lora` (every key style it reads is
  listed there).
- Every failure is a :class:`safe_io.CheckpointError` that names the file and says what is wrong:
  what the file looks like when it is not a Wan2.1 T2V DiT, which keys are missing or unexpected
  (the first few), which tensor has an inconsistent shape, which LoRA keys match no layer.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .model import WanConfig, WanModel
from .fp8 import FP8_DTYPES, dequantize_state_dict as dequantize
from .safe_io import SAFETENSORS_EXT, SHOW, CheckpointError, first_keys, looks_like, read_weights

EMA_MODES = ("auto", "ema", "base")

# Containers of training checkpoints, most specific first.
EMA_KEYS = ("generator_ema", "model_ema", "ema")
BASE_KEYS = ("generator", "model", "state_dict", "module")
# Wrapper names that FSDP, activation checkpointing and torch.compile insert into parameter names.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Layers only image-to-video Wan DiTs have (original and diffusers names): image cross-attention and
# the CLIP image embedding.
I2V_LAYERS = ("img_emb", "k_img", "v_img", "norm_k_img", "image_embedder", "add_k_proj", "add_v_proj", "norm_added_k")


# ---- what was loaded ---------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    """What :func:`load_dit` found and did."""

    path: str
    source_format: str  # e.g. "self-forcing .pt (generator_ema)", "comfyui safetensors", "diffusers"
    source_dtypes: dict[str, int]  # stored dtype -> number of tensors
    dtype: str  # dtype of the returned tensors
    parameters: int
    bytes: int  # size of the returned tensors
    config: WanConfig
    ema_used: bool = False
    ema_available: bool = False
    quantization: str | None = None  # e.g. "fp8 e4m3fn scaled"
    lora: str | None = None
    lora_scale: float = 0.0
    lora_layers: int = 0
    lora_note: str | None = None  # what the merge left out (image-to-video layers), one line
    ignored_tensors: int = 0  # tensors outside the DiT (VAE, text encoder of a bundled file)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def ffn_dim(self) -> int:
        return self.config.ffn_dim

    @property
    def model_name(self) -> str:
        known = {(1536, 30, 8960): "Wan2.1 T2V 1.3B", (5120, 40, 13824): "Wan2.1 T2V 14B"}
        return known.get((self.dim, self.num_layers, self.ffn_dim), "Wan2.1-style T2V DiT")

    def describe(self) -> str:
        """One line: model, shape, size, source, EMA and LoRA."""
        c = self.config
        dtypes = "+".join(self.source_dtypes)
        parts = [f"{self.model_name} (dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads, ffn {c.ffn_dim})",
                 f"{_count(self.parameters)} params, {_size(self.bytes)} {self.dtype}",
                 f"from {self.source_format} [{dtypes}]"]
        if self.ema_available or self.ema_used:
            parts.append("EMA weights" if self.ema_used else "base (non-EMA) weights")
        if self.lora:
            parts.append(f"LoRA {self.lora} x{self.lora_scale:g} merged into {self.lora_layers} layers"
                         + (f", {self.lora_note}" if self.lora_note else ""))
        if self.ignored_tensors:
            parts.append(f"{self.ignored_tensors} non-DiT tensors ignored")
        return f"{os.path.basename(self.path)}: " + "; ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


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


# ---- recognising files -------------------------------------------------------------------------

_ANCHOR = re.compile(r"^(.*?)blocks\.\d+\.(self_attn\.q|attn1\.to_q)\.weight$")


def _wan_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Why a Wan-family DiT is not a Wan2.1 text-to-video one (None: it is)."""
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
        if in_dim == 48:
            return "a Wan2.2 TI2V-5B DiT (48 latent channels, for the Wan2.2 VAE); Wan2.1 T2V takes 16"
        if in_dim != 16:
            return f"a Wan-family DiT with {in_dim} input channels (a control/inpainting variant?); T2V takes 16"
    return None


# ---- choosing the weights inside a file ------------------------------------------------------

def _select(obj: Any, path: str, ema: str, prefer_base: bool) -> tuple[dict, list[str], bool, bool]:
    """The tensor dict of a (possibly nested) checkpoint: (tensors, container trail, ema used, ema available)."""
    trail: list[str] = []
    ema_used = ema_available = False
    outer: list[str] = []  # the containers of the first level, for messages
    while True:
        if not isinstance(obj, Mapping):
            raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
        containers = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
        ema_key = next((k for k in EMA_KEYS if k in containers), None)
        base_key = next((k for k in BASE_KEYS if k in containers), None)
        if ema_key is None and base_key is None:
            break
        outer = outer or [str(k) for k in containers]
        ema_available |= ema_key is not None
        if ema == "ema":
            key = ema_key or base_key  # an EMA container may sit deeper
        elif ema == "base":
            if base_key is None:
                raise CheckpointError(path, f"holds only EMA weights ({ema_key}); use ema 'auto' or 'ema'")
            key = base_key
        else:
            key = base_key if (prefer_base and base_key) or ema_key is None else ema_key
        ema_used |= key == ema_key
        trail.append(str(key))
        obj = containers[key]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        if "generator_lora" in obj or "critic_lora" in obj:
            raise CheckpointError(path, "holds only LoRA weights (generator_lora); load it as the LoRA "
                                        "of a base checkpoint")
        raise CheckpointError(path, f"holds no tensors where weights were expected (keys: {_keys(obj)})")
    if ema == "ema" and not ema_used:
        what = f"it holds {_keys(outer)}" if outer else "a plain state dict"
        raise CheckpointError(path, f"has no EMA weights ({what}); use ema 'auto' or 'base'")
    return tensors, trail, ema_used, ema_available


def _keys(obj: Mapping) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:SHOW]) + (f" and {len(keys) - SHOW} more" if len(keys) > SHOW else "")


def _unwrap_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for part in WRAPPER_PARTS:
            k = k.replace(part, "")
        out[k] = v
    return out


# ---- precision ---------------------------------------------------------------------------------

def dequantize_state_dict(sd: dict[str, torch.Tensor], path: str, dtype: torch.dtype) -> tuple[dict, str | None]:
    """:func:`fp8.dequantize_state_dict` for a file: (tensors in ``dtype``, quantization label).

    Raises CheckpointError naming ``path`` for integer-packed weights (a quantisation format this
    loader does not read), a scale without its weight or a scale that does not fit its weight."""
    ints = [k for k, v in sd.items() if not v.is_floating_point() and k != "scaled_fp8"
            and not k.endswith(".comfy_quant")]
    if ints:
        raise CheckpointError(path, f"integer-packed weights ({sd[ints[0]].dtype} in {first_keys(ints)}): a "
                                    "quantisation format (int8 / nvfp4 / GGUF-style) this loader does not read; "
                                    "use a bf16, fp16 or fp8 file")
    try:
        return dequantize(sd, dtype)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None


# ---- the loader ----------------------------------------------------------------------------------

def load_dit(path: str, *, dtype: torch.dtype = torch.bfloat16, ema: str = "auto", lora: str | None = None,
             lora_scale: float = 1.0, num_heads: int | None = None) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Load Wan2.1 T2V DiT weights -> (canonical state dict in ``dtype``, :class:`CheckpointInfo`).

    ``ema``: "auto" takes EMA weights when the file has them, except with a LoRA, which is merged
    into the base (non-EMA) weights it was trained on (as LongLive does); "ema" / "base" insist.
    ``num_heads``: not stored in the weights; by default the folder's config.json says, else
    dim // 128 (every released Wan2.1 model).
    Tensors are named as in Wan (``patch_embedding.weight`` [dim, 16, 1, 2, 2], ...), on the CPU.
    Raises CheckpointError (naming the file and what was found) for a missing, corrupt or foreign
    file, or a pickle that would run code; ValueError for a bad ``ema`` or ``dtype``.
    """
    path = os.fspath(path)
    if ema not in EMA_MODES:
        raise ValueError(f"ema must be one of {EMA_MODES}, got {ema!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise ValueError(f"dtype must be a floating dtype such as torch.bfloat16, got {dtype}")
    if not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale}")
    raw, kind, folder_cfg = read_weights(path)
    tensors, trail, ema_used, ema_available = _select(raw, path, ema, prefer_base=lora is not None)
    del raw
    sd = _unwrap_names(tensors)

    # Where the DiT is inside the file: the prefix of its attention weights.
    prefixes = Counter(m.group(1) for k in sd if (m := _ANCHOR.match(k)) and m.group(1)[-1:] in ("", "."))
    if not prefixes:
        looks = looks_like(list(sd))
        what = f"it looks like {looks}" if looks else \
            f"none of its {len(sd)} tensors has Wan DiT names (first: {first_keys(list(sd)[:SHOW], len(sd))})"
        raise CheckpointError(path, f"not a Wan2.1 T2V DiT: {what}")
    if len(prefixes) > 1:
        raise CheckpointError(path, f"holds several DiTs (prefixes {', '.join(repr(p) for p in prefixes)}); "
                                    "extract one")
    prefix = next(iter(prefixes))
    ignored = sum(1 for k in sd if not k.startswith(prefix))
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    source_dtypes = dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values()).most_common())
    diffusers = any((m := _ANCHOR.match(k)) and m.group(2) == "attn1.to_q" for k in sd)
    variant = _wan_variant(sd)
    if variant:
        raise CheckpointError(path, f"not a Wan2.1 text-to-video DiT: it is {variant}")

    sd, quant = dequantize_state_dict(sd, path, dtype)
    heads = num_heads or folder_cfg.get("num_heads") or folder_cfg.get("num_attention_heads")
    heads = int(heads) if isinstance(heads, (int, float)) and heads > 0 else None
    if diffusers:
        sd = _from_diffusers(sd, path)
    sd = {k: v for k, v in sd.items() if not k.startswith("rope.") and k != "freqs"}  # recomputed, never stored weights
    cfg = _config(sd, path, heads)
    _check_keys_and_shapes(sd, cfg, path)

    lora_name, merged = None, None
    if lora is not None:
        from .lora import merge_lora  # the LoRA module builds on this one's names

        merged = merge_lora(sd, lora, lora_scale, dtype)
        lora_name = os.path.basename(os.fspath(lora))

    label = _format_label(path, kind, trail, prefix, diffusers, quant)
    info = CheckpointInfo(
        path=path, source_format=label, source_dtypes=source_dtypes, dtype=str(dtype).removeprefix("torch."),
        parameters=sum(v.numel() for v in sd.values()), bytes=sum(v.numel() * v.element_size() for v in sd.values()),
        config=cfg, ema_used=ema_used, ema_available=ema_available, quantization=quant,
        lora=lora_name, lora_scale=float(lora_scale) if lora is not None else 0.0,
        lora_layers=merged.layers if merged else 0, lora_note=merged.note if merged else None,
        ignored_tensors=ignored)
    return sd, info


def _format_label(path: str, kind: str, trail: list[str], prefix: str, diffusers: bool, quant: str | None) -> str:
    lower = path.lower()
    if diffusers:
        label = "diffusers" + (" folder" if kind == "folder" else "")
    elif kind == "folder":
        label = "Wan safetensors folder"
    elif lower.endswith(SAFETENSORS_EXT):
        label = "comfyui safetensors" if "diffusion_model." in prefix else \
            "safetensors" + (f" (prefix {prefix})" if prefix else "")
    elif trail and trail[0] in ("generator", "generator_ema"):
        label = f"self-forcing .pt ({'/'.join(trail)})"
    else:
        label = ".pt" + (f" ({'/'.join(trail)})" if trail else " state dict")
    return label + (f", {quant}" if quant else "")


def _from_diffusers(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to Wan keys (exact lookups; anything unknown is reported)."""
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
        raise CheckpointError(path, f"unexpected keys for a diffusers Wan2.1 T2V transformer: {first_keys(unknown)}")
    return {theirs_to_ours[k]: v for k, v in sd.items()}


_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
             "blocks.0.ffn.0.weight")


def _config(sd: dict[str, torch.Tensor], path: str, heads: int | None) -> WanConfig:
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


def _check_keys_and_shapes(sd: dict[str, torch.Tensor], cfg: WanConfig, path: str) -> None:
    expected = canonical_names(cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {first_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {first_keys(unexpected)}")
        raise CheckpointError(path, "; ".join(parts) + f" (a Wan2.1 T2V DiT of width {cfg.dim}, "
                                                       f"{cfg.num_layers} layers)")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CheckpointError(path, f"inconsistent shapes: {k} is {list(sd[k].shape)} but the model read from "
                                        f"the other weights (width {cfg.dim}, ffn {cfg.ffn_dim}) needs {list(shape)}")
