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

Inside the decoder every layer works on frames [B, T, H, W, C] (channels last) and the convolutions'
weights are stored channels-last, so cuDNN runs NDHWC kernels with no layout transposes between layers;
names and shapes of the parameters are the original ones.

Decoder layout for base width d (the released VAE has d = 96, LightVAE ``lightvaew2_1`` of lightx2v, the
same network pruned by 75 %, d = 24); "up" levels double height and width,
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

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..common.constants import LATENT_CHANNELS
from ..weights.safe_io import CheckpointError
from ..weights.vae_names import DIFFUSERS_ANCHOR, DIFFUSERS_PARTS, component_weights, describe, from_diffusers
from .decode_stream import CausalState, LatentVideoDecoder
from .latents import normalized_to_raw

# ---- layers ------------------------------------------------------------------------------------

NORM_EPS = 1e-12  # added to the mean square of [C] channel vectors (the original clamps |x| at 1e-12)


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution whose temporal window ends at the output frame, on frames [B, T, H, W, C].

    With a temporal kernel of k, output frame t sees input frames t-k+1 .. t; the k-1 frames before a
    call's first frame come from the :class:`CausalState`. Height and width are zero-padded by
    ``spatial_padding`` as in a plain convolution. The weight keeps the original [Cout, Cin, kt, kh, kw]
    shape (and name); the decoder stores it channels-last, so cuDNN reads and writes NDHWC with no
    layout transposes around it.
    """

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], spatial_padding: int = 0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, kernel, padding=(0, spatial_padding, spatial_padding))

    def forward(self, x: torch.Tensor, state: CausalState | None = None,
                fill: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """[B, T, H, W, Cin] -> [B, T, H', W', Cout]. With ``fill`` (see :meth:`RMSNorm.silu_into`), ``x`` gives
        only the shape: ``fill(room)`` writes this call's input frames straight behind the cached ones."""
        history = self.kernel_size[0] - 1
        if history:
            x = state.with_past(self, x, history, dim=1, fill=fill)  # [B, history + T, H, W, Cin]
        elif fill is not None:
            room = torch.empty_like(x)
            fill(room)
            x = room
        y = F.conv3d(x.permute(0, 4, 1, 2, 3), self.weight, self.bias, padding=self.padding)  # NDHWC in memory
        return y.permute(0, 2, 3, 4, 1)


class RMSNorm(nn.Module):
    """``x / |x| * sqrt(C) * gamma`` over the channels (the last dim) of [..., C] frames.

    ``gamma`` keeps the original shape [C, 1, 1(, 1)] (and name). Computed by ``F.rms_norm`` (x over the root
    mean square: the same thing; one fused pass on CUDA) with an epsilon far below any activation's mean square,
    where the original clamps the norm at 1e-12.
    """

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.gamma.reshape(-1), NORM_EPS)

    def silu_into(self, x: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """A ``fill`` for :meth:`CausalConv3d.forward`: writes silu(norm(x)) into the view it is given."""
        def fill(room: torch.Tensor) -> None:
            torch.ops.aten.silu.out(self(x), out=room)
        return fill


class ResidualBlock(nn.Module):
    """Twice (RMSNorm, SiLU, causal 3x3x3 conv), plus a shortcut (1x1x1 conv where the width changes).

    ``residual`` keeps the original indices: 0 and 3 the norms, 2 and 6 the convolutions
    (1 and 4 are the SiLUs, 5 stands where the original had dropout). Each convolution writes its norm's
    and SiLU's output straight behind its cached frames (:meth:`RMSNorm.silu_into`). Frames [B, T, H, W, C].
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin, 3), nn.SiLU(), CausalConv3d(cin, cout, 3, 1),
            RMSNorm(cout, 3), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, 1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(x, state, fill=norm1.silu_into(x))
        h = conv2(h, state, fill=norm2.silu_into(h))
        return h.add_(x if isinstance(self.shortcut, nn.Identity) else self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the positions of each frame; nothing crosses frames. Frames
    [B, T, H, W, C]; the 1x1 convolutions (original names and shapes) act as linear maps of the channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:  # state: not needed
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, 1, h * w, c)  # one head per frame
        qkv = F.linear(y, self.to_qkv.weight.reshape(3 * c, c), self.to_qkv.bias)
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # [(b t), 1, h*w, c]
        y = F.linear(y, self.proj.weight.reshape(c, c), self.proj.bias)
        return x + y.reshape(b, t, h, w, c)


TIME_CACHES = ("wan", "krea")  # the rules an :class:`Upsample`'s temporal convolution may see its past by


class Upsample(nn.Module):
    """Doubles height and width (nearest, then a 3x3 conv to half the channels, or to ``out_channels``: the
    Wan2.2 decoder keeps them, ``vae2_2.py:86-98``); if ``temporal``, first doubles the frame count.

    Temporal doubling: a causal (3,1,1) convolution makes 2C channels per frame, read as two
    consecutive frames of C channels. The video's first frame is neither doubled nor convolved; the
    convolution's history starts after it, with zeros.

    ``time_cache`` (temporal layers only; an attribute, settable) is the window of the convolution. With
    x_1, x_2, ... the layer's input frames after the video's first (latent frames 1, 2, ...) and
    x_{-1} = x_0 = 0 (the zeros the history starts with):

    - ``"wan"``, the Wan2.1 code's: frame k sees (x_{k-2}, x_{k-1}, x_k).
    - ``"krea"``, the decoder of Krea Realtime's server (krea-ai/realtime-video@acf4b7b
      ``demo_utils/vae_block3.py:46-63``): frame k sees (x'_{k-1}, x_{k-1}, x_k), x'_{k-1} being x_{k-1}
      where x_{k-2} != 0 and 0 where x_{k-2} == 0, element by element. That code decodes one latent frame
      per call (``vae_block3.py:212-224``) and after a call of one frame keeps ``where(last cached == 0, 0,
      current)`` and the current frame (``vae_block3.py:56-59``, 62): while the cache still holds the
      zeros it starts with (frames 1 and 2) that is the Wan2.1 window; from frame 3 on the current frame
      stands twice. Its second temporal upsample always gets two frames a call, so the rule never applies
      there: :class:`WanVAEDecoder` sets it on the first one only.

    The :class:`CausalState` holds the same two past frames under both rules, so a video decoded in
    blocks of any size gives the frames of one decode of everything under either.
    """

    def __init__(self, channels: int, temporal: bool, time_cache: str = "wan", out_channels: int | None = None):
        super().__init__()
        out_channels = channels // 2 if out_channels is None else out_channels
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        if time_cache not in TIME_CACHES or (time_cache != "wan" and not temporal):
            raise ValueError(f"time_cache {time_cache!r}: one of {', '.join(TIME_CACHES)} "
                             "(other than wan only on a temporal layer)")
        self.time_cache = time_cache

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        """[B, T, H, W, C] -> [B, T', 2H, 2W, C'] (C' = C/2 or ``out_channels``; T' = 2T, or 2T - 1 in the
        video's first call, if temporal)."""
        if self.time_conv is not None:
            x = self._double_frames(x, state)
        b, t, h, w, c = x.shape
        frames = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # NCHW, channels-last in memory
        y = self.resample[1](F.interpolate(frames, scale_factor=2.0, mode="nearest"))
        return y.permute(0, 2, 3, 1).reshape(b, t, 2 * h, 2 * w, y.shape[1])

    def _double_frames(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        parts = []
        if not state.started:  # the video's first frame passes through as one frame
            parts.append(x[:, :1])
            x = x[:, 1:]
        if x.shape[1]:
            pairs = self._krea_time_conv(x, state) if self.time_cache == "krea" else self.time_conv(x, state)
            b, t, h, w, c2 = pairs.shape  # channels [0, C) are the first frame of a pair, [C, 2C) the second
            parts.append(pairs.reshape(b, t, h, w, 2, c2 // 2).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _krea_time_conv(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        """The temporal convolution under the "krea" window (see the class): [B, T, H, W, C] -> [B, T, H, W, 2C]."""
        seq = state.with_past(self.time_conv, x, 2, dim=1)  # x_{k-2}, x_{k-1}, then this call's x_k
        before, previous, current = seq[:, :-2], seq[:, 1:-1], seq[:, 2:]
        repeated = torch.where(before == 0, 0, previous)
        windows = torch.stack((repeated, previous, current), dim=2).flatten(1, 2)  # [B, 3T, H, W, C]
        y = F.conv3d(windows.permute(0, 4, 1, 2, 3), self.time_conv.weight, self.time_conv.bias, stride=(3, 1, 1))
        return y.permute(0, 2, 3, 4, 1)


class Decoder3d(nn.Module):
    """The ``decoder.*`` part: raw (post-conv2) latents [B,T,h,w,16] -> frames [B,F,8h,8w,3], unclamped
    (channels last: every layer works on [B, T, H, W, C])."""

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
        return conv(x, state, fill=norm.silu_into(x))


class WanVAEDecoder(LatentVideoDecoder):
    """The decoder half of the Wan2.1 VAE (``conv2`` + ``decoder``), base width ``dim`` (96 when released)."""

    def __init__(self, dim: int = 96):
        super().__init__()
        self.dim = dim
        self.conv2 = CausalConv3d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder = Decoder3d(dim)

    @torch.no_grad()  # inference only: the norms write into views of preallocated tensors
    def decode_pass(self, z: torch.Tensor, state: CausalState) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> frames [B, 3, F, 8h, 8w] (a view of channels-last memory)."""
        self._weights_channels_last()
        x = normalized_to_raw(z.float()).to(self.dtype).permute(0, 2, 3, 4, 1)  # [B, T, h, w, 16]
        return self.decoder(self.conv2(x), state).permute(0, 4, 1, 2, 3)

    def _weights_channels_last(self) -> None:
        """Store the convolutions' weights channels-last (once; ``.to()`` keeps the layout): with the frames
        [B, T, H, W, C] cuDNN then runs NDHWC kernels with no transposes (BENCHMARKS.md, the decoder)."""
        if self.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d):
            return
        for conv in self.modules():
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last_3d if conv.weight.dim() == 5 else torch.channels_last
                conv.weight.data = conv.weight.data.contiguous(memory_format=layout)

    @property
    def time_cache(self) -> str:
        """The window rule of the first temporal upsample (:class:`Upsample`): "wan" (the Wan2.1 code's, the
        default) or "krea" (Krea Realtime's server decoder, family krea-realtime). Set it before a video's
        first decode; every stream of this decoder's weights follows it."""
        return self._first_temporal_upsample().time_cache

    @time_cache.setter
    def time_cache(self, rule: str) -> None:
        if rule not in TIME_CACHES:
            raise ValueError(f"time_cache {rule!r}: one of {', '.join(TIME_CACHES)}")
        self._first_temporal_upsample().time_cache = rule

    def _first_temporal_upsample(self) -> Upsample:
        return next(m for m in self.decoder.upsamples if isinstance(m, Upsample) and m.time_conv is not None)

    @classmethod
    def _weights_and_config(cls, sd: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return wan_vae_weights(sd, source, "Wan2.1", LATENT_CHANNELS)


_VAE_OF_CHANNELS = {16: "Wan2.1", 48: "Wan2.2"}  # latent channels -> the VAE, for messages


def wan_vae_weights(sd: Any, source: str, vae: str, channels: int,
                    residual_up: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The decoder's tensors of a Wan VAE (``vae``: "Wan2.1" or "Wan2.2", of ``channels`` latent channels) under
    the original names, from the original or the diffusers layout (``residual_up``: Wan2.2's up blocks), and the
    base width read from ``decoder.conv1`` [4*dim, channels, 3, 3, 3]: ``(weights, {"dim": dim})``. Raises
    :class:`CheckpointError` naming ``source`` and what the file holds instead."""
    weights = component_weights(sd, "decoder.conv1.weight", ("decoder.", "conv2."), source)
    if weights is None:
        weights = component_weights(sd, DIFFUSERS_ANCHOR, DIFFUSERS_PARTS, source)
        if weights is not None and weights[DIFFUSERS_ANCHOR].dim() == 5:  # an image VAE's conv_in is 2-D
            weights = from_diffusers(weights, residual_up=residual_up)
        else:
            raise CheckpointError(source, f"not a {vae} VAE: it looks like {describe(sd)}")
    first = weights["decoder.conv1.weight"]
    if first.dim() != 5 or first.shape[0] % 4:
        raise CheckpointError(source, f"decoder.conv1.weight has shape {tuple(first.shape)}, "
                                      f"not a {vae} VAE's [4*dim, {channels}, 3, 3, 3]")
    if first.shape[1] != channels:
        other = _VAE_OF_CHANNELS.get(first.shape[1])
        what = f" (a {other} VAE)" if other and other != vae else ""
        raise CheckpointError(source, f"a VAE with {first.shape[1]} latent channels{what}; "
                                      f"this decoder needs the {channels}-channel {vae} VAE")
    return weights, {"dim": first.shape[0] // 4}
