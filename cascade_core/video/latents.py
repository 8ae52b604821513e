"""The Wan2.1 latent space: 16 channels, a latent frame per 4 video frames after the first, 8x8 pixels
per latent pixel, and the per-channel normalisation between the VAE's raw latents (what ComfyUI's
``LATENT`` holds) and the normalised latents the DiT works in (the released VAE's mean and std).

A :class:`LatentSpace` holds those constants of one VAE; :data:`WAN21_LATENTS` is the Wan2.1 VAE's, the
Wan2.2 VAE's is :data:`cascade_core.video.vae22.WAN22_LATENTS`. Each decoder names its space
(``LatentVideoDecoder.latent_space``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.constants import FRAMES_PER_LATENT, LATENT_CHANNELS, PIXELS_PER_LATENT
from ..common.transfer import to_device

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class LatentSpace:
    """What a VAE's latents are: ``channels`` per latent pixel, normalised latents z = (raw - mean) / std per
    channel, a latent frame per ``temporal`` video frames after the video's first (which has one latent frame of
    its own), a latent pixel per ``spatial`` x ``spatial`` video pixels. ``name`` ("Wan2.1") is for messages."""

    name: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temporal: int = FRAMES_PER_LATENT
    spatial: int = PIXELS_PER_LATENT

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


WAN21_LATENTS = LatentSpace("Wan2.1", LATENT_CHANNELS, LATENT_MEAN, LATENT_STD)


# ---- latent normalisation ----------------------------------------------------------------------

def check_latents(z: torch.Tensor) -> None:
    """ValueError unless ``z`` is latents [B, 16, T, h, w]."""
    WAN21_LATENTS.check(z)


def _per_channel(values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    # uploaded without blocking: on the VAE's stream a blocking copy would wait for the DiT's tick
    return to_device(torch.tensor(values, dtype=torch.float32), z.device).view(1, -1, 1, 1, 1)


def normalized_to_raw(z: torch.Tensor) -> torch.Tensor:
    """DiT-space latents -> the VAE's raw latents, ``z * std + mean`` per channel (z: [B,16,T,h,w]).

    Computed in float32, returned in z's dtype.
    """
    return WAN21_LATENTS.to_raw(z)


def raw_to_normalized(z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents (ComfyUI's ``LATENT``) -> DiT-space latents; inverse of :func:`normalized_to_raw`."""
    return WAN21_LATENTS.to_normalized(z)
