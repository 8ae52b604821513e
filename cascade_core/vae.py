"""The Wan2.1 VAE decoder, streaming: latent blocks decoded one after another give the frames of one
decode of all of them.

Guarantees:
- Architecture and parameter names are those of the 16-channel Wan2.1 VAE (``Wan2.1_VAE.pth``,
  ComfyUI's ``wan_2.1_vae.safetensors``, the state dict of a ComfyUI ``VAE`` object): the post-quant
  convolution ``conv2.*`` and ``decoder.*``. The diffusers ``AutoencoderKLWan`` layout is read too
  (a ``diffusion_pytorch_model.safetensors`` or its folder; names mapped by :mod:`vae_names`). The
  encoder half (``encoder.*``, ``conv1.*`` / ``quant_conv.*``) and a common key prefix
  (``first_stage_model.``, ``vae.`` ...) are ignored; anything that is not a Wan2.1 VAE raises
  :class:`CheckpointError` naming the file and saying what it looks like (a DiT, an image VAE, a text
  encoder ...) or which keys are missing.
- Every operation along time is causal. The input frames that a temporal convolution needs from before
  a call are kept in a :class:`CausalState` (zeros before the first frame, which is exactly the zero
  padding of one causal convolution over the whole video), so decoding block by block with one
  :class:`StreamingDecode` equals one decode of everything, up to floating-point summation order.
- Latent frame 0 of a video decodes to 1 frame, every later latent frame to 4: a first block of n
  latent frames gives 1 + 4(n-1) frames, every later block 4n. Frames are 8x the latent size.
- Inputs are *normalised* latents (what the DiT works on); :func:`normalized_to_raw` and
  :func:`raw_to_normalized` convert from and to the raw latents that ComfyUI's ``LATENT`` holds.
- On CUDA each stream decodes on its own CUDA stream, ordered after the caller's queued work
  (see :class:`StreamingDecode` for what the caller must do).

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

import os
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .safe_io import CheckpointError, looks_like, read_weights
from .sampler import Interrupted
from .transfer import to_device, to_host_async
from .vae_names import DIFFUSERS_ANCHOR, DIFFUSERS_PARTS, from_diffusers

LATENT_CHANNELS = 16
TIME_FACTOR = 4  # frames per latent frame after the first
SPACE_FACTOR = 8  # pixels per latent pixel, each direction

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ---- latent normalisation ----------------------------------------------------------------------

def _check_latents(z: torch.Tensor) -> None:
    if z.dim() != 5 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected latents [B, {LATENT_CHANNELS}, T, h, w], got {tuple(z.shape)}")


def _per_channel(values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
    # uploaded without blocking: on the VAE's stream a blocking copy would wait for the DiT's tick
    return to_device(torch.tensor(values, dtype=torch.float32), z.device).view(1, -1, 1, 1, 1)


def normalized_to_raw(z: torch.Tensor) -> torch.Tensor:
    """DiT-space latents -> the VAE's raw latents, ``z * std + mean`` per channel (z: [B,16,T,h,w]).

    Computed in float32, returned in z's dtype.
    """
    _check_latents(z)
    return (z.float() * _per_channel(LATENT_STD, z) + _per_channel(LATENT_MEAN, z)).to(z.dtype)


def raw_to_normalized(z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents (ComfyUI's ``LATENT``) -> DiT-space latents; inverse of :func:`normalized_to_raw`."""
    _check_latents(z)
    return ((z.float() - _per_channel(LATENT_MEAN, z)) / _per_channel(LATENT_STD, z)).to(z.dtype)


# ---- causal memory -----------------------------------------------------------------------------

class CausalState:
    """What one video's decode remembers between calls.

    For every temporal layer, the last input frames it has seen (zeros before the video's first frame);
    and ``started``, whether the video's first latent frame has been decoded. A layer's tensor is
    allocated the first time the layer runs and afterwards only overwritten in place.
    """

    def __init__(self) -> None:
        self.started = False
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def with_past(self, layer: nn.Module, x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        """``x`` with the ``n`` frames that came before it put in front along ``dim`` (time).

        Remembers the last ``n`` frames of the result for ``layer``'s next call.
        """
        past = self._frames.get(layer)
        if past is None:
            shape = list(x.shape)
            shape[dim] = n
            past = self._frames[layer] = x.new_zeros(shape)
        joined = torch.cat([past, x], dim=dim)  # time: n + T
        past.copy_(joined.narrow(dim, joined.shape[dim] - n, n))
        return joined

    def clear(self) -> None:
        """Back to the start of a video, keeping the allocated tensors."""
        for frames in self._frames.values():
            frames.zero_()
        self.started = False

    def forget(self) -> None:
        """Back to the start of a video, dropping the tensors (the next video has other shapes)."""
        self._frames.clear()
        self.started = False


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


class RMSNorm(nn.Module):
    """``x / |x| * sqrt(C) * gamma`` over the channels (dim 1) of [B, C, *spatial] tensors."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """Twice (RMSNorm, SiLU, causal 3x3x3 conv), plus a shortcut (1x1x1 conv where the width changes).

    ``residual`` keeps the original indices: 0 and 3 the norms, 2 and 6 the convolutions
    (1 and 4 are the SiLUs, 5 stands where the original had dropout).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin, 3), nn.SiLU(), CausalConv3d(cin, cout, 3, 1),
            RMSNorm(cout, 3), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, 1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState) -> torch.Tensor:
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h = conv1(act1(norm1(x)), state)
        h = conv2(act2(norm2(h)), state)
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
        norm, act, conv = self.head
        return conv(act(norm(x)), state)


# ---- weights -----------------------------------------------------------------------------------

def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """What a state dict that is not the wanted decoder looks like (see :func:`safe_io.looks_like`)."""
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


# ---- the streaming interface shared by both decoders ------------------------------------------

class DecodeHandle:
    """The frames of one decode call, which on CUDA may still be being computed (or copied to the host).

    For frames on the GPU, :meth:`result` makes the caller's current CUDA stream wait for them (the
    host does not block) and returns them, safe to use on that stream; a ``.cpu()`` or ``.item()``
    after it waits as usual. For frames copied to host memory (``decode_async(z, to_host=True)``),
    :meth:`result` blocks the calling thread until the copy is done.
    """

    def __init__(self, frames: torch.Tensor, done: "torch.cuda.Event | None"):
        self._frames = frames
        self._done = done

    def ready(self) -> bool:
        """True once the frames are computed (never blocks)."""
        return self._done is None or self._done.query()

    def result(self) -> torch.Tensor:
        """[B, 3, F, H, W] float32 in [-1, 1]; work queued on the current stream afterwards sees them."""
        if self._done is not None and not self._frames.is_cuda:
            self._done.synchronize()  # frames copied to the host: wait for the copy (this thread only)
        elif self._done is not None:
            stream = torch.cuda.current_stream(self._frames.device)
            stream.wait_event(self._done)
            self._frames.record_stream(stream)  # their memory is not reused while that stream may read it
        return self._frames


class StreamingDecode:
    """One video decoded block after block; the blocks' frames are those of one decode of all latents.

    ``decode_async(z)`` queues the decode of a block and returns a :class:`DecodeHandle`;
    ``decode(z)`` is ``decode_async(z).result()``. Blocks must be given in order, with the same batch
    size and latent height/width; :meth:`reset` starts a new video (any shape), keeping the memory.
    At most ``frames_per_pass`` latent frames go through the network at once (None: a whole block),
    which bounds the activation memory and does not change the result.

    On CUDA the work runs on this object's own CUDA stream:
    - it starts after everything queued on the current stream of ``z``'s device (of the decoder's
      device for latents in host memory) when ``decode_async`` is called, so ``z`` may still be
      being computed there; ``z`` may be freed right away, but must not be written to until
      ``result()`` has been called. Latents in host memory are uploaded through pinned memory
      without blocking the host; nothing in ``decode_async`` waits for the GPU;
    - ``handle.result()`` orders the caller's current stream after the decode and returns the frames,
      ready to use on it; ``handle.ready()`` polls; :meth:`synchronize` blocks the host until every
      queued decode is done.
    The cache tensors live on the decoder's device and are touched only on the private stream. On the
    CPU everything runs at once and ``result()`` returns immediately.
    """

    def __init__(self, decoder: "LatentVideoDecoder", frames_per_pass: int | None = 1,
                 should_stop: Callable[[], bool] | None = None):
        if frames_per_pass is not None and frames_per_pass < 1:
            raise ValueError("frames_per_pass must be a positive number of latent frames, or None")
        self.decoder = decoder
        self.frames_per_pass = frames_per_pass
        self.should_stop = should_stop
        self.state = CausalState()
        self.latent_frames = 0  # decoded so far in this video
        self._shape: tuple[int, int, int] | None = None  # (B, h, w) of this video
        device = decoder.device
        self._cuda = torch.cuda.Stream(device) if device.type == "cuda" else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Frames of the next block (see :meth:`decode_async`), ready on the caller's current stream."""
        return self.decode_async(z).result()

    def decode_async(self, z: torch.Tensor, to_host: bool = False) -> DecodeHandle:
        """Queue the decode of the next block of normalised latents z [B, 16, T, h, w].

        The handle's frames are [B, 3, F, 8h, 8w] float32 in [-1, 1], F = 1 + 4(T-1) for the video's
        first block and 4T after. With ``to_host`` they are in host memory: on CUDA a copy into a
        pinned buffer is queued on this object's stream after the decode (see :class:`DecodeHandle`).
        """
        _check_latents(z)
        if z.shape[2] == 0:
            raise ValueError("a block needs at least one latent frame")
        shape = (z.shape[0], z.shape[3], z.shape[4])
        if shape != self._shape:
            if self.latent_frames:
                raise ValueError(f"this video's latents are B, h, w = {self._shape}, the block's {shape}; "
                                 "call reset() to start a new video")
            self.state.forget()
            self._shape = shape
        self.latent_frames += z.shape[2]
        if self._cuda is None:
            frames = self._run(z)
            return DecodeHandle(frames.cpu() if to_host else frames, None)
        ready = torch.cuda.Event()  # the latents' producer: the current stream of z's device
        ready.record(torch.cuda.current_stream(z.device if z.is_cuda else self._cuda.device))
        with torch.cuda.stream(self._cuda):
            self._cuda.wait_event(ready)
            if z.device == self._cuda.device:
                z.record_stream(self._cuda)  # z's memory stays reserved until this stream has read it
            frames = self._run(z)
            if to_host:
                frames, done = to_host_async(frames)
            else:
                done = torch.cuda.Event()
                done.record(self._cuda)
        return DecodeHandle(frames, done)

    def reset(self) -> None:
        """Start a new video (queued after the decodes in flight)."""
        self._with_stream(self.state.clear)
        self.latent_frames = 0

    def synchronize(self) -> None:
        """Block the host until every queued decode of this stream is done."""
        if self._cuda is not None:
            self._cuda.synchronize()

    def _with_stream(self, fn) -> None:
        if self._cuda is None:
            fn()
        else:
            with torch.cuda.stream(self._cuda):
                fn()

    @torch.no_grad()
    def _run(self, z: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        z = to_device(z, dec.device)  # from host memory: queued on the current stream, no host wait
        b, _, t, h, w = z.shape
        count = TIME_FACTOR * t - (0 if self.state.started else TIME_FACTOR - 1)
        frames = torch.empty(b, 3, count, SPACE_FACTOR * h, SPACE_FACTOR * w, device=dec.device)
        step = self.frames_per_pass or t
        at = 0
        for start in range(0, t, step):
            if start and self.should_stop is not None and self.should_stop():
                raise Interrupted(f"stopped while decoding, after {start} of {t} latent frames")
            y = dec.decode_pass(z[:, :, start:start + step], self.state)
            self.state.started = True
            frames[:, :, at:at + y.shape[2]] = y.clamp(-1.0, 1.0)
            at += y.shape[2]
        assert at == count, f"decoded {at} frames, expected {count}"
        return frames


class LatentVideoDecoder(nn.Module):
    """What both decoders share: loading from a file or a state dict, and the streaming interface.

    Subclasses define ``decode_pass(z, state)`` (normalised latents of consecutive frames -> frames on
    the [-1, 1] scale, unclamped) and ``_weights_and_config(sd, source)``.
    """

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def decode_pass(self, z: torch.Tensor, state: CausalState) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _weights_and_config(cls, sd: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", source: str = "state dict"):
        """Build the decoder from a state dict (the widths are read from its shapes); the weights are copied.

        Raises :class:`CheckpointError` (naming ``source``) when ``sd`` does not hold this decoder.
        ``device="meta"`` only checks the weights (names and shapes) and allocates nothing.
        """
        weights, config = cls._weights_and_config(sd, source)
        with torch.device("meta"):
            model = cls(**config)
        check_weight_names(model.state_dict(), weights, source, "decoder")
        model = model.to(dtype=dtype).to_empty(device=device)
        if model.device.type != "meta":
            model.load_state_dict(weights, strict=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)  # the copies are done before any stream reads them
        return model.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu"):
        """Load from a .safetensors or .pt/.pth file, or a diffusers folder (``diffusion_pytorch_model*``
        .safetensors, see :func:`safe_io.read_weights`); see :meth:`from_state_dict`."""
        path = os.fspath(path)
        return cls.from_state_dict(read_weights(path)[0], dtype=dtype, device=device, source=path)

    def stream(self, frames_per_pass: int | None = 1,
               should_stop: Callable[[], bool] | None = None) -> StreamingDecode:
        """A new video to decode block by block (see :class:`StreamingDecode`); ``should_stop`` is
        asked between decoder passes and raises :class:`cascade_core.sampler.Interrupted` when true."""
        return StreamingDecode(self, frames_per_pass, should_stop)

    def decode(self, z: torch.Tensor, frames_per_pass: int | None = 1) -> torch.Tensor:
        """All of a video's normalised latents at once: [B,16,T,h,w] -> [B,3,1+4(T-1),8h,8w] float32 in [-1, 1]."""
        return self.stream(frames_per_pass).decode(z)


class WanVAEDecoder(LatentVideoDecoder):
    """The decoder half of the Wan2.1 VAE (``conv2`` + ``decoder``), base width ``dim`` (96 when released)."""

    def __init__(self, dim: int = 96):
        super().__init__()
        self.dim = dim
        self.conv2 = CausalConv3d(LATENT_CHANNELS, LATENT_CHANNELS, 1)
        self.decoder = Decoder3d(dim)

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
