"""Frames out while the DiT goes on.

:class:`FrameStream` takes each finished block from the sampler (``on_block``), queues its decode on
the VAE's own CUDA stream (so it overlaps the next ticks' DiT work), and hands the frames out in
block order as they become ready (``poll`` from ``on_tick``; ``finish`` at the end):

    frames = FrameStream(decoder, on_frames=show)
    result = generate(..., on_block=frames.push, on_tick=frames.poll)
    video = frames.finish()

Guarantees: frames of block b are handed out after those of block b-1, each exactly once; the frame
indices are those of one decode of the whole video (1 + 4(n-1) frames for the first block of n latent
frames, 4n after); on the CPU everything runs at once.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .sampler import BlockEvent


def video_frames(latent_frames: int) -> int:
    """Wan's VAE: the first latent frame gives 1 video frame, each later one 4."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


@dataclass(frozen=True)
class FramesEvent:
    block: int
    first_frame: int  # index in the video of frames[:, :, 0]
    frames: torch.Tensor  # [1, 3, F, H, W] float32 in [-1, 1], on the decoder's device
    seconds: float  # since the stream was created


class FrameStream:
    """See the module docstring."""

    def __init__(self, decoder, on_frames: Callable[[FramesEvent], None] | None = None, keep: bool = True,
                 frames_per_pass: int | None = None, should_stop: Callable[[], bool] | None = None):
        # a whole block per decoder pass: faster than one latent frame per pass on an H100 at 832x480
        # (bench --vae times both), for a few GB more activation memory. With ``should_stop`` on the
        # CPU, where a decode holds the caller, one latent frame per pass, and a stop is looked for
        # between passes (raising cascade_core.sampler.Interrupted).
        if should_stop is not None and frames_per_pass is None and torch.device(decoder.device).type == "cpu":
            frames_per_pass = 1
        self.stream = decoder.stream(frames_per_pass, should_stop)
        self.on_frames, self.keep = on_frames, keep
        self.pending: list[tuple[int, object]] = []  # (block, DecodeHandle), in block order
        self.kept: list[torch.Tensor] = []
        self.next_frame = 0
        self.start = time.perf_counter()

    def push(self, event: BlockEvent) -> None:
        """Queue the decode of a finished block (blocks arrive in order)."""
        self.pending.append((event.block, self.stream.decode_async(event.latents)))

    def poll(self, _event=None, wait: bool = False) -> None:
        """Hand out the frames of every block whose decode is done (all of them if ``wait``)."""
        while self.pending and (wait or self.pending[0][1].ready()):
            block, handle = self.pending.pop(0)
            frames = handle.result()
            if self.keep:
                self.kept.append(frames)
            if self.on_frames is not None:
                self.on_frames(FramesEvent(block, self.next_frame, frames, time.perf_counter() - self.start))
            self.next_frame += frames.shape[2]

    def finish(self) -> torch.Tensor | None:
        """Wait for the last decodes; with ``keep``, all frames [1, 3, F, H, W] (else None)."""
        self.poll(wait=True)
        return torch.cat(self.kept, 2) if self.keep and self.kept else None


def load_decoder(path: str, dtype: torch.dtype, device: torch.device | str):
    """A taew2_1 file -> the tiny preview decoder; anything else -> WanVAEDecoder (a Wan2.1 VAE file or
    diffusers folder; other files raise its :class:`CheckpointError`, which says what they are)."""
    from .safe_io import read_weights
    from .taew import TinyWanDecoder
    from .vae import WanVAEDecoder

    sd = read_weights(path)[0]
    tiny = isinstance(sd, dict) and any(k.endswith("decoder.22.weight") for k in sd)
    cls = TinyWanDecoder if tiny else WanVAEDecoder
    return cls.from_state_dict(sd, dtype=dtype, device=device, source=path)


class LatentRGBDecoder:
    """A decoder-shaped cheap preview: a linear map of the 16 latent channels to RGB, upscaled 8x.

    ``factors`` [16, 3] and ``bias`` [3] map normalised (DiT-space) latents to RGB in [-1, 1]
    (ComfyUI's latent formats carry such tables for their sampler previews, in that space). Same streaming interface and frame counts as
    the real decoders (first latent frame -> 1 frame, later ones -> 4 by repetition), so FrameStream
    takes it unchanged; without factors it shows the channel mean in grey.
    """

    def __init__(self, factors=None, bias=None, device: torch.device | str = "cpu"):
        self.factors = None if factors is None else torch.as_tensor(factors, dtype=torch.float32)
        self.bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        self.device = torch.device(device)

    def stream(self, frames_per_pass=None, should_stop=None) -> "LatentRGBDecoder._Stream":
        """A new video (a preview decode is instant: nothing to stop)."""
        return LatentRGBDecoder._Stream(self)

    def rgb(self, z: torch.Tensor, first_block: bool) -> torch.Tensor:
        """Normalised latents [1, 16, T, h, w] -> frames [1, 3, F, 8h, 8w] in [-1, 1]."""
        z = z[0].float().cpu()  # [16, T, h, w]
        if self.factors is not None and self.factors.shape[0] == z.shape[0]:
            rgb = torch.einsum("cthw,cr->trhw", z, self.factors)
            rgb = rgb if self.bias is None else rgb + self.bias.view(1, 3, 1, 1)
        else:
            rgb = z.mean(0, keepdim=True).transpose(0, 1).expand(-1, 3, -1, -1) * 0.5
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False)
        repeats = torch.full((rgb.shape[0],), 4, dtype=torch.long)
        repeats[0] = 1 if first_block else 4
        frames = rgb.repeat_interleave(repeats, dim=0)  # [F, 3, H, W]
        return frames.permute(1, 0, 2, 3).unsqueeze(0).clamp(-1, 1).to(self.device)

    class _Stream:
        def __init__(self, decoder: "LatentRGBDecoder"):
            self.decoder, self.started = decoder, False

        def decode_async(self, z: torch.Tensor) -> "_Done":
            frames = self.decoder.rgb(z, first_block=not self.started)
            self.started = True
            return _Done(frames)


class _Done:
    """A decode that finished at once (the DecodeHandle interface)."""

    def __init__(self, frames: torch.Tensor):
        self.frames = frames

    def ready(self) -> bool:
        return True

    def result(self) -> torch.Tensor:
        return self.frames


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 on the CPU."""
    return ((frames[0].permute(1, 2, 3, 0).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


class VideoWriter:
    """An H.264 MP4 written frame by frame (PyAV), and optionally each frame as a PNG in a folder."""

    def __init__(self, path: str | None, fps: int = 16, frames_dir: str | None = None):
        self.path, self.fps, self.frames_dir = path, fps, frames_dir
        self.container = self.video = None
        self.count = 0
        if frames_dir:
            os.makedirs(frames_dir, exist_ok=True)

    def write(self, event: FramesEvent) -> None:
        pixels = to_uint8_frames(event.frames)  # [F, H, W, 3]
        if self.path and self.container is None:
            self._open(pixels.shape[2], pixels.shape[1])
        for i, frame in enumerate(pixels.numpy()):
            if self.container is not None:
                for packet in self.video.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self.container.mux(packet)
            if self.frames_dir:
                from PIL import Image  # Pillow comes with ComfyUI and with PyAV's usual installs
                Image.fromarray(frame).save(os.path.join(self.frames_dir, f"{event.first_frame + i:05d}.png"))
        self.count += len(pixels)

    def _open(self, width: int, height: int) -> None:
        try:
            import av
        except ImportError:
            raise RuntimeError("writing MP4 needs PyAV: pip install av") from None
        self._av = av
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.container = av.open(self.path, mode="w")
        self.video = self.container.add_stream("libx264", rate=self.fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"

    def close(self) -> None:
        if self.container is not None:
            for packet in self.video.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None
