"""Where the pixel frames of a video-to-video run come from: the finite sources, a video file
(:class:`FileSource`), ComfyUI's IMAGE batch (:class:`ImageBatchSource`) or core VIDEO (:func:`video_source`),
and :func:`open_source`, which picks any source from what the user gave, the live ones of
:mod:`.live_sources` (an HTTP MJPEG stream, the browser's webcam) included. What every source shares (the
:class:`.frame_source.FrameSource` protocol, the resize) is in :mod:`.frame_source`.

Finite sources hand out every frame in order, at the consumer's pace; each frame is resized to the run's size
by :func:`.frame_source.fit_frames` (StreamDiffusionV2's resize: chenfengxu714/StreamDiffusionV2,
streamv2v/inference_common.py:30-58).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from ..common.messages import first_line
from ..weights.safe_io import CheckpointError
from .frame_source import FrameSource, check_size, check_take, fit_frames
from .live_sources import LIVE_CAPACITY, WEBCAM, MjpegSource, PushedSource


def _open_video(path: str):
    """(PyAV container, its first video stream) of the file ``path``; CheckpointError naming it when it is
    missing, not a video or holds no video stream."""
    import av

    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable video ({first_line(exc)})") from None
    if not container.streams.video:
        container.close()
        raise CheckpointError(path, "holds no video stream")
    return container, container.streams.video[0]


def count_frames(path: str | os.PathLike) -> int:
    """The frames a video file decodes into (one pass over it, nothing kept or resized: a container's own
    frame count is not always given, nor always right). CheckpointError naming the file as
    :class:`FileSource`."""
    import av

    path = os.fspath(path)
    container, stream = _open_video(path)
    with container:
        try:
            return sum(1 for _ in container.decode(stream))
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise CheckpointError(path, f"not a readable video ({first_line(exc)})") from None


class FileSource:
    """The frames of a video file (MP4, WebM, ...; the first video stream, decoded by PyAV) in order.
    Raises :class:`CheckpointError` (a ValueError naming the file) when it is missing, not a video, holds no
    video stream or frame (checked here: its first frame is decoded), or fails to decode later on."""

    live = False

    def __init__(self, path: str | os.PathLike, width: int, height: int):
        check_size(width, height)
        self.path, self.width, self.height = os.fspath(path), width, height
        self._container, stream = _open_video(self.path)
        self.fps = float(stream.average_rate) if stream.average_rate else None
        self.frames = stream.frames or None  # 0 where the container does not say
        self._decoded = self._container.decode(stream)
        self._ahead: list[np.ndarray] = []  # frames decoded, not yet taken
        first = self._next()
        if first is None:
            self.close()
            raise CheckpointError(self.path, "holds no video frames")
        self._ahead.append(first)

    def _next(self) -> np.ndarray | None:
        import av

        if self._decoded is None:
            return None
        try:
            frame = next(self._decoded)
        except StopIteration:
            self.close()
            return None
        except (av.FFmpegError, OSError, ValueError) as exc:
            self.close()
            raise CheckpointError(self.path, f"not a readable video ({first_line(exc)})") from None
        return fit_frames(frame.to_ndarray(format="rgb24")[None], self.width, self.height)[0]

    def take(self, n: int, timeout: float | None = None, should_stop: Callable[[], bool] | None = None):
        """See :class:`FrameSource` (a file is read at the consumer's pace: ``timeout`` is not needed)."""
        check_take(n)
        while len(self._ahead) < n and (should_stop is None or not should_stop()) and \
                (frame := self._next()) is not None:
            self._ahead.append(frame)
        if len(self._ahead) < n:
            self._ahead.clear()
            return None
        out, self._ahead = self._ahead[:n], self._ahead[n:]
        return torch.from_numpy(np.stack(out))

    def close(self) -> None:
        self._decoded = None
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            container.close()


def check_image_batch(images, what: str = "IMAGE") -> torch.Tensor:
    """ComfyUI's IMAGE: a float tensor [N, H, W, 3] on the 0..1 scale, N, H, W >= 1 (a numpy array is
    taken as well). Returns it as a tensor; raises ValueError (one line) for anything else."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise ValueError(f"{what}: expected an IMAGE batch [N, H, W, 3] of floats in 0..1, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[-1] != 3 or min(images.shape[:3]) < 1 or not images.is_floating_point():
        raise ValueError(f"{what}: expected an IMAGE batch [N, H, W, 3] of floats in 0..1, got "
                         f"{list(images.shape)} {str(images.dtype).replace('torch.', '')}")
    return images


class ImageBatchSource:
    """The frames of an IMAGE batch [N, H, W, 3] (0..1) in order, each rounded to uint8 and resized when
    taken (the batch itself is not copied). Raises ValueError for a batch of the wrong shape or type."""

    live = False

    def __init__(self, images, width: int, height: int, fps: float | None = None, what: str = "IMAGE"):
        check_size(width, height)
        self._images = check_image_batch(images, what)
        self.width, self.height, self.fps, self.frames, self._at = width, height, fps, int(self._images.shape[0]), 0

    def take(self, n: int, timeout: float | None = None, should_stop: Callable[[], bool] | None = None):
        """See :class:`FrameSource`."""
        check_take(n)
        if self._at + n > self.frames or (should_stop is not None and should_stop()):
            self._at = self.frames
            return None
        chunk = self._images[self._at:self._at + n].detach().to("cpu", torch.float32)
        self._at += n
        return torch.from_numpy(fit_frames((chunk.clamp(0, 1) * 255).round_().to(torch.uint8), self.width,
                                           self.height))

    def close(self) -> None:
        self._at = self.frames


def video_source(video, width: int, height: int) -> ImageBatchSource:
    """Core ComfyUI's VIDEO (``comfy_api.input.VideoInput``: ``get_components()`` -> VideoComponents with
    ``images`` [N, H, W, 3] in 0..1 and ``frame_rate``, a Fraction; duck-typed, ComfyUI is not imported)
    as a source. Raises ValueError for an object without get_components() or with images of the wrong shape."""
    get = getattr(video, "get_components", None)
    if not callable(get):
        raise ValueError(f"video: expected a core VIDEO (an object with get_components(), e.g. from Load Video), "
                         f"got {type(video).__name__}")
    parts = get()
    rate = getattr(parts, "frame_rate", None)
    return ImageBatchSource(getattr(parts, "images", None), width, height, float(rate) if rate else None,
                            what="the VIDEO's images")


def open_source(given, width: int, height: int, *, capacity: int = LIVE_CAPACITY) -> FrameSource:
    """The frame source of a run from what the user gave: an IMAGE batch (tensor [N, H, W, 3]), a core
    VIDEO (an object with get_components()), ``"webcam"`` (WEBCAM: a :class:`PushedSource` the webcam route
    fills), an ``http(s)://`` URL (an MJPEG stream) or a video file's path. Frames come at ``width`` x
    ``height``; live sources hold ``capacity`` frames. Raises ValueError (one line) for anything else and
    for the bad inputs each source refuses, before any model work."""
    if isinstance(given, str) and given == WEBCAM:
        return PushedSource(width, height, capacity)
    if isinstance(given, str) and given.lower().startswith(("http://", "https://")):
        return MjpegSource(given, width, height, capacity)
    if isinstance(given, (str, os.PathLike)):
        return FileSource(given, width, height)
    if torch.is_tensor(given) or isinstance(given, np.ndarray):
        return ImageBatchSource(given, width, height)
    if callable(getattr(given, "get_components", None)):
        return video_source(given, width, height)
    raise ValueError(f"video input: expected an IMAGE batch, a VIDEO, a video file, an http(s) MJPEG URL or "
                     f"{WEBCAM!r}, got {type(given).__name__}")
