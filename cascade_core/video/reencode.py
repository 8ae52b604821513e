"""The first context frame of a KV recompute (Krea Realtime, :mod:`sampling.recompute`) from the Wan2.1 VAE.

Guarantees: :class:`ContextReencoder` is a :data:`sampling.recompute.ContextImage`: for the latents of frames
0..j of one video it returns the normalised latent [1, 16, 1, h, w] of frame j's last video frame,
decoded by the streaming decoder (:mod:`video.decode_stream`: the frames of one decode of the whole video,
clamped to [-1, 1], under the decoder's window rule :attr:`video.vae.WanVAEDecoder.time_cache`) and encoded
alone, as an image, by the VAE encoder it is given (diffusers' through :func:`video.vae_encode.encode` in
:meth:`ContextReencoder.from_state_dict`; ComfyUI's own VAE in the nodes). This is krea-ai/realtime-video's
``get_clean_context_frames`` (``release_server.py:563-576``): the frame it re-encodes is one its server
decoded for the output video (``release_server.py:719-721``) with its own decoder
(``demo_utils/vae_block3.py``, loaded at ``release_server.py:190-225``), which clamps too (226) and whose
window rule is "krea", so family krea-realtime decodes under it. Each latent frame is decoded once, as the
calls reach it.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from ..weights.safe_io import read_weights
from .decode_stream import LatentVideoDecoder
from .vae import WanVAEDecoder
from .vae_encode import encode, encoder_from_state_dict


class ContextReencoder:
    """Decode-then-encode of a video's latest given frame; ``decoder`` a Wan2.1 :class:`LatentVideoDecoder`,
    ``encode`` the Wan2.1 VAE encoder of one frame: [1, 3, 1, H, W] on the [-1, 1] scale -> normalised
    latents [1, 16, 1, H/8, W/8]. Calls must give growing runs of one video's latents [1, 16, j + 1, h, w]
    (the frames already decoded unchanged), or their tail from a frame not yet decoded on; ValueError
    otherwise."""

    def __init__(self, decoder: LatentVideoDecoder, encode: Callable[[torch.Tensor], torch.Tensor]):
        self.decoder = decoder  # its weights may serve other streams too (the video's frames)
        self.stream = decoder.stream(frames_per_pass=1)
        self.encode = encode
        self.decoded = 0  # latent frames of this video decoded so far
        self.last: torch.Tensor | None = None  # [1, 3, 1, H, W]: the last video frame decoded

    @classmethod
    def from_state_dict(cls, sd, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        source: str = "state dict", time_cache: str = "wan") -> "ContextReencoder":
        """Decoder and encoder of the complete Wan2.1 VAE in ``sd`` (any layout :mod:`video.vae_encode` reads),
        ``dtype`` on ``device``; the decoder's window rule ``time_cache`` (:attr:`WanVAEDecoder.time_cache`:
        "krea" for family krea-realtime, as Krea's server decodes). Raises :class:`CheckpointError` naming
        ``source`` when ``sd`` is no such VAE."""
        encoder = encoder_from_state_dict(sd, dtype=dtype, device=device, source=source)
        decoder = WanVAEDecoder.from_state_dict(sd, dtype=dtype, device=device, source=source)
        decoder.time_cache = time_cache
        return cls(decoder, functools.partial(encode, encoder))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", time_cache: str = "wan") -> "ContextReencoder":
        """:meth:`from_state_dict` of a VAE file or diffusers folder (:func:`weights.safe_io.read_weights`)."""
        path = os.fspath(path)
        return cls.from_state_dict(read_weights(path)[0], dtype=dtype, device=device, source=path,
                                   time_cache=time_cache)

    def __call__(self, latents: torch.Tensor, first: int = 0) -> torch.Tensor:
        """[1, 16, n, h, w] normalised latents of frames first..j (``first`` at most the number of frames
        decoded so far) -> [1, 16, 1, h, w] normalised latents (as ``encode`` gives them)."""
        end = first + latents.shape[2]
        if end < max(self.decoded, 1) or first > self.decoded:
            raise ValueError(f"the context re-encoder has decoded {self.decoded} latent frames of this video; "
                             f"it was given frames {first}..{end - 1}")
        if end > self.decoded:
            self.last = self.stream.decode(latents[:, :, self.decoded - first:])[:, :, -1:]
            self.decoded = end
        return self.encode(self.last)
