"""What every source of a video-to-video run's pixel frames shares: the :class:`FrameSource` protocol, the one
resize (:func:`fit_frames`), the step to the VAE encoder's input (:func:`to_pixels`), the checks of take()'s and
the run's size arguments, and :class:`InputBrokeOff`. The live sources are in :mod:`.live_sources`, the finite
ones and :func:`.sources.open_source`, which picks one, in :mod:`.sources`.

Every source is a :class:`FrameSource`: ``take(n)`` hands out the next ``n`` frames as uint8
[n, height, width, 3] (RGB, the run's size), waiting until there are ``n``, or None at the end of the input
or when ``should_stop()`` says so. The video-to-video engine takes 5 frames first, then 4 at a time
(StreamDiffusionV2's chunks, issue 30); frames left over at the end, fewer than ``n``, are dropped.

Resizing happens in one place, :func:`fit_frames`: bilinear with antialiasing to exactly (height, width),
the aspect ratio not kept, as StreamDiffusionV2 reads its input (chenfengxu714/StreamDiffusionV2,
streamv2v/inference_common.py:30-58, ``TF.resize(frame, (h, w), antialias=True)`` on uint8 frames).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

POLL_S = 0.1  # how often a waiting take() asks should_stop()


class InputBrokeOff(RuntimeError):
    """A live input ended with an error (a lost connection, no data in time, a part over its bound); the message
    is one line saying why. Raised by a live source's take() once the frames before it were handed out."""


@runtime_checkable
class FrameSource(Protocol):
    """The pixel frames of a run. ``width``, ``height``: the run's size (every frame is resized to it);
    ``fps``: the input's frame rate when known, else None; ``frames``: how many frames the input holds when
    known in advance (IMAGE, VIDEO, most files), else None; ``live``: frames arrive in real time (newest kept)."""

    width: int
    height: int
    fps: float | None
    frames: int | None
    live: bool

    def take(self, n: int, timeout: float | None = None, should_stop: Callable[[], bool] | None = None):
        """The next ``n`` frames, uint8 [n, height, width, 3], waiting for them (at most ``timeout`` s, then
        TimeoutError); None at the end of the input or once ``should_stop()`` is true."""

    def close(self) -> None:
        """Let go of the input (file, connection, thread); a waiting take() returns None."""


def fit_frames(frames, width: int, height: int) -> np.ndarray:
    """uint8 frames [n, h, w, 3] (numpy or torch) -> a new uint8 numpy array [n, height, width, 3]: a copy
    when the size matches, else resized bilinearly with antialiasing (computed in float32, rounded), the
    aspect ratio not kept (StreamDiffusionV2's resize, see the module docstring)."""
    arr = np.array(frames.cpu().numpy() if torch.is_tensor(frames) else frames, dtype=np.uint8, order="C")  # a copy
    if arr.shape[1:3] == (height, width):
        return arr
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_pixels(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [n, H, W, 3] -> [1, 3, n, H, W] on the [-1, 1] scale in ``dtype``, the VAE encoder's input:
    x / 127.5 - 1 computed in float32, then cast (StreamDiffusionV2's order: ``load_mp4_as_tensor`` scales the
    float32 video, inference_common.py:53-56, and main() casts it to bf16, inference_wo_batch.py:419-421)."""
    return (frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0).to(dtype).contiguous()


def check_take(n) -> None:
    """take()'s ``n``, the frames asked for: an int >= 1, else ValueError (one line)."""
    if type(n) is not int or n < 1:
        raise ValueError(f"frames to take must be an int >= 1, got {n!r}")


def check_size(width, height) -> None:
    """The run's frame size in pixels: whole numbers >= 1, else ValueError (one line)."""
    if type(width) is not int or type(height) is not int or width < 1 or height < 1:
        raise ValueError(f"the run's frame size must be whole numbers >= 1, got width {width!r}, height {height!r}")
