"""The Wan2.2 VAE decoder (the VAE of Wan2.2-TI2V-5B: 48 latent channels, 16 x 16 pixels and 4 frames a latent),
streaming: latent blocks decoded one after another give the frames of one decode of all of them.

Sources: Wan-Video/Wan2.2@42bf4cf ``wan/modules/vae2_2.py`` (the reference), diffusers 0.42
``models/autoencoders/autoencoder_kl_wan.py`` (``AutoencoderKLWan`` with ``is_residual``, ``patch_size=2``).

Guarantees:
- Architecture and parameter names are those of ``Wan2.2_VAE.pth`` (the post-quant convolution ``conv2.*`` and
  ``decoder.*``; ComfyUI's ``wan2.2_vae.safetensors`` keeps them); the diffusers layout
  (``Wan2.2-TI2V-5B-Diffusers/vae``) is read too, its names mapped by :mod:`weights.vae_names` (``residual_up``).
  The encoder half and a common key prefix are ignored. The base width is read from ``decoder.conv1``'s shape
  (256 released: ``vae2_2.py:739``, the encoder's 160 being another width, ``vae2_2.py:893``); anything else
  raises :class:`CheckpointError` naming the file.
- The layers are the Wan2.1 decoder's (:mod:`video.vae`: causal convolution, RMS norm, residual block,
  attention, upsample with its first-frame rule), on frames [B, T, H, W, C]; a :class:`CausalState` keeps what
  the temporal layers need, so decoding block by block equals one decode of everything (up to summation order).
- Latent frame 0 decodes to 1 frame, every later one to 4 (a first block of n latent frames: 1 + 4(n-1)
  frames, every later block 4n); frames are 16x the latent size: three 2x upsamples, then the head's 12 channels
  unpatchified 2 x 2 (``vae2_2.py:299-313``, 837).
- Inputs are normalised latents of :data:`WAN22_LATENTS` (what the DiT works on); raw = z * std + mean
  (``vae2_2.py:814-818``, ``scale = [mean, 1 / std]`` at 1012).

Decoder layout for base width d (256 released; ``Decoder3d``, ``vae2_2.py:616-670``, dims at 637)::

    z [B,48,T,h,w] -> conv2 (1x1x1, 48 -> 48) -> decoder.conv1 (3x3x3, 48 -> 4d)
    decoder.middle      : Res(4d), Attention(4d), Res(4d)
    decoder.upsamples.0 : upsamples.0-2 Res(4d), .3 Up(4d, time+space, to 4d)     + shortcut 4d -> 4d (x2 t, x2 s)
    decoder.upsamples.1 : the same
    decoder.upsamples.2 : upsamples.0 Res(4d -> 2d), 1-2 Res(2d), 3 Up(2d, space)  + shortcut 4d -> 2d (x2 s)
    decoder.upsamples.3 : upsamples.0 Res(2d -> d), 1-2 Res(d)                     (no upsample, no shortcut)
    decoder.head        : RMSNorm(d), SiLU, 3x3x3 conv d -> 12 = 3 x 2 x 2, unpatchified to 3 channels
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..common.latent_space import WAN22_LATENTS  # defined there (sampling plans with it), re-exported
from .decode_stream import CausalState, LatentVideoDecoder
from .vae import (
    AttentionBlock,
    CausalConv3d,
    Decoder3d,
    ResidualBlock,
    RMSNorm,
    Upsample,
    WanVAEDecoder,
    wan_vae_weights,
)

PATCH = 2  # the head's output is unpatchified 2 x 2 (vae2_2.py:837; diffusers patch_size=2)
RESIDUAL_BLOCKS = 3  # per up level (num_res_blocks + 1, vae2_2.py:659); the upsample, if any, is index 3


def duplicate_up(x: torch.Tensor, cout: int, time: int, space: int, first_call: bool) -> torch.Tensor:
    """The parameter-free shortcut of an up level (``DupUp3D``, ``vae2_2.py:370-412``), on frames [B, T, H, W, C].

    Each input channel is repeated r = cout * time * space^2 / C times; the repeated channels, read as
    [cout, time, space, space], fill output channel c at sub-frame a and sub-pixel (i, j). In the video's first
    call the first ``time - 1`` output frames are dropped (``first_chunk``, 410-411), as the upsample drops its
    first frame's doubling. [B, T, H, W, C] -> [B, time * T (- time + 1), space * H, space * W, cout].
    """
    b, t, h, w, c = x.shape
    repeats = cout * time * space * space // c
    y = x.repeat_interleave(repeats, dim=-1).view(b, t, h, w, cout, time, space, space)
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * time, h * space, w * space, cout)
    return y[:, time - 1:] if first_call else y


class ResidualUpBlock(nn.Module):
    """One up level (``Up_ResidualBlock``, ``vae2_2.py:455-497``): ``upsamples`` = three residual blocks (the
    first cin -> cout) and, with ``up`` ("time": frames and pixels, "space": pixels), an :class:`Upsample` that
    keeps the width; plus, with ``up``, the :func:`duplicate_up` shortcut of the level's input.
    Frames [B, T, H, W, cin] -> [B, T', H', W', cout]."""

    def __init__(self, cin: int, cout: int, up: str | None):
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(cin if i == 0 else cout, cout) for i in range(RESIDUAL_BLOCKS)]
        if up is not None:
            layers.append(Upsample(cout, temporal=up == "time", out_channels=cout))
        self.upsamples = nn.Sequential(*layers)
        self.up, self.cout = up, cout

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, state)
        if self.up is None:
            return y
        return y.add_(duplicate_up(x, self.cout, 2 if self.up == "time" else 1, 2, first_call=not state.started))


class Decoder3d22(Decoder3d):
    """The ``decoder.*`` part: raw (post-conv2) latents [B,T,h,w,48] -> patched frames [B,F,8h,8w,12], unclamped.
    The Wan2.1 :class:`Decoder3d`'s forward (conv1, middle, upsamples, head) over the levels above."""

    def __init__(self, dim: int):
        nn.Module.__init__(self)  # the layers differ from Wan2.1's; the forward is Decoder3d's
        d2, d4 = 2 * dim, 4 * dim
        self.conv1 = CausalConv3d(WAN22_LATENTS.channels, d4, 3, 1)
        self.middle = nn.Sequential(ResidualBlock(d4, d4), AttentionBlock(d4), ResidualBlock(d4, d4))
        levels = ((d4, d4, "time"), (d4, d4, "time"), (d4, d2, "space"), (d2, dim, None))  # vae2_2.py:651-662
        self.upsamples = nn.Sequential(*(ResidualUpBlock(cin, cout, up) for cin, cout, up in levels))
        self.head = nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, 3 * PATCH * PATCH, 3, 1))


def unpatchify(y: torch.Tensor) -> torch.Tensor:
    """Patched frames [B, F, H, W, 12] -> [B, 3, F, 2H, 2W]: channel c * 4 + r * 2 + q is pixel (2h + q, 2w + r)
    of colour c (``rearrange("b (c r q) f h w -> b c f (h q) (w r)")``, ``vae2_2.py:306-312``: r along the width)."""
    b, f, h, w, _ = y.shape
    y = y.view(b, f, h, w, 3, PATCH, PATCH)  # [..., c, r, q]
    return y.permute(0, 4, 1, 2, 6, 3, 5).reshape(b, 3, f, PATCH * h, PATCH * w)


class Wan22VAEDecoder(LatentVideoDecoder):
    """The decoder half of the Wan2.2 VAE (``conv2`` + ``decoder``), base width ``dim`` (256 when released).

    Normalised latents [B, 48, T, h, w] -> frames [B, 3, F, 16h, 16w] (see the module)."""

    latent_space = WAN22_LATENTS
    # one latent frame a pass: a whole block of LongLive 2.0 (8 latent frames, 29-32 frames at 704 x 1280) a pass
    # peaked 21 GiB higher on an H100 and was not faster (BENCHMARKS.md, issue 29 section)
    pass_frames = 1

    def __init__(self, dim: int = 256):
        super().__init__()
        self.dim = dim
        self.conv2 = CausalConv3d(WAN22_LATENTS.channels, WAN22_LATENTS.channels, 1)
        self.decoder = Decoder3d22(dim)

    _weights_channels_last = WanVAEDecoder._weights_channels_last  # the same one-time weight layout

    @torch.no_grad()  # inference only: the norms write into views of preallocated tensors
    def decode_pass(self, z: torch.Tensor, state: CausalState) -> torch.Tensor:
        """Normalised latents [B, 48, T, h, w] -> frames [B, 3, F, 16h, 16w], unclamped."""
        self._weights_channels_last()
        x = WAN22_LATENTS.to_raw(z.float()).to(self.dtype).permute(0, 2, 3, 4, 1)  # [B, T, h, w, 48]
        return unpatchify(self.decoder(self.conv2(x), state))

    @classmethod
    def _weights_and_config(cls, sd: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return wan_vae_weights(sd, source, "Wan2.2", WAN22_LATENTS.channels, residual_up=True)
