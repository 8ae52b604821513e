"""The Wan2.1 latent space: 16 channels, a latent frame per 4 video frames after the first, 8x8 pixels
per latent pixel, and the per-channel normalisation between the VAE's raw latents (what ComfyUI's
``LATENT`` holds) and the normalised latents the DiT works in (the released VAE's mean and std).

A :class:`LatentSpace` holds those constants of one VAE; :data:`WAN21_LATENTS` is the Wan2.1 VAE's, the
Wan2.2 VAE's is :data:`cascade_core.video.vae22.WAN22_LATENTS`; both are defined in
:mod:`cascade_core.common.latent_space` and re-exported. Each decoder names its space
(``LatentVideoDecoder.latent_space``).
"""
from __future__ import annotations

import torch

# LatentSpace, WAN21_LATENTS and the Wan2.1 tables live in common.latent_space (sampling plans with them);
# re-exported here, where the video side has always imported them
from ..common.latent_space import LATENT_MEAN, LATENT_STD, WAN21_LATENTS, LatentSpace

__all__ = ["LATENT_MEAN", "LATENT_STD", "WAN21_LATENTS", "LatentSpace", "check_latents", "normalized_to_raw",
           "raw_to_normalized"]


# ---- latent normalisation ----------------------------------------------------------------------

def check_latents(z: torch.Tensor) -> None:
    """ValueError unless ``z`` is latents [B, 16, T, h, w]."""
    WAN21_LATENTS.check(z)


def normalized_to_raw(z: torch.Tensor) -> torch.Tensor:
    """DiT-space latents -> the VAE's raw latents, ``z * std + mean`` per channel (z: [B,16,T,h,w]).

    Computed in float32, returned in z's dtype.
    """
    return WAN21_LATENTS.to_raw(z)


def raw_to_normalized(z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents (ComfyUI's ``LATENT``) -> DiT-space latents; inverse of :func:`normalized_to_raw`."""
    return WAN21_LATENTS.to_normalized(z)
