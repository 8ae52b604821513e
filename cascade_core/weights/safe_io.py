"""Reading tensor files without ever running a pickle's code.

Guarantees:
- ``.safetensors`` files are read memory-mapped; nothing in them can execute.
- ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files go through ``torch.load(weights_only=True)`` only:
  a pickle that asks for anything beyond tensors and plain containers is refused before any
  of its code runs.
- Every failure is a :class:`CheckpointError` whose message names the file and says what is wrong
  (missing, truncated or corrupt, refused pickle, not a tensor file).
- :func:`read_weights` also reads a diffusers-style folder of (sharded) safetensors; :func:`looks_like`
  names what a file is, from its tensor names, for the messages of every loader.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Any

import torch

from ..common.messages import first_line

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".pth", ".ckpt", ".bin")
GGUF_EXT = (".gguf",)


class CheckpointError(ValueError):
    """A file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{os.path.basename(self.path)}: {reason}")


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, memory-mapped (no copy until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"truncated or corrupt safetensors file ({exc})") from None


def read_pickle(path: str) -> Any:
    """A .pt/.pth object through ``torch.load(weights_only=True)``; code-running pickles are refused."""
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:  # a legacy torch file is a pickle, which starts with the protocol byte 0x80
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise CheckpointError(path, "truncated or corrupt file (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "unsupported operand" in text.lower():  # a byte that is no pickle opcode: damage, not code
            raise CheckpointError(path, "truncated or corrupt file (not a readable pickle)") from None
        if "weights only load failed" in text.lower():
            # torch names the blocked global on one of its lines ("... GLOBAL posix.system ...").
            what = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                path,
                "refused: its pickle would import or call code on load, and only plain tensors "
                f"are accepted (nothing of it was run). {what}".rstrip()) from None
        raise CheckpointError(path, f"truncated or corrupt file ({first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"truncated or corrupt file ({first_line(exc)})") from None


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def read_tensor_file(path: str) -> Any:
    """Read a .safetensors (dict of tensors), a .pt/.pth (tensors in plain containers) or a ComfyUI-GGUF .gguf.
    A Git LFS pointer (the few lines a clone without ``git lfs pull`` leaves) is named as such."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "the file is empty")
    if os.path.getsize(path) < 1024:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise CheckpointError(path, "this is a Git LFS pointer, not the weights: run `git lfs pull` in the "
                                            "repository it came from, or download the file itself")
    lower = str(path).lower()
    if lower.endswith(SAFETENSORS_EXT):
        return read_safetensors(path)
    if lower.endswith(PICKLE_EXT):
        return read_pickle(path)
    if lower.endswith(GGUF_EXT):
        from .gguf_file import read_gguf

        try:
            return read_gguf(path)
        except ValueError as exc:
            raise CheckpointError(path, str(exc)) from None
    raise CheckpointError(
        path, f"unknown file type; expected one of {', '.join(SAFETENSORS_EXT + PICKLE_EXT + GGUF_EXT)}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write tensors (made contiguous, on the CPU) to a .safetensors file, creating its folder."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def read_weights(path: str) -> tuple[Any, str, dict]:
    """A weights file or a diffusers-style folder -> (raw object, kind "file" / "folder", folder config).

    A folder holds (sharded) ``diffusion_pytorch_model*.safetensors`` (with an ``*.index.json`` when
    sharded) and optionally ``config.json``, as diffusers' ``save_pretrained`` writes it, or transformers'
    ``model*.safetensors`` (a diffusers repository's ``text_encoder/``); its tensors come back merged into
    one dict. Raises :class:`CheckpointError` naming the file or folder.
    """
    if not os.path.isdir(path):
        return read_tensor_file(path), "file", {}
    names = sorted(os.listdir(path))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    files: list[str] = []
    if index:
        try:
            with open(os.path.join(path, index[0]), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(path, f"unreadable shard index {index[0]} ({exc})") from None
    for stem in ("diffusion_pytorch_model", "model"):
        files = files or [n for n in names if n.startswith(stem) and n.endswith(SAFETENSORS_EXT)]
    if not files:
        raise CheckpointError(path, "this folder holds no diffusion_pytorch_model*.safetensors or model*.safetensors "
                                    "(a diffusers or transformers folder of weights)")
    merged: dict[str, torch.Tensor] = {}
    for n in files:
        merged.update(read_tensor_file(os.path.join(path, n)))
    config = {}
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = {}
    return merged, "folder", config if isinstance(config, dict) else {}


# ---- what a file is --------------------------------------------------------------------------

def looks_like(keys: list[str], tensors: Any = None) -> str | None:
    """What a file looks like, from its tensor names, for the message of a loader it does not fit
    (DiT, VAE or text encoder): a noun phrase such as "a Wan DiT (the video model)"; None when
    nothing is recognisable. ``tensors`` (optional, name -> tensor) lets shapes name the variants that
    share their names: LightVAE, VAEs and tiny decoders of other latent spaces. (LightTAE and taew2_1 share
    shapes too: see :func:`weights.vae_names.tiny_kind`.)"""
    ks = set(keys)

    def has(*parts: str) -> bool:
        return any(any(p in k for p in parts) for k in keys)

    if has("lora_A", "lora_B", "lora_down", "lora_up"):
        return "a LoRA (low-rank deltas), not base weights; pass it as the LoRA of a base checkpoint"
    if has("input_blocks.", "output_blocks."):
        return "a Stable Diffusion / SDXL UNet (input_blocks / down_blocks)"
    if has("patch_embedding.") and has(".self_attn.q.", ".attn1.to_q."):
        return "a Wan DiT (the video model)"
    vae = _vae_kind(keys, tensors)
    if vae:
        return vae
    if has("down_blocks.") and has(".resnets.") and has("attentions."):
        return "a Stable Diffusion / SDXL UNet (input_blocks / down_blocks)"
    if has("double_blocks.", "single_blocks.", "single_transformer_blocks."):
        return "a Flux-style DiT (double_blocks / single_blocks: Flux, HunyuanVideo and kin)"
    if has("joint_blocks."):
        return "an SD3 MMDiT (joint_blocks)"
    if "shared.weight" in ks or has("encoder.block.", "decoder.block."):
        return "a T5 / umt5 text encoder (encoder.block.*, shared.weight)"
    if has("token_embedding.weight") and has("ffn.gate.0.weight"):
        return "the Wan umt5 text encoder (token_embedding, blocks.N.ffn.gate)"
    if has("text_model.encoder.layers.", "transformer.resblocks."):
        return "a CLIP text encoder"
    if has("vision_model.", "visual.transformer.", "visual.blocks."):
        return "an image encoder (CLIP vision)"
    if has("model.layers.") and has("embed_tokens"):
        return "a language model (model.layers.*, embed_tokens)"
    vae_keys = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in keys]
    if any(k.startswith(("encoder.", "decoder.")) and "conv" in k for k in vae_keys):
        return "a VAE (encoder.* / decoder.* convolutions)"
    if has("transformer_blocks."):
        return "a DiT of another family (transformer_blocks.*)"
    return None


def _vae_kind(keys: list[str], tensors: Any = None) -> str | None:
    """Which VAE these names are, whatever their prefix, for :func:`looks_like` (None: none that it knows);
    with ``tensors``, the shapes of a few of them too."""
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    def shape_of(suffix: str) -> tuple[int, ...] | None:  # of the key ending in suffix, when tensors are given
        key = next((k for k in keys if k.endswith(suffix)), None)
        shape = getattr(tensors.get(key), "shape", None) if key is not None and hasattr(tensors, "get") else None
        return tuple(shape) if shape is not None else None

    if has("decoder.middle.0.residual.", "encoder.middle.0.residual."):
        conv1 = shape_of("decoder.conv1.weight") or ()  # [4 * base width, latent channels, 3, 3, 3]
        if conv1[1:2] == (48,) or has("decoder.upsamples.0.upsamples.0."):  # nested up levels: Wan2.2 vae2_2.py:455
            return "a VAE: the Wan2.2 video VAE (48 latent channels, Wan layout)"
        if len(conv1) == 5 and conv1[1] != 16:
            return f"a VAE: a video VAE of {conv1[1]} latent channels (Wan2.2's has 48), Wan layout"
        if conv1[:1] == (96,):  # 4 x 24, 24 = 96 x (1 - 0.75): lightx2v's pruning (lightx2v wan/vae.py:398, 912)
            return "a VAE: LightVAE (lightvaew2_1, the Wan2.1 video VAE with a quarter of its widths)"
        return "a VAE: the full Wan2.1 video VAE (Wan / ComfyUI layout)"
    if has("decoder.mid_block.") and has("norm1.gamma", "norm_out.gamma"):  # RMS norms: not an image VAE
        if (shape_of("decoder.conv_in.weight") or ())[1:2] == (48,) or has("decoder.up_blocks.0.upsampler."):
            return "a VAE: the Wan2.2 video VAE (48 latent channels) in the diffusers layout (AutoencoderKLWan)"
        return "a VAE: the full Wan2.1 video VAE in the diffusers layout (AutoencoderKLWan)"
    if has("decoder.22.weight"):
        first = shape_of("decoder.1.weight") or ()  # [c0, latent channels, 3, 3]
        if not first and has("decoder.0.weight"):  # a 1x1 conv first: madebyollin/taehv taehv.py:217-225
            return "a VAE: a TAEHV \"super\" tiny decoder (taew2_2_super / taehv1_5_super)"
        if first[1:2] == (48,):
            return ("a VAE: the tiny taew2_2 preview decoder of Wan2.2's 48-channel latents (or lighttaew2_2: the same "
                    "names and shapes)")
        other = {32: "taehv1_5 / lighttaehy1_5, HunyuanVideo 1.5's"}
        if len(first) == 4 and first[1] != 16:
            what = other.get(first[1], "TAEHV layout")
            return f"a VAE: a tiny decoder of {first[1]}-channel latents ({what}), not of Wan2.1's 16"
        return ("a VAE: the tiny taew2_1 / TAEHV preview decoder (or LightTAE, lighttaew2_1: the same names "
                "and shapes)")
    if has("decoder.conv_in.", "decoder.mid.block_1.", "decoder.mid_block.", "encoder.conv_in."):
        return "a VAE: an image VAE (Stable Diffusion / Flux style), not the Wan2.1 video VAE"
    return None
