"""Streaming decode shared by the Wan VAE decoders (:mod:`video.vae`, :mod:`video.vae22`) and the taew preview
decoders (:mod:`video.taew`): the causal memory one video's decode keeps between calls, the decoder base class
(loading from a file or a state dict) and the stream that decodes latent blocks one after another.

Guarantees: a :class:`CausalState` holds, per temporal layer, the input frames a later call needs
(zeros before the first frame, which is the zero padding of one causal convolution over the whole
video), so decoding block by block with one :class:`StreamingDecode` equals one decode of
everything, up to floating-point summation order. On CUDA each stream decodes on its own CUDA
stream, ordered after the caller's queued work (see :class:`StreamingDecode`).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..common.transfer import to_device, to_host_async
from ..sampling.loop import Interrupted
from ..weights.safe_io import read_weights
from ..weights.vae_names import check_weight_names
from .latents import WAN21_LATENTS, LatentSpace

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

    def with_past(self, layer: nn.Module, x: torch.Tensor, n: int, dim: int,
                  fill: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
        """``x`` with the ``n`` frames that came before it put in front along ``dim`` (time).

        With ``fill``, ``x`` gives only the shape, dtype and device: ``fill(room)`` writes this call's
        frames into ``room``, the view of the result behind the past frames, which saves copying them
        there. Remembers the last ``n`` frames of the result for ``layer``'s next call.
        """
        past = self._frames.get(layer)
        if past is None:
            shape = list(x.shape)
            shape[dim] = n
            past = self._frames[layer] = x.new_zeros(shape)
        joined = x.new_empty(x.shape[:dim] + (n + x.shape[dim],) + x.shape[dim + 1:])  # time: n + T
        joined.narrow(dim, 0, n).copy_(past)
        room = joined.narrow(dim, n, x.shape[dim])
        fill(room) if fill is not None else room.copy_(x)
        past.copy_(joined.narrow(dim, x.shape[dim], n))
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

    On CUDA the work runs on this object's own CUDA stream, of high priority (the GPU's block scheduler picks its
    kernels before those of normal-priority streams, such as the DiT's):
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
        # high priority: a block's decode runs ahead of the DiT kernels queued after it (the next block's), so its
        # frames come out a decode's time after its latents, not after the GPU has shared out the next block's work
        self._cuda = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Frames of the next block (see :meth:`decode_async`), ready on the caller's current stream."""
        return self.decode_async(z).result()

    def decode_async(self, z: torch.Tensor, to_host: bool = False) -> DecodeHandle:
        """Queue the decode of the next block of normalised latents z [B, C, T, h, w] of the decoder's latent space
        (:attr:`LatentVideoDecoder.latent_space`: C = 16, s = 8 for Wan2.1; C = 48, s = 16 for Wan2.2).

        The handle's frames are [B, 3, F, s*h, s*w] float32 in [-1, 1], F = 1 + 4(T-1) for the video's
        first block and 4T after. With ``to_host`` they are in host memory: on CUDA a copy into a
        pinned buffer is queued on this object's stream after the decode (see :class:`DecodeHandle`).
        """
        self.decoder.latent_space.check(z)
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
        space = dec.latent_space
        count = space.temporal * t - (0 if self.state.started else space.temporal - 1)
        frames = torch.empty(b, 3, count, space.spatial * h, space.spatial * w, device=dec.device)
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
    """What the decoders share: loading from a file or a state dict, and the streaming interface.

    Subclasses define ``decode_pass(z, state)`` (normalised latents of consecutive frames -> frames on
    the [-1, 1] scale, unclamped) and ``_weights_and_config(sd, source)``, and set ``latent_space`` when
    they decode other latents than Wan2.1's.
    """

    latent_space: LatentSpace = WAN21_LATENTS  # the latents it decodes (channels, normalisation, compression)
    pass_frames: int | None = None  # latent frames a pass of FrameStream's decodes (None: a whole block)

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
        .safetensors, see :func:`weights.safe_io.read_weights`); see :meth:`from_state_dict`."""
        path = os.fspath(path)
        return cls.from_state_dict(read_weights(path)[0], dtype=dtype, device=device, source=path)

    def stream(self, frames_per_pass: int | None = 1,
               should_stop: Callable[[], bool] | None = None) -> StreamingDecode:
        """A new video to decode block by block (see :class:`StreamingDecode`); ``should_stop`` is
        asked between decoder passes and raises :class:`cascade_core.sampling.loop.Interrupted` when true."""
        return StreamingDecode(self, frames_per_pass, should_stop)

    def decode(self, z: torch.Tensor, frames_per_pass: int | None = 1) -> torch.Tensor:
        """All of a video's normalised latents at once: [B,C,T,h,w] -> [B,3,1+4(T-1),s*h,s*w] float32 in [-1, 1]
        (C, s: :attr:`latent_space`'s channels and spatial factor)."""
        return self.stream(frames_per_pass).decode(z)
