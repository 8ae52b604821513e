"""The Wan2.1 VAE's weight names: the diffusers names of the decoder (``AutoencoderKLWan``) mapped to
the original ones, where each layout's encoder half starts, and finding and checking a VAE's
tensors in a state dict (:func:`component_weights`, :func:`check_weight_names`).

The diffusers layout (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors``)
holds the same tensors, with the same shapes, as the released ``Wan2.1_VAE.pth``; only the names
differ. For the decoder half (``decoder.*`` and the post-quant convolution):

    post_quant_conv                       -> conv2
    decoder.conv_in / norm_out / conv_out -> decoder.conv1 / head.0 / head.2
    decoder.mid_block.resnets.0, attentions.0, resnets.1 -> decoder.middle.0, 1, 2
    decoder.up_blocks.i.resnets.j         -> decoder.upsamples.(4i + j)      (j = 0, 1, 2)
    decoder.up_blocks.i.upsamplers.0      -> decoder.upsamples.(4i + 3)
    inside a residual block: norm1, conv1, norm2, conv2, conv_shortcut -> residual.0, 2, 3, 6, shortcut
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .safe_io import CheckpointError, looks_like

DIFFUSERS_ANCHOR = "decoder.conv_in.weight"  # [4*dim, 16, 3, 3, 3]; an image VAE's is 2-D
DIFFUSERS_PARTS = ("decoder.", "post_quant_conv.")
# The encoder half, in both layouts (read whole by diffusers' AutoencoderKLWan, see :mod:`video.vae_encode`).
ENCODER_ANCHOR, ENCODER_PARTS = "encoder.conv1.weight", ("encoder.", "conv1.")  # [dim, 3, 3, 3, 3]
DIFFUSERS_ENCODER_ANCHOR, DIFFUSERS_ENCODER_PARTS = "encoder.conv_in.weight", ("encoder.", "quant_conv.")

_TOP = {"post_quant_conv": "conv2", "decoder.conv_in": "decoder.conv1", "decoder.norm_out": "decoder.head.0",
        "decoder.conv_out": "decoder.head.2"}
_MIDDLE = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_PER_LEVEL = 4  # layers of one up level: three residual blocks and the upsampler
_MIDDLE_KEY = re.compile(r"decoder\.mid_block\.(resnets\.\d+|attentions\.\d+)\.(.+)")
_UP_KEY = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)")


def _inside(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESIDUAL.get(layer, layer)}.{tail}"


def original_name(name: str) -> str:
    """The original (Wan / ComfyUI) name of a diffusers decoder parameter; an unknown name comes back as
    it is (the loader then reports it as unexpected)."""
    layer, _, leaf = name.rpartition(".")
    if layer in _TOP:
        return f"{_TOP[layer]}.{leaf}"
    m = _MIDDLE_KEY.fullmatch(name)
    if m and m.group(1) in _MIDDLE:
        return f"decoder.middle.{_MIDDLE[m.group(1)]}.{_inside(m.group(2))}"
    m = _UP_KEY.fullmatch(name)
    if m:
        index = _PER_LEVEL * int(m.group(1)) + (int(m.group(2)) if m.group(2) is not None else _PER_LEVEL - 1)
        return f"decoder.upsamples.{index}.{_inside(m.group(3))}"
    return name


def from_diffusers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decoder weights with diffusers names -> the same tensors under the original names."""
    return {original_name(k): v for k, v in weights.items()}


# ---- finding and checking a VAE's weights in a state dict -----------------------------------

def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """What a state dict that is not the wanted decoder looks like (see :func:`weights.safe_io.looks_like`)."""
    return looks_like(list(sd)) or f"none of the known files; its keys are unlike a VAE's: {_few(list(sd))}"


def component_weights(sd: Any, anchor: str, parts: tuple[str, ...], source: str) -> dict[str, torch.Tensor] | None:
    """The tensors of ``sd`` whose names, after the prefix found in front of ``anchor``, start with one of
    ``parts`` (prefix removed); None when no key ends with ``anchor``.

    Raises :class:`CheckpointError` if ``sd`` is not a dictionary of tensors.
    """
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(source, "not a dictionary of tensors (a state dict)")
    prefixes = [k[:-len(anchor)] for k in sd if isinstance(k, str) and k.endswith(anchor)]
    if not prefixes:
        return None
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):].startswith(parts)}


def check_weight_names(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str,
                       what: str) -> None:
    """Raise :class:`CheckpointError` listing the first missing, unexpected or mis-shaped keys."""
    problems = []
    missing = [k for k in expected if k not in given]
    if missing:
        problems.append(f"missing {what} keys: {_few(missing)}")
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        problems.append(f"unexpected {what} keys: {_few(unexpected)}")
    wrong = [f"{k} {tuple(given[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong, 3)}")
    if problems:
        raise CheckpointError(source, "; ".join(problems))
