"""The Wan2.1 VAE decoder, streaming: latent blocks decoded one after another give the frames of one
decode of all of them.

Guarantees:
- Architecture and parameter names are those of the 16-channel Wan2.1 VAE (``Wan2.1_VAE.pth``,
  ComfyUI's ``wan_2.1_vae.safetensors``, the state dict of a ComfyUI ``VAE`` object): the post-quant
  convolution ``conv2.*`` and ``decoder.*``. The diffusers ``AutoencoderKLWan`` layout is read too
  (a ``diffusion_pytorch_model.safetensors`` or its folder; names mapped by :mod:`weights.vae_names`). The
  encoder half (``encoder.*``, ``conv1.*`` / ``quant_conv.*``) and a common key prefix
  (``first_stage_model.``, ``vae.`` ...) are ignored; anything that is not a Wan2.1 VAE raises
  :class:`CheckpointError` naming the file and saying what it looks like (a DiT, an image VAE, a text
  encoder ...) or which keys are missing.
- Every operation along time is causal. The input frames that a temporal convolution needs from before
  a call are kept in a :class:`~video.decode_stream.CausalState`, so decoding block by block with one
  :class:`~video.decode_stream.StreamingDecode` equals one decode of everything, up to floating-point
  summation order.
- Latent frame 0 of a video decodes to 1 frame, every later latent frame to 4: a first block of n
  latent frames gives 1 + 4(n-1) frames, every later block 4n. Frames are 8x the latent size.
- Inputs are *normalised* latents (what the DiT works on); :mod:`video.latents` converts from and to the
  raw latents that ComfyUI's ``LATENT`` holds.
- On CUDA each stream decodes on its own CUDA stream, ordered after the caller's queued work
  (see :class:`~video.decode_stream.StreamingDecode` for what the caller must do).

Decoder layout for base width d (the released VAE has d = 96); "up" levels double height and width,
the first two also double the frame count (except for the video's first frame)::

    z [B,16,T,h,w] -> conv2 (1x1x1) -> decoder.conv1 (3x3x3, 16 -> 4d)
    decoder.middle     : Res(4d), Attention(4d), Res(4d)
    decoder.upsamples  : 0-2 Res(4d -> 4d), 3 Up(4d, time+space) -> 2d
                         4 Res(2d -> 4d), 5-6 Res(4d), 7 Up(4d, time+space) -> 2d
                         8-10 Res(2d -> 2d), 11 Up(2d, space) -> d
                         12-14 Res(d -> d)
    decoder.head       : RMSNorm(d), SiLU, 3x3x3 conv d -> 3
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..common.constants import LATENT_CHANNELS
from ..weights.safe_io import CheckpointError
from ..weights.vae_names import DIFFUSERS_ANCHOR, DIFFUSERS_PARTS, component_weights, describe, from_diffusers
from .decode_stream import CausalState, LatentVideoDecoder
from .latents import normalized_to_raw

# ---- layers ------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """A 3-D convolution whose temporal window ends at the output frame.

    With a temporal kernel of k, output frame t sees input frames t-k+1 .. t; the k-1 frames before a
    call's first frame come from the :class:`CausalState`. Height and width are zero-padded by
    ``spatial_padding`` as in a plain convolution.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], spatial_padding: int = 0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, kernel, padding=(0, spatial_padding, spatial_padding))

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        history = self.kernel_size[0] - 1
        if history:
            x = state.with_past(self, x, history, dim=2)  # [B, C, history + T, H, W]
        return super().forward(x)

    def after_norm_silu(self, norm: RMSNorm, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        """``self(silu(norm(x)), state)``, the normalised frames written straight behind the cached
        ones: no copy of the whole input to put them there (1.3 % of a decode on an H200, BENCHMARKS.md)."""
        def fill(room: torch.Tensor) -> None:  # room: [B, C, T, H, W], a view
            norm(x, out=room)
            F.silu(room, inplace=True)

        return super().forward(state.with_past(self, x, self.kernel_size[0] - 1, dim=2, fill=fill))


class RMSNorm(nn.Module):
    """``x / |x| * sqrt(C) * gamma`` over the channels (dim 1) of [B, C, *spatial] tensors."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised x; written into ``out`` (a tensor of x's shape, or a view) where given."""
        # F.normalize(x, dim=1) * scale * gamma with one pass over the frames fewer (3 % of a decode)
        inverse_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        return torch.mul(x * inverse_norm, self.gamma * self.scale, out=out)


class ResidualBlock(nn.Module):
    """Twice (RMSNorm, SiLU, causal 3x3x3 conv), plus a shortcut (1x1x1 conv where the width changes).

    ``residual`` keeps the original indices: 0 and 3 the norms, 2 and 6 the convolutions
    (1 and 4 are the SiLUs, 5 stands where the original had dropout). Each convolution runs through
    :meth:`CausalConv3d.after_norm_silu`, which applies its norm and SiLU.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin, 3), nn.SiLU(), CausalConv3d(cin, cout, 3, 1),
            RMSNorm(cout, 3), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, 1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1.after_norm_silu(norm1, x, state)
        h = conv2.after_norm_silu(norm2, h, state)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the positions of each frame; nothing crosses frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:  # state: not needed
        b, _, _, h, _ = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)
        y = F.scaled_dot_product_attention(q, k, v)  # [(b t), 1, h*w, c]
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b)


class Upsample(nn.Module):
    """Doubles height and width (nearest, then a 3x3 conv to half the channels); if ``temporal``,
    first doubles the frame count.

    Temporal doubling: a causal (3,1,1) convolution makes 2C channels per frame, read as two
    consecutive frames of C channels. The video's first frame is neither doubled nor convolved; the
    convolution's history starts after it, with zeros.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(channels, channels // 2, 3, padding=1))
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_frames(x, state)
        t = x.shape[2]
        y = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", t=t)

    def _double_frames(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        parts = []
        if not state.started:  # the video's first frame passes through as one frame
            parts.append(x[:, :, :1])
            x = x[:, :, 1:]
        if x.shape[2]:
            pairs = self.time_conv(x, state)  # [B, 2C, T, H, W]
            parts.append(rearrange(pairs, "b (two c) t h w -> b c (t two) h w", two=2))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class Decoder3d(nn.Module):
    """The ``decoder.*`` part: raw (post-conv2) latents [B,16,T,h,w] -> frames [B,3,F,8h,8w], unclamped."""

    def __init__(self, dim: int):
        super().__init__()
        d2, d4 = 2 * dim, 4 * dim
        self.conv1 = CausalConv3d(LATENT_CHANNELS, d4, 3, 1)
        self.middle = nn.Sequential(ResidualBlock(d4, d4), AttentionBlock(d4), ResidualBlock(d4, d4))
        levels = ((d4, d4, "time"), (d2, d4, "time"), (d2, d2, "space"), (dim, dim, None))
        layers: list[nn.Module] = []
        for cin, cout, up in levels:
            layers += [ResidualBlock(cin, cout), ResidualBlock(cout, cout), ResidualBlock(cout, cout)]
            if up:
                layers.append(Upsample(cout, temporal=up == "time"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, 3, 3, 1))

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv1(x, state)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, state)
        norm, _, conv = self.head
        return conv.after_norm_silu(norm, x, state)


class WanVAEDecoder(LatentVideoDecoder):
    """The decoder half of the Wan2.1 VAE (``conv2`` + ``decoder``), base width ``dim`` (96 when released)."""

    def __init__(self, dim: int = 96):
        super().__init__()
        self.dim = dim
        self.conv2 = CausalConv3d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder = Decoder3d(dim)

    @torch.no_grad()  # inference only: the norms write into views of preallocated tensors
    def decode_pass(self, z: torch.Tensor, state: CausalState) -> torch.Tensor:
        x = self.conv2(normalized_to_raw(z.float()).to(self.dtype))
        return self.decoder(x, state)

    @classmethod
    def _weights_and_config(cls, sd: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        weights = component_weights(sd, "decoder.conv1.weight", ("decoder.", "conv2."), source)
        if weights is None:
            weights = component_weights(sd, DIFFUSERS_ANCHOR, DIFFUSERS_PARTS, source)
            if weights is not None and weights[DIFFUSERS_ANCHOR].dim() == 5:  # an image VAE's conv_in is 2-D
                weights = from_diffusers(weights)
            else:
                raise CheckpointError(source, f"not a Wan2.1 VAE: it looks like {describe(sd)}")
        first = weights["decoder.conv1.weight"]  # [4*dim, z_dim, 3, 3, 3]
        if first.dim() != 5 or first.shape[0] % 4:
            raise CheckpointError(source, f"decoder.conv1.weight has shape {tuple(first.shape)}, "
                                          "not a Wan2.1 VAE's [4*dim, 16, 3, 3, 3]")
        if first.shape[1] != LATENT_CHANNELS:
            what = " (a Wan2.2 VAE)" if first.shape[1] == 48 else ""
            raise CheckpointError(source, f"a VAE with {first.shape[1]} latent channels{what}; "
                                          f"this decoder needs the {LATENT_CHANNELS}-channel Wan2.1 VAE")
        return weights, {"dim": first.shape[0] // 4}
