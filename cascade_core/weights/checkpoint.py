"""One loader for Wan text-to-video DiT weights (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B), whatever layout they
were saved in.

:func:`load_dit` returns a state dict with the canonical parameter names of :class:`model.dit.WanModel`
(the original Wan / ComfyUI names) in the requested dtype, and a :class:`CheckpointInfo` saying
what was found. This module reads the file, chooses the weights inside it (EMA or base, the
container trail), dequantises them and merges a LoRA; the names of each layout and the checks that
the weights are a Wan T2V DiT are :mod:`weights.dit_names`'s.

Guarantees:
- Files are read only through :mod:`weights.safe_io`: safetensors memory-mapped, ``.pt`` through
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
- A LoRA (``lora=``) is merged at load by :func:`weights.lora.merge_lora` (every key style it reads is
  listed there).
- Wan2.2 TI2V-5B (dim 3072, ffn 14336, 30 layers, 48 latent channels in and out: Wan-Video/Wan2.2
  ``wan/configs/wan_ti2v_5B.py``) in the same layouts: the original ``Wan2.2-TI2V-5B`` files, ComfyUI's repack,
  the diffusers folder, and LongLive 2.0's ``.pt`` (``{"generator": {"model.<Wan2.2 key>": ...}}``, NVlabs/LongLive
  ``scripts/merge_lora_generator.py``) or the same tensors as ``.safetensors``; its peft LoRA (rank 128, alpha 128,
  every Linear of a block: ``utils/lora_utils.py:19-66``) merges as any other. :attr:`CheckpointInfo.assumed` says
  what the loader took it for (the latent space, told by the channels; the head count, not stored).
- Every failure is a :class:`weights.safe_io.CheckpointError` that names the file and says what is wrong:
  what the file looks like when it is not a Wan T2V DiT, which keys are missing or unexpected
  (the first few), which tensor has an inconsistent shape, which LoRA keys match no layer.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..common.messages import SHOW, first_keys
from ..model.dit import WanConfig
from ..model.fp8 import FP8_DTYPES, WEIGHT_DTYPES, prepare_weights
from ..model.fp8 import dequantize_state_dict as dequantize
from ..model.gguf import TYPE_SUFFIX, logical_shape
from .dit_names import (
    check_keys_and_shapes,
    dit_prefix,
    from_diffusers,
    is_diffusers_layout,
    read_config,
    unwrap_names,
    wan_variant,
)
from .expert_files import expert_folders, expert_half
from .lora import merge_lora
from .probe import shard_words
from .safe_io import SAFETENSORS_EXT, CheckpointError, read_weights

EMA_MODES = ("auto", "ema", "base")

# Containers of training checkpoints, most specific first.
EMA_KEYS = ("generator_ema", "model_ema", "ema")
BASE_KEYS = ("generator", "model", "state_dict", "module")


# ---- what was loaded ---------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    """What :func:`load_dit` found and did."""

    path: str
    source_format: str  # e.g. "self-forcing .pt (generator_ema)", "comfyui safetensors", "diffusers"
    source_dtypes: dict[str, int]  # stored dtype -> number of tensors
    dtype: str  # compute dtype of the returned tensors
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
    weight_dtype: str = "default"  # storage of the blocks' Linear weights: "fp8_e4m3fn", ... ("default": dtype)
    fast_fp8: bool = False  # their products run as fp8 where the GPU can
    assumed: str | None = None  # what the loader took the file for where the file does not say (a Wan2.2 DiT)

    @property
    def latent_space(self):
        """The :class:`common.latent_space.LatentSpace` the DiT works in (``WanConfig.latent_space``)."""
        return self.config.latent_space

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
        known = {(1536, 30, 8960, 16): "Wan2.1 T2V 1.3B", (5120, 40, 13824, 16): "Wan2.1 T2V 14B",
                 (3072, 30, 14336, 48): "Wan2.2 TI2V 5B"}
        style = "Wan2.2-style TI2V DiT" if self.config.in_dim == 48 else "Wan2.1-style T2V DiT"
        return known.get((self.dim, self.num_layers, self.ffn_dim, self.config.in_dim), style)

    def describe(self) -> str:
        """One line: model, shape, size, source, EMA and LoRA."""
        c = self.config
        dtypes = "+".join(self.source_dtypes)
        parts = [f"{self.model_name} (dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads, ffn {c.ffn_dim})",
                 f"{_count(self.parameters)} params, {_size(self.bytes)} {self.dtype}"
                 + ("" if self.weight_dtype == "default" else f" (block weights {self.weight_dtype})"),
                 f"from {self.source_format} [{dtypes}]"]
        if self.ema_available or self.ema_used:
            parts.append("EMA weights" if self.ema_used else "base (non-EMA) weights")
        if self.lora:
            parts.append(f"LoRA {self.lora} x{self.lora_scale:g} merged into {self.lora_layers} layers"
                         + (f", {self.lora_note}" if self.lora_note else ""))
        if self.ignored_tensors:
            parts.append(f"{self.ignored_tensors} non-DiT tensors ignored")
        if self.assumed:
            parts.append(f"assumed {self.assumed}")
        return f"{os.path.basename(self.path)}: " + "; ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


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



# ---- precision ---------------------------------------------------------------------------------

def dequantize_state_dict(sd: dict[str, torch.Tensor], path: str, dtype: torch.dtype,
                          weight_dtype: str | None = None) -> tuple[dict, str | None]:
    """:func:`fp8.dequantize_state_dict` for a file: (tensors in ``dtype``, quantization label); with a
    ``weight_dtype`` :func:`fp8.prepare_weights` instead (block weights fp8 where asked or stored so).

    Raises CheckpointError naming ``path`` for integer-packed weights (a quantisation format this
    loader does not read), a scale without its weight or a scale that does not fit its weight."""
    gguf = {k for k in sd if k.endswith(TYPE_SUFFIX)} | {k.removesuffix(TYPE_SUFFIX) + ".weight" for k in sd
                                                         if k.endswith(TYPE_SUFFIX)}  # GGUF blocks and their types
    ints = [k for k, v in sd.items() if not v.is_floating_point() and k != "scaled_fp8"
            and not k.endswith(".comfy_quant") and k not in gguf]
    if ints:
        raise CheckpointError(path, f"integer-packed weights ({sd[ints[0]].dtype} in {first_keys(ints)}): a "
                                    "quantisation format (int8 / nvfp4 / GGUF-style) this loader does not read; "
                                    "use a bf16, fp16 or fp8 file")
    try:
        return dequantize(sd, dtype) if weight_dtype is None else prepare_weights(sd, dtype, weight_dtype)[:2]
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters as the names and shapes checks see them: scales and GGUF types left out, GGUF
    blocks as meta tensors of the weight's shape."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".weight_scale", TYPE_SUFFIX)):
            continue
        qtype = sd.get(k.removesuffix(".weight") + TYPE_SUFFIX)
        out[k] = v if qtype is None else torch.empty(logical_shape(v, int(qtype)), device="meta")
    return out


# ---- the loader ----------------------------------------------------------------------------------

def load_dit(path: str, *, dtype: torch.dtype = torch.bfloat16, ema: str = "auto", lora: str | None = None,
             lora_scale: float = 1.0, num_heads: int | None = None, weight_dtype: str = "default",
             as_expert: bool = False) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Load Wan2.1 T2V or Wan2.2 TI2V-5B DiT weights -> (canonical state dict in ``dtype``, :class:`CheckpointInfo`).

    ``weight_dtype`` (:data:`model.fp8.WEIGHT_DTYPES`): "default" keeps block Linear weights stored fp8 as
    they are (values and scales, ``<layer>.weight_scale`` [out, 1]); an fp8 choice stores them so; every
    other tensor is in ``dtype``. A LoRA is merged into the widened weights, which are then stored as asked
    (a file's own fp8 type with "default"). Build the model with :meth:`WanModel.from_state_dict` and
    ``fast_fp8=info.fast_fp8``. A ComfyUI-GGUF ``.gguf`` file's quantised block weights stay GGUF blocks
    (:mod:`model.gguf`) with "default"; merged with a LoRA they are stored as fp8 e4m3.

    ``ema``: "auto" takes EMA weights when the file has them, except with a LoRA, which is merged
    into the base (non-EMA) weights it was trained on (as LongLive does); "ema" / "base" insist.
    ``num_heads``: not stored in the weights; by default the folder's config.json says, else
    dim // 128 (every released Wan model).
    Tensors are named as in Wan (``patch_embedding.weight`` [dim, 16, 1, 2, 2]; [3072, 48, 1, 2, 2] for the Wan2.2
    TI2V-5B, whose ``info.assumed`` says so), on the CPU.
    Raises CheckpointError (naming the file and what was found) for a missing, corrupt or foreign
    file, or a pickle that would run code; ValueError for a bad ``ema`` or ``dtype``. A two-expert (Wan2.2 A14B)
    folder or one of its halves is refused (:func:`weights.expert_files.expert_half`; :func:`load_expert_pair`
    reads them, ``as_expert``), as is one shard of a sharded model (:func:`weights.probe.shard_words`: its folder
    loads whole).
    """
    path = os.fspath(path)
    if ema not in EMA_MODES:
        raise ValueError(f"ema must be one of {EMA_MODES}, got {ema!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise ValueError(f"dtype must be a floating dtype such as torch.bfloat16, got {dtype}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale}")
    if not as_expert and (why := expert_half(path)):  # a two-expert (Wan2.2 A14B) folder or one of its halves
        raise CheckpointError(path, why)
    if why := shard_words(path):  # one shard of several: its folder loads whole
        raise CheckpointError(path, why)
    raw, kind, folder_cfg = read_weights(path)
    tensors, trail, ema_used, ema_available = _select(raw, path, ema, prefer_base=lora is not None)
    del raw
    sd = unwrap_names(tensors)

    prefix = dit_prefix(sd, path)
    ignored = sum(1 for k in sd if not k.startswith(prefix))
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    source_dtypes = dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values()).most_common())
    diffusers = is_diffusers_layout(sd)
    variant = wan_variant(sd)
    if variant:
        raise CheckpointError(path, f"not a Wan2.1 T2V or Wan2.2 TI2V-5B DiT: it is {variant}")

    # kept as stored where asked; widened for a LoRA merge or a diffusers renaming, stored as asked after it
    stored = next((v.dtype for k, v in sd.items() if v.dtype in FP8_DTYPES and k.endswith(".weight")), None)
    if any(k.endswith(TYPE_SUFFIX) for k in sd):  # GGUF blocks with a LoRA merged: stored as fp8 again
        stored = torch.float8_e4m3fn
    widen = lora is not None or diffusers
    sd, quant = dequantize_state_dict(sd, path, dtype, None if widen else weight_dtype)
    heads = num_heads or folder_cfg.get("num_heads") or folder_cfg.get("num_attention_heads")
    heads = int(heads) if isinstance(heads, (int, float)) and heads > 0 else None
    if diffusers:
        sd = from_diffusers(sd, path)
    sd = {k: v for k, v in sd.items() if not k.startswith("rope.") and k != "freqs"}  # recomputed, never stored weights
    params = shapes_of(sd)
    cfg = read_config(params, path, heads)
    check_keys_and_shapes(params, cfg, path)
    assumed = assumed_words(cfg, heads is not None, path)

    lora_name, merged = None, None
    if lora is not None:
        merged = merge_lora(sd, lora, lora_scale, dtype)
        lora_name = os.path.basename(os.fspath(lora))
    if widen:
        as_stored = {torch.float8_e4m3fn: "fp8_e4m3fn_fast", torch.float8_e5m2: "fp8_e5m2"}.get(stored, "default")
        sd, _ = dequantize_state_dict(sd, path, dtype, as_stored if weight_dtype == "default" else weight_dtype)
    kept = {v.dtype for v in sd.values() if v.dtype in FP8_DTYPES}
    fast = weight_dtype == "fp8_e4m3fn_fast" or (weight_dtype == "default" and kept == {torch.float8_e4m3fn})
    stored_as = "default" if not kept else "fp8_" + str(kept.pop()).removeprefix("torch.float8_") + "_fast" * fast
    if any(k.endswith(TYPE_SUFFIX) for k in sd):
        stored_as = "gguf"

    label = _format_label(path, kind, trail, prefix, diffusers, quant, "LongLive 2.0" if assumed else "self-forcing")
    info = CheckpointInfo(
        path=path, source_format=label, source_dtypes=source_dtypes, dtype=str(dtype).removeprefix("torch."),
        parameters=sum(v.numel() for v in shapes_of(sd).values()), bytes=sum(v.numel() * v.element_size() for v in sd.values()),
        config=cfg, ema_used=ema_used, ema_available=ema_available, quantization=quant,
        lora=lora_name, lora_scale=float(lora_scale) if lora is not None else 0.0,
        lora_layers=merged.layers if merged else 0, lora_note=merged.note if merged else None,
        ignored_tensors=ignored, weight_dtype=stored_as, fast_fp8=fast, assumed=assumed)
    return sd, info


def load_expert_pair(path: str, *, dtype: torch.dtype = torch.bfloat16, num_heads: int | None = None,
                     weight_dtype: str = "default"):
    """A two-expert (Wan2.2 A14B) diffusers pipeline folder (:mod:`weights.expert_files`) -> (high-noise expert's
    (state dict, :class:`CheckpointInfo`), low-noise expert's, boundary timestep, note), each half read by
    :func:`load_dit` from its own folder; the note says where the boundary came from. Raises CheckpointError
    naming the folder when ``path`` is not such a folder, a half is missing or the halves differ in shape."""
    folders = expert_folders(path)
    if folders is None:
        raise CheckpointError(os.fspath(path), "not a two-expert folder (transformer/ and transformer_2/ with "
                                               "model_index.json, as diffusers' Wan2.2 A14B)")
    high, low = (load_dit(p, dtype=dtype, num_heads=num_heads, weight_dtype=weight_dtype, as_expert=True)
                 for p in (folders.high, folders.low))
    if high[1].config != low[1].config:
        raise CheckpointError(os.fspath(path), f"its experts differ in shape ({high[1].model_name} dim "
                                               f"{high[1].dim}, {low[1].model_name} dim {low[1].dim})")
    source = "model_index.json" if folders.boundary_given else "assumed: FastVideo's causal Wan2.2-A14B config"
    return high, low, folders.boundary, f"boundary timestep {folders.boundary} ({source})"


def assumed_words(cfg: WanConfig, heads_given: bool, path: str) -> str | None:
    """What the loader assumes of a Wan2.2 DiT the file does not say (None for a Wan2.1 one, whose description
    is as it always was): its latent space, told by the channels, and the head count where no config gave it.
    Raises CheckpointError naming ``path`` for channels of no latent space the engine knows."""
    try:
        space = cfg.latent_space
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    if space.channels == 16:
        return None
    heads = "" if heads_given else f", {cfg.num_heads} heads of {cfg.head_dim} (dim / 128: not stored in the weights)"
    return (f"Wan2.2 TI2V-5B architecture ({cfg.in_dim} latent channels in and out: {space.words()}, decoded by the "
            f"{space.name} VAE{heads})")


def _format_label(path: str, kind: str, trail: list[str], prefix: str, diffusers: bool, quant: str | None,
                  trainer: str = "self-forcing") -> str:
    lower = path.lower()
    if lower.endswith(".gguf"):
        label = "ComfyUI-GGUF file"
    elif diffusers:
        label = "diffusers" + (" folder" if kind == "folder" else "")
    elif kind == "folder":
        label = "Wan safetensors folder"
    elif lower.endswith(SAFETENSORS_EXT):
        label = "comfyui safetensors" if "diffusion_model." in prefix else \
            "safetensors" + (f" (prefix {prefix})" if prefix else "")
    elif trail and trail[0] in ("generator", "generator_ema"):
        label = f"{trainer} .pt ({'/'.join(trail)})"  # a training checkpoint's generator (LongLive 2.0: Wan2.2)
    else:
        label = ".pt" + (f" ({'/'.join(trail)})" if trail else " state dict")
    return label + (f", {quant}" if quant else "")
