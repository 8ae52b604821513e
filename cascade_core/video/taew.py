"""A tiny, fast preview decoder for Wan latents: the decoder of "taew2_1" (madebyollin's TAEHV
architecture), with the same streaming interface as :class:`cascade_core.video.vae.WanVAEDecoder`; and
LightTAE ("lighttaew2_1"), lightx2v's own weights for the same network, which read the VAE's *raw* latents.
The same network for Wan2.2's 48-channel latents, "taew2_2" (and lightx2v's "lighttaew2_2"), is the
configuration :class:`TinyWan22Decoder`: 48 input channels and 12 output channels pixel-shuffled 2 x 2.

Guarantees:
- Parameter names are those of ``taew2_1.pth`` / ``taew2_1.safetensors``: ``decoder.N.*`` with N the
  layer's index in the original sequential decoder (listed below). ``encoder.*`` keys and a common
  prefix (``first_stage_model.``, ComfyUI's ``taehv_`` in ``taehv_decoder.*``) are ignored. A first
  time-growth layer stored with more output channels than used keeps its last ones (the last time
  step), as the original loader does. Other files raise :class:`CheckpointError`. (The Hunyuan
  ``taehv.pth`` has the same shapes and cannot be told apart; it decodes other latents.)
- Inputs are normalised latents [B, 16, T, h, w] (what the DiT produces, as for the full decoder);
  outputs are [B, 3, F, 8h, 8w] float32 in [-1, 1] with the full decoder's frame counts: the network
  makes 4 frames per latent frame and the video's first 3 are dropped, as in the original.
- LightTAE (:class:`LightTAEDecoder`): tensor names, shapes and computation are those of taew2_1
  (lightx2v builds both with one class: ``lightx2v/models/video_encoders/hf/tae.py:162-234``, widths
  256/128/64/64 hard-coded at line 208, loaded strictly at 245); its input is the VAE's raw latents,
  ``z * std + mean`` of the normalised ones (``need_scaled``: ``hf/wan/vae_tiny.py:66-72``, switched on
  for a "lighttae" file in ``lightx2v/pipeline.py:312-313``), where taew2_1 takes the normalised ones
  (``need_scaled`` off). The released files differ only in dtype (lighttaew2_1 float32, taew2_1 float16),
  so which one a file is comes from its name or dtype: :func:`cascade_core.weights.vae_names.decoder_kind`.
- Causal: each memory block sees its own input and the previous frame's (zeros before the first),
  nothing else crosses frames. With that one frame of memory per block kept in a
  :class:`~cascade_core.video.decode_stream.CausalState`, decoding block by block equals decoding all at once (up to
  floating-point summation order), and the first-3-frames drop happens once per video.

Layout (widths c0..c3 = 256, 128, 64, 64 in taew2_1)::

    0 soft clamp  1 conv 16 -> c0  2 ReLU
    3-5 MemBlock(c0)   6 upsample x2   7 TimeGrow(c0, x1)   8 conv c0 -> c1 (no bias)
    9-11 MemBlock(c1)  12 upsample x2  13 TimeGrow(c1, x2)  14 conv c1 -> c2 (no bias)
    15-17 MemBlock(c2) 18 upsample x2  19 TimeGrow(c2, x2)  20 conv c2 -> c3 (no bias)
    21 ReLU  22 conv c3 -> 3   (output on the [0, 1] scale)

taew2_2 (madebyollin/taehv@1f14a56 ``taehv.py:199-200``: patch size 2, 48 latent channels): layer 1 reads 48
channels, layer 22 makes 3 x 2 x 2 = 12, and ``F.pixel_shuffle(x, 2)`` (``taehv.py:309-312``; channel
c * 4 + i * 2 + j is pixel (2h + i, 2w + j)) makes frames 16x the latents. Like taew2_1 it reads the latents
the DiT works in, with no mean or std (the TAEHV README, "TAEHV does not use any latent scales / shifts").
lighttaew2_2 reads raw latents ``z * std + mean`` with the Wan2.2 VAE's statistics (lightx2v
``hf/wan/vae_tiny.py:83-205``, ``need_scaled`` at 199-202; set for a "lighttae" file at ``pipeline.py:312-313``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..common.constants import FRAMES_PER_LATENT
from ..weights.safe_io import CheckpointError
from ..weights.vae_names import component_weights, describe
from .decode_stream import CausalState, LatentVideoDecoder
from .vae22 import WAN22_LATENTS

TAEW2_1_WIDTHS = (256, 128, 64, 64)
TIME_STRIDES = (1, 2, 2)  # frames per input frame at each level: 4 in all, as the full decoder


def _conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: keeps latents within (-3, 3), nearly unchanged near 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """``relu(convs([x_t, x_{t-1}]) + x_t)``: a residual block that also sees the previous frame's input.

    Works on frames flattened to [(B T), C, H, W]; x_{t-1} of a call's first frame comes from the
    :class:`CausalState` (zeros at the start of a video).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * channels, channels), nn.ReLU(),
            _conv3x3(channels, channels), nn.ReLU(),
            _conv3x3(channels, channels))

    def forward(self, x: torch.Tensor, batch: int, state: CausalState) -> torch.Tensor:
        frames = rearrange(x, "(b t) c h w -> b t c h w", b=batch)
        joined = state.with_past(self, frames, 1, dim=1)  # [B, 1 + T, C, H, W]
        previous = rearrange(joined[:, :-1], "b t c h w -> (b t) c h w")
        return F.relu(self.conv(torch.cat([x, previous], dim=1)) + x)


class TimeGrow(nn.Module):
    """Each frame becomes ``stride`` consecutive frames: a 1x1 conv to stride*C channels, channel
    group s giving sub-frame s. [(B T), C, H, W] -> [(B T stride), C, H, W]."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TinyWanDecoder(LatentVideoDecoder):
    """The taew2_1 decoder (widths ``widths``; the released ones are :data:`TAEW2_1_WIDTHS`).

    Normalised latents [B, 16, T, h, w] -> frames [B, 3, F, 8h, 8w] on the [-1, 1] scale (see the module).
    The layer list is ``decoder`` of TAEHV (``lightx2v/models/video_encoders/hf/tae.py:210-234``, or
    madebyollin/taehv ``taehv.py``); a memory block's past is its input one frame earlier
    (``tae.py:81-86``), zeros before the video's first frame.
    """

    kind = "taew2_1"  # which released decoder this class decodes as (a name for messages)
    raw_latents = False  # True: the network reads the VAE's raw latents (LightTAE), not the normalised ones
    frames_dropped = FRAMES_PER_LATENT - 1  # the network's first frames of a video, not part of the video
    patch = 1  # output pixels per network pixel, in height and width (pixel shuffle of 3 * patch^2 channels)

    def __init__(self, widths: tuple[int, int, int, int] = TAEW2_1_WIDTHS):
        super().__init__()
        c0, c1, c2, c3 = widths
        self.widths = tuple(widths)
        layers: list[nn.Module] = [SoftClamp(), _conv3x3(self.latent_space.channels, c0), nn.ReLU()]
        for (cin, cout), stride in zip(((c0, c1), (c1, c2), (c2, c3)), TIME_STRIDES):
            layers += [MemBlock(cin), MemBlock(cin), MemBlock(cin), nn.Upsample(scale_factor=2),
                       TimeGrow(cin, stride), _conv3x3(cin, cout, bias=False)]
        layers += [nn.ReLU(), _conv3x3(c3, 3 * self.patch ** 2)]
        self.decoder = nn.Sequential(*layers)

    def decode_pass(self, z: torch.Tensor, state: CausalState) -> torch.Tensor:
        batch = z.shape[0]
        if self.raw_latents:
            z = self.latent_space.to_raw(z.float())  # z * std + mean, in float32
        x = rearrange(z.to(self.dtype), "b c t h w -> (b t) c h w")
        for layer in self.decoder:
            x = layer(x, batch, state) if isinstance(layer, MemBlock) else layer(x)
        if self.patch > 1:
            x = F.pixel_shuffle(x, self.patch)  # [(b t), 3 * p * p, H, W] -> [(b t), 3, p * H, p * W]
        frames = rearrange(x, "(b t) c h w -> b c t h w", b=batch)
        if not state.started:
            frames = frames[:, :, self.frames_dropped:]
        return frames * 2 - 1  # [0, 1] -> [-1, 1]

    @classmethod
    def _weights_and_config(cls, sd: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        weights = component_weights(sd, "decoder.1.weight", ("decoder.",), source)
        super_layout = component_weights(sd, "decoder.0.weight", ("decoder.",), source) if weights is None else None
        if super_layout is not None and "decoder.22.weight" in super_layout:  # taehv.py:217-225: a 1x1 conv first
            raise CheckpointError(source, "a TAEHV \"super\" decoder (taew2_2_super / taehv1_5_super: other layers "
                                          f"than {cls.kind}'s), not supported")
        if weights is None or "decoder.22.weight" not in weights:
            raise CheckpointError(source, f"not a {cls.kind} tiny decoder (no decoder.1.weight / decoder.22.weight): "
                                          f"it looks like {describe(sd)}")
        first, last = weights["decoder.1.weight"], weights["decoder.22.weight"]  # [c0, C, 3, 3], [3 p^2, c3, 3, 3]
        space, outputs = cls.latent_space, 3 * cls.patch ** 2
        if first.dim() != 4 or first.shape[1] != space.channels:
            channels = first.shape[1] if first.dim() == 4 else "?"
            which = {48: " (taew2_2 / lighttaew2_2: Wan2.2 TI2V-5B's)", 16: " (taew2_1 / lighttaew2_1: Wan2.1's)",
                     32: " (taehv1_5 / lighttaehy1_5: HunyuanVideo 1.5's)"}.get(channels, "")
            raise CheckpointError(source, f"a tiny decoder for {channels}-channel latents{which}; {space.name} has "
                                          f"{space.channels}")
        if last.dim() != 4 or last.shape[0] != outputs:
            raise CheckpointError(source, f"a tiny decoder with {last.shape[0]} output channels (another patch "
                                          f"size); {cls.kind} outputs {outputs}")
        try:
            widths = tuple(weights[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
        except KeyError as exc:
            raise CheckpointError(source, f"missing decoder key {exc.args[0]}") from None
        with torch.device("meta"):
            layers = cls(widths).decoder
        weights = dict(weights)
        for index, layer in enumerate(layers):
            name = f"decoder.{index}.conv.weight"
            if isinstance(layer, TimeGrow) and name in weights:
                used, stored = layer.conv.weight.shape[0], weights[name].shape[0]  # stride * C
                if stored > used and stored % layer.conv.weight.shape[1] == 0:
                    weights[name] = weights[name][-used:]  # keep the last time step's channels
        return weights, {"widths": widths}


class LightTAEDecoder(TinyWanDecoder):
    """LightTAE, ``lighttaew2_1.safetensors`` / ``.pth`` of Hugging Face ``lightx2v/Autoencoders``: the
    :class:`TinyWanDecoder` network and names, fed the VAE's raw latents (see the module docstring).

    Normalised latents [B, 16, T, h, w] -> frames [B, 3, F, 8h, 8w] in [-1, 1]; the conversion to raw
    latents is done here, so callers give both tiny decoders the same (DiT-space) latents.
    """

    kind = "lighttaew2_1"
    raw_latents = True


class TinyWan22Decoder(TinyWanDecoder):
    """taew2_2 (madebyollin/taehv ``taew2_2.pth`` / ``.safetensors``): the :class:`TinyWanDecoder` network and names
    for Wan2.2's latents, 48 input channels, 12 output channels pixel-shuffled 2 x 2 (see the module docstring).

    Normalised latents [B, 48, T, h, w] -> frames [B, 3, F, 16h, 16w] in [-1, 1], F as for the full decoder.
    """

    kind = "taew2_2"
    latent_space = WAN22_LATENTS
    patch = 2


class LightTAE22Decoder(TinyWan22Decoder):
    """lighttaew2_2 (lightx2v): :class:`TinyWan22Decoder`'s network and names fed the Wan2.2 VAE's raw latents."""

    kind = "lighttaew2_2"
    raw_latents = True
