"""The latent space of a DiT or decoder file told before it is loaded, from tensors' names and shapes alone, so a
frontend can plan the run (its latents' channels and size) and refuse a decoder of another latent space where the
run enters, before any weight is read into memory.

Guarantees: safetensors files are read through their header only (``safe_open``: no tensor data); ``.pt`` files
through :func:`weights.safe_io.read_pickle` (``torch.load(weights_only=True)``, memory-mapped for the zip format:
no pickled code runs, no tensor is copied); a diffusers or Wan folder through its ``config.json`` (``in_channels``
/ ``in_dim``), else its shards' headers. Nothing is refused here: a file this cannot read or tell (a GGUF file, a
damaged one, one without a patch embedding) gives None, and :func:`weights.checkpoint.load_dit` names what is wrong
with it when it is loaded.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import torch

from ..common.latent_space import WAN21_LATENTS, WAN22_LATENTS, LatentSpace, latent_space_of
from .safe_io import PICKLE_EXT, SAFETENSORS_EXT, CheckpointError, read_pickle
from .vae_names import decoder_kind

# the patch embedding's weight [dim, latent channels, pt, ph, pw], whatever the prefix or wrapper names
_PATCH = re.compile(r"(^|\.)patch_embedding\.weight$")
# one shard of a sharded safetensors model (diffusers, Wan: diffusion_pytorch_model-00001-of-00002.safetensors)
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$", re.IGNORECASE)


def shard_words(path: str) -> str | None:
    """Why the file ``path`` is no whole DiT because it is one shard of several (its name ``...-0000i-of-0000n
    .safetensors`` with n > 1), naming the folder to give instead (a folder of shards loads whole); None otherwise.
    Only the name is read."""
    path = os.fspath(path)
    found = _SHARD.search(os.path.basename(path))
    if found is None or int(found.group(2)) < 2 or os.path.isdir(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return (f"is shard {int(found.group(1))} of {int(found.group(2))} of a sharded model: give the folder that "
            f"holds them all, {folder}")


def stored_latent_space(path: str) -> LatentSpace | None:
    """The :class:`common.latent_space.LatentSpace` of the DiT in ``path`` (a file or a folder of shards), told by
    its patch embedding's input channels (16: Wan2.1, 48: Wan2.2) without loading it; None where it cannot be told
    (see the module docstring)."""
    path = os.fspath(path)
    channels = _folder_channels(path) if os.path.isdir(path) else _file_channels(path)
    try:
        return None if channels is None else latent_space_of(channels)
    except ValueError:
        return None


def _file_channels(path: str) -> int | None:
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXT):
        return _safetensors_channels(path)
    if lower.endswith(PICKLE_EXT) and os.path.isfile(path):
        try:
            return _channels_in(read_pickle(path))
        except CheckpointError:
            return None
    return None


def _safetensors_channels(path: str) -> int | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            key = next((k for k in f.keys() if _PATCH.search(k)), None)
            shape = None if key is None else f.get_slice(key).get_shape()
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return int(shape[1]) if shape is not None and len(shape) == 5 else None


def _channels_in(obj: Any, depth: int = 0) -> int | None:
    """The patch embedding's input channels in a (possibly nested) dict of tensors; EMA weights are the base's
    shape, so the first found answers."""
    if not isinstance(obj, Mapping) or depth > 4:
        return None
    for k, v in obj.items():
        if isinstance(k, str) and _PATCH.search(k) and getattr(v, "dim", lambda: 0)() == 5:
            return int(v.shape[1])
    for v in obj.values():
        if isinstance(v, Mapping) and (found := _channels_in(v, depth + 1)) is not None:
            return found
    return None


def stored_decoder_space(path: str) -> LatentSpace | None:
    """The latent space the decoder in ``path`` decodes (a VAE, LightVAE or a tiny decoder:
    :func:`weights.vae_names.decoder_kind` on its names and shapes; the Wan2.2 VAE, taew2_2 and lighttaew2_2 ->
    Wan2.2's, the others Wan2.1's), without loading it; None where it cannot be told (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(SAFETENSORS_EXT)]
        tensors: dict | None = {}
        for name in names:
            tensors.update(_safetensors_meta(name) or {})
    elif path.lower().endswith(SAFETENSORS_EXT):
        tensors = _safetensors_meta(path)
    elif path.lower().endswith(PICKLE_EXT) and os.path.isfile(path):
        try:
            tensors = read_pickle(path)
        except CheckpointError:
            return None
    else:
        return None
    try:
        kind = decoder_kind(tensors, path) if tensors else None
    except (CheckpointError, KeyError, IndexError, AttributeError):
        return None
    return None if kind is None else WAN22_LATENTS if kind in ("wan2.2_vae", "taew2_2", "lighttaew2_2") \
        else WAN21_LATENTS


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _safetensors_meta(path: str) -> dict[str, torch.Tensor] | None:
    """A safetensors file's tensors as meta tensors of their shapes and dtypes (its header only), None when
    unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = torch.empty(sl.get_shape(), dtype=_DTYPES.get(sl.get_dtype(), torch.float32), device="meta")
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def _folder_channels(path: str) -> int | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        channels = config.get("in_channels", config.get("in_dim")) if isinstance(config, dict) else None
        if isinstance(channels, int):
            return channels
    except (OSError, ValueError):
        pass
    for name in sorted(os.listdir(path)):
        if name.endswith(SAFETENSORS_EXT) and (found := _safetensors_channels(os.path.join(path, name))) is not None:
            return found
    return None
