"""The latent spaces of the VAEs the engine's models work in, and the rules every part of a run derives from one.

A :class:`LatentSpace` holds the constants of one VAE's latents: channels, the per-channel normalisation between
the VAE's raw latents (what ComfyUI's ``LATENT`` holds) and the normalised latents a DiT works in, and the
compression (video frames and pixels a latent frame and a latent pixel stand for). :data:`WAN21_LATENTS` is the
Wan2.1 VAE's (16 channels, 8 x 8 pixels, 4 frames), :data:`WAN22_LATENTS` the Wan2.2 VAE's (48 channels,
16 x 16 pixels, 4 frames). A model knows its space (``WanConfig.latent_space``, :func:`latent_space_of`), a
decoder names its own (``LatentVideoDecoder.latent_space``), and a run's plan carries the model's
(``RunPlan.latent_space``): the noise, the prefix, the latent window, the memory estimate and the pool's buffers
take their shapes from it. :func:`check_decoder_space` is the one refusal of a decoder of another space.

Sources: Wan2.1 ``wan/modules/vae.py`` (mean/std of the 16 channels, ``vae_stride`` (4, 8, 8) in
``wan/configs/shared_config.py``); Wan2.2 (Wan-Video/Wan2.2@42bf4cf) ``wan/modules/vae2_2.py:904-1011``
(mean and std of the 48 channels; diffusers' ``latents_mean`` / ``latents_std`` of
Wan-AI/Wan2.2-TI2V-5B-Diffusers ``vae/config.json`` hold the same values) and ``wan/configs/wan_ti2v_5B.py``
(``vae_stride`` (4, 16, 16)). ``fps``, the frame rate the space's models' videos play at: 16, Wan2.1
``wan/configs/shared_config.py`` ``sample_fps`` (every Wan2.1 model; also the causal Wan2.2-A14B, whose experts
work in Wan2.1 latents: FastVideo's preset for it writes 16 fps, docs/references/causal_wan22_a14b.md); 24, Wan2.2
``wan/configs/wan_ti2v_5B.py`` ``sample_fps`` (TI2V-5B, the Wan2.2 VAE's model; LongLive 2.0's ``utils/config.py``
fixes the same 24).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .constants import FRAMES_PER_LATENT, LATENT_CHANNELS, PIXELS_PER_LATENT
from .transfer import to_device

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class LatentSpace:
    """What a VAE's latents are: ``channels`` per latent pixel, normalised latents z = (raw - mean) / std per
    channel, a latent frame per ``temporal`` video frames after the video's first (which has one latent frame of
    its own), a latent pixel per ``spatial`` x ``spatial`` video pixels; ``fps``: frames per second the videos of
    this space's models play at (every MP4, recording and stream of a run is written at it). ``name`` ("Wan2.1") is
    for messages."""

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temporal: int = FRAMES_PER_LATENT
    spatial: int = PIXELS_PER_LATENT
    fps: int = 16

    def words(self) -> str:
        """"Wan2.1 latents (16 channels, 8x smaller)": the space in messages."""
        return f"{self.name} latents ({self.channels} channels, {self.spatial}x smaller)"

    def check(self, z: torch.Tensor) -> None:
        """ValueError unless ``z`` is latents [B, channels, T, h, w]."""
        if z.dim() != 5 or z.shape[1] != self.channels:
            raise ValueError(f"expected {self.name} latents [B, {self.channels}, T, h, w], got {tuple(z.shape)}")

    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised (DiT-space) latents [B, C, T, h, w] -> the VAE's raw latents ``z * std + mean`` per channel,
        computed in float32, returned in z's dtype."""
        self.check(z)
        return (z.float() * _per_channel(self.std, z) + _per_channel(self.mean, z)).to(z.dtype)

    def to_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents -> normalised ones; the inverse of :meth:`to_raw`."""
        self.check(z)
        return ((z.float() - _per_channel(self.mean, z)) / _per_channel(self.std, z)).to(z.dtype)

    def size_multiple(self, patch: Sequence[int] = (1, 2, 2)) -> int:
        """The pixels a video's width and height must be multiples of for a DiT of ``patch`` (t, h, w) in this
        space: ``spatial`` x the patch's larger side (Wan2.1: 16 px, Wan2.2: 32 px)."""
        return self.spatial * max(patch[1], patch[2])

    def latent_size(self, width: int, height: int, patch: Sequence[int] = (1, 2, 2)) -> tuple[int, int]:
        """Latent (h, w) of a ``width`` x ``height`` pixel video: height // spatial, width // spatial. Raises
        ValueError unless both are positive multiples of :meth:`size_multiple`."""
        mult = self.size_multiple(patch)
        for name, v in (("width", width), ("height", height)):
            if v < mult or v % mult:
                raise ValueError(f"{name} must be a positive multiple of {mult}, got {v}"
                                 + ("" if self.spatial == PIXELS_PER_LATENT else
                                    f" ({self.spatial} pixels a latent pixel x the patch's {mult // self.spatial}, "
                                    f"{self.name} latents)"))
        return height // self.spatial, width // self.spatial


def _per_channel(values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    # uploaded without blocking: on the VAE's stream a blocking copy would wait for the DiT's tick
    return to_device(torch.tensor(values, dtype=torch.float32), z.device).view(1, -1, 1, 1, 1)


WAN21_LATENTS = LatentSpace("Wan2.1", LATENT_CHANNELS, LATENT_MEAN, LATENT_STD, fps=16)  # sample_fps: shared_config.py
# Wan2.2 wan/modules/vae2_2.py:904-957 (mean) and 958-1011 (std); the same 48 values are diffusers'
# latents_mean / latents_std in Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json.
WAN22_LATENTS = LatentSpace(
    "Wan2.2", 48,
    mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
          0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
          -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
          -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
    std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
         0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
         0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
         0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
    temporal=4, spatial=16, fps=24)  # vae_stride (4, 16, 16), sample_fps 24: Wan2.2 wan/configs/wan_ti2v_5B.py
LATENT_SPACES = (WAN21_LATENTS, WAN22_LATENTS)


def latent_space_of(channels: int, what: str = "the model") -> LatentSpace:
    """The latent space of a DiT with ``channels`` latent channels in and out: 16 -> :data:`WAN21_LATENTS`,
    48 -> :data:`WAN22_LATENTS`. Raises ValueError naming ``what`` and the channels for any other count."""
    for space in LATENT_SPACES:
        if space.channels == channels:
            return space
    known = ", ".join(f"{s.channels} ({s.name})" for s in LATENT_SPACES)
    raise ValueError(f"{what} has {channels} latent channels; the latent spaces known are {known}")


def check_decoder_space(run: LatentSpace, decoder: LatentSpace, decoder_what: str, model_what: str = "the model"
                        ) -> None:
    """The one refusal of a decoder (or VAE) of another latent space than the run's model: ValueError naming both,
    e.g. "--vae wan_2.1_vae.safetensors decodes Wan2.1 latents (16 channels, 8x smaller) but the model makes
    Wan2.2 latents (48 channels, 16x smaller): give a Wan2.2 VAE". Nothing happens when the spaces agree."""
    if decoder.name != run.name:
        raise ValueError(f"{decoder_what} decodes {decoder.words()} but {model_what} makes {run.words()}: "
                         f"give a {run.name} VAE or decoder")
