"""The Wan VAEs' weight names: the diffusers names of the decoder (``AutoencoderKLWan``) mapped to
the original ones (Wan2.1's, and with ``residual_up`` Wan2.2's), where each layout's encoder half starts, and
finding and checking a VAE's tensors in a state dict (:func:`component_weights`, :func:`check_weight_names`).

The diffusers layout (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae/diffusion_pytorch_model.safetensors``)
holds the same tensors, with the same shapes, as the released ``Wan2.1_VAE.pth``; only the names
differ. For the decoder half (``decoder.*`` and the post-quant convolution):

    post_quant_conv                       -> conv2
    decoder.conv_in / norm_out / conv_out -> decoder.conv1 / head.0 / head.2
    decoder.mid_block.resnets.0, attentions.0, resnets.1 -> decoder.middle.0, 1, 2
    decoder.up_blocks.i.resnets.j         -> decoder.upsamples.(4i + j)      (j = 0, 1, 2)
    decoder.up_blocks.i.upsamplers.0      -> decoder.upsamples.(4i + 3)
    inside a residual block: norm1, conv1, norm2, conv2, conv_shortcut -> residual.0, 2, 3, 6, shortcut

The Wan2.2 VAE (``Wan2.2_VAE.pth``; ``Wan-AI/Wan2.2-TI2V-5B-Diffusers/vae``, ``is_residual``) nests its up levels
(``Up_ResidualBlock``, Wan2.2 ``wan/modules/vae2_2.py:455-497``; diffusers ``WanResidualUpBlock``), the rest as above:

    decoder.up_blocks.i.resnets.j         -> decoder.upsamples.i.upsamples.j   (j = 0, 1, 2)
    decoder.up_blocks.i.upsampler         -> decoder.upsamples.i.upsamples.3
"""
from __future__ import annotations

import os
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
_RESIDUAL_UP_KEY = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsampler)\.(.+)")  # Wan2.2


def _inside(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESIDUAL.get(layer, layer)}.{tail}"


def original_name(name: str, residual_up: bool = False) -> str:
    """The original (Wan / ComfyUI) name of a diffusers decoder parameter, of the Wan2.2 layout with
    ``residual_up``; an unknown name comes back as it is (the loader then reports it as unexpected)."""
    layer, _, leaf = name.rpartition(".")
    if layer in _TOP:
        return f"{_TOP[layer]}.{leaf}"
    m = _MIDDLE_KEY.fullmatch(name)
    if m and m.group(1) in _MIDDLE:
        return f"decoder.middle.{_MIDDLE[m.group(1)]}.{_inside(m.group(2))}"
    m = (_RESIDUAL_UP_KEY if residual_up else _UP_KEY).fullmatch(name)
    if m:
        within = int(m.group(2)) if m.group(2) is not None else _PER_LEVEL - 1
        if residual_up:
            return f"decoder.upsamples.{m.group(1)}.upsamples.{within}.{_inside(m.group(3))}"
        return f"decoder.upsamples.{_PER_LEVEL * int(m.group(1)) + within}.{_inside(m.group(3))}"
    return name


def from_diffusers(weights: dict[str, torch.Tensor], residual_up: bool = False) -> dict[str, torch.Tensor]:
    """Decoder weights with diffusers names -> the same tensors under the original names (of the Wan2.2
    layout with ``residual_up``)."""
    return {original_name(k, residual_up): v for k, v in weights.items()}


# ---- the Wan2.2 VAE's encoder half: original names -> diffusers' ---------------------------------------------
# Why a map of our own: diffusers' single-file converter (``convert_wan_vae_to_diffusers``,
# loaders/single_file_utils.py of diffusers 0.42) knows Wan2.1's flat encoder list only. Wan2.2 nests each down level
# (``Down_ResidualBlock``, Wan2.2 ``wan/modules/vae2_2.py:415-453``: ``encoder.downsamples.i.downsamples.j``, j < 2
# residual blocks, j = 2 the Resample) where diffusers' ``WanResidualDownBlock`` has ``down_blocks.i.resnets.j`` and
# ``down_blocks.i.downsampler``; the rest is renamed as for Wan2.1 (diffusers' scripts/convert_wan_to_diffusers.py,
# ``convert_vae_22``, renames the released file the same way):
#     conv1 -> quant_conv; encoder.conv1 / head.0 / head.2 -> encoder.conv_in / norm_out / conv_out
#     encoder.middle.0, 1, 2 -> encoder.mid_block.resnets.0, attentions.0, resnets.1
#     encoder.downsamples.i.downsamples.j (residual, shortcut) -> encoder.down_blocks.i.resnets.j
#     encoder.downsamples.i.downsamples.j (resample, time_conv) -> encoder.down_blocks.i.downsampler
#     inside a residual block: residual.0, 2, 3, 6, shortcut -> norm1, conv1, norm2, conv2, conv_shortcut
_ENCODER_TOP = {"conv1": "quant_conv", "encoder.conv1": "encoder.conv_in", "encoder.head.0": "encoder.norm_out",
                "encoder.head.2": "encoder.conv_out"}
_ENCODER_MIDDLE_KEY = re.compile(r"encoder\.middle\.([012])\.(.+)")
_DOWN_KEY = re.compile(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)")
_RESAMPLE = ("resample.", "time_conv.")  # a down level's Resample (vae2_2.py:71-140)


def _inside_diffusers(rest: str) -> str:
    for diffusers, original in _RESIDUAL.items():
        if rest.startswith(original + "."):
            return diffusers + rest[len(original):]
    return rest  # an attention block's norm, to_qkv, proj: the same names


def wan22_encoder_name(name: str) -> str:
    """diffusers' name (``AutoencoderKLWan`` with ``is_residual``) of a parameter of the Wan2.2 VAE's encoder half
    (``encoder.*`` and the quant convolution ``conv1.*``) under its original name (``Wan2.2_VAE.pth``, ComfyUI's
    ``wan2.2_vae.safetensors``); see the table above. Any other name comes back as it is (the loader then reports it
    as unexpected)."""
    layer, _, leaf = name.rpartition(".")
    if layer in _ENCODER_TOP:
        return f"{_ENCODER_TOP[layer]}.{leaf}"
    m = _ENCODER_MIDDLE_KEY.fullmatch(name)
    if m:
        within = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[m.group(1)]
        return f"encoder.mid_block.{within}.{_inside_diffusers(m.group(2))}"
    m = _DOWN_KEY.fullmatch(name)
    if m:
        level, index, rest = m.groups()
        if rest.startswith(_RESAMPLE):
            return f"encoder.down_blocks.{level}.downsampler.{rest}"
        return f"encoder.down_blocks.{level}.resnets.{index}.{_inside_diffusers(rest)}"
    return name


# ---- finding and checking a VAE's weights in a state dict -----------------------------------

def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """What a state dict that is not the wanted decoder looks like (see :func:`weights.safe_io.looks_like`,
    given the tensors too: their shapes name LightVAE and the VAEs of other latent spaces)."""
    return looks_like(list(sd), sd) or f"none of the known files; its keys are unlike a VAE's: {_few(list(sd))}"


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


# ---- which decoder of Wan latents a file holds --------------------------------------------------

DECODER_KINDS = {  # kind -> what it is, for messages (a short name, then what it is in brackets)
    "wan2.1_vae": "the Wan2.1 VAE",
    "lightvaew2_1": "LightVAE (lightvaew2_1: the Wan2.1 VAE with a quarter of its widths)",
    "taew2_1": "taew2_1 (the TAEHV tiny decoder; reads normalised latents)",
    "lighttaew2_1": "LightTAE (lighttaew2_1: the TAEHV tiny decoder, lightx2v's weights; reads raw latents)",
    "wan2.2_vae": "the Wan2.2 VAE (48 latent channels, 16 x 16 pixels a latent pixel)",
    "taew2_2": "taew2_2 (the TAEHV tiny decoder of Wan2.2's 48-channel latents; reads normalised latents)",
    "lighttaew2_2": "lighttaew2_2 (LightTAE of Wan2.2's 48-channel latents, lightx2v's weights; reads raw latents)",
}
WAN22_CHANNELS = 48  # latent channels of the Wan2.2 VAE (Wan2.2 wan/modules/vae2_2.py:892), which tell its files
LIGHTVAE_DIM = 24  # lightvaew2_1's base width: 96 x (1 - 0.75), lightx2v wan/vae.py:398 and 911-912
TINY_ANCHOR = "decoder.22.weight"  # the TAEHV decoder's last convolution; no Wan2.1 VAE key ends so


def tiny_kind(weights: Mapping[str, torch.Tensor], name: str = "") -> str:
    """Which tiny decoder of Wan latents a TAEHV-layout state dict is: "lighttaew2_1" or "taew2_1"; for 48-channel
    latents (``decoder.1.weight`` [c0, 48, 3, 3]) "lighttaew2_2" when the file name has "lighttae", else "taew2_2".

    The two released files hold the same tensor names and shapes (lightx2v loads both strictly into one
    class, ``lightx2v/models/video_encoders/hf/tae.py:162-245``); only the input scale differs. So: a
    file name with "lighttae" is LightTAE, one with "taew" or "taehv" taew2_1; otherwise the stored
    dtype decides, as ComfyUI's ``comfy/sd.py`` does: float32 is LightTAE (lightx2v ships float32),
    anything else taew2_1 (madebyollin ships float16). For Wan2.2 the name alone decides: ComfyUI's
    ``comfy/sd.py`` treats every 48-channel TAEHV file alike, and the released dtypes are not known here.
    """
    base = os.path.basename(str(name)).lower()
    first = next((v for k, v in weights.items() if k.endswith("decoder.1.weight")), None)
    if first is None:  # a TAEHV "super" decoder starts with a 1x1 conv, decoder.0 (taehv.py:217-225)
        first = next((v for k, v in weights.items() if k.endswith("decoder.0.weight")), None)
    if first is not None and first.dim() == 4 and first.shape[1] == WAN22_CHANNELS:
        return "lighttaew2_2" if "lighttae" in base else "taew2_2"
    if "lighttae" in base:
        return "lighttaew2_1"
    if "taew" in base or "taehv" in base:
        return "taew2_1"
    return "lighttaew2_1" if first is not None and first.dtype == torch.float32 else "taew2_1"


def decoder_kind(sd: Any, name: str = "") -> str | None:
    """Which decoder of Wan latents the state dict ``sd`` (of the file ``name``) holds: a key of
    :data:`DECODER_KINDS`, or None when it holds none of them (look at :func:`describe` then).

    By names and shapes: a TAEHV layout (a key ending in ``decoder.22.weight``) is a tiny decoder
    (which one: :func:`tiny_kind`); the Wan VAE layout (``decoder.conv1.weight``, or the diffusers
    ``decoder.conv_in.weight``, 5-D) is the Wan2.2 VAE when it reads :data:`WAN22_CHANNELS` latent channels
    (``conv1``'s input channels), else LightVAE when its base width, ``conv1``'s output channels / 4,
    is :data:`LIGHTVAE_DIM`, else the Wan2.1 VAE. Shapes beyond these (latent channels, every other
    key) are checked by the decoder classes, whose messages name what is wrong. Raises
    :class:`CheckpointError` if ``sd`` is not a dictionary of tensors.
    """
    tiny = component_weights(sd, TINY_ANCHOR, ("decoder.",), name)
    if tiny is not None:
        return tiny_kind(tiny, name)
    for anchor in ("decoder.conv1.weight", DIFFUSERS_ANCHOR):
        weights = component_weights(sd, anchor, ("decoder.",), name)
        if weights is not None and weights[anchor].dim() == 5:
            if weights[anchor].shape[1] == WAN22_CHANNELS:
                return "wan2.2_vae"
            return "lightvaew2_1" if weights[anchor].shape[0] == 4 * LIGHTVAE_DIM else "wan2.1_vae"
    return None
