"""Where the pixel frames of a video-to-video run come from: a video file, ComfyUI's IMAGE batch or core
VIDEO object, an HTTP MJPEG stream, or frames pushed in (the browser's webcam, through the pack's route
``nodes/live_input.py``). :func:`open_source` picks one from what the user gave.

Every source is a :class:`FrameSource`: ``take(n)`` hands out the next ``n`` frames as uint8
[n, height, width, 3] (RGB, the run's size), waiting until there are ``n``, or None at the end of the input
or when ``should_stop()`` says so. The video-to-video engine takes 5 frames first, then 4 at a time
(StreamDiffusionV2's chunks, issue 30); frames left over at the end, fewer than ``n``, are dropped.

Finite sources (a file, IMAGE, VIDEO) hand out every frame in order, at the consumer's pace. Live sources
(MJPEG, pushed frames) run at the input's pace through a :class:`NewestFrames` buffer of ``capacity``
frames: when frames arrive faster than they are taken, each new frame drops the oldest one held, so
nothing queues without bound (memory: capacity x height x width x 3 bytes) and a frame handed out had at
most ``capacity - 1`` newer frames behind it. LATENCY BOUND: a frame waits in the buffer at most
capacity x the input's frame interval (LIVE_CAPACITY = 8: 0.5 s at 16 fps, 0.27 s at 30 fps), plus, when
the input is slower than the consumer, the time until a chunk's ``n`` frames have arrived.

Resizing happens in one place, :func:`fit_frames`: bilinear with antialiasing to exactly (height, width),
the aspect ratio not kept, as StreamDiffusionV2 reads its input (chenfengxu714/StreamDiffusionV2,
streamv2v/inference_common.py:30-58, ``TF.resize(frame, (h, w), antialias=True)`` on uint8 frames).
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import threading
import time
import warnings
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..common.messages import first_line
from ..weights.safe_io import CheckpointError
from .multipart import iter_parts, mjpeg_boundary

LIVE_CAPACITY = 8  # frames a live source holds (two 4-frame chunks): the latency bound in frame intervals
MAX_PIXELS = 3840 * 2160  # the largest live frame taken (4K), refused from its header before decoding
WEBCAM = "webcam"  # what open_source takes for the browser's webcam (frames pushed through the route)
POLL_S = 0.1  # how often a waiting take() asks should_stop()


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


def _check_n(n) -> None:
    if type(n) is not int or n < 1:
        raise ValueError(f"frames to take must be an int >= 1, got {n!r}")


def _check_size(width, height) -> None:
    if type(width) is not int or type(height) is not int or width < 1 or height < 1:
        raise ValueError(f"the run's frame size must be whole numbers >= 1, got width {width!r}, height {height!r}")


def decode_image(data: bytes, what: str) -> np.ndarray:
    """One JPEG or PNG image (bytes) -> uint8 [h, w, 3] RGB (alpha dropped). An image of more than MAX_PIXELS
    pixels is refused from its header, before any pixel is decoded. Raises ValueError (one line, naming
    ``what``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # over MAX_PIXELS is refused below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ("JPEG", "PNG"):
                raise ValueError(f"{what}: a frame must be a JPEG or PNG image, got {image.format}")
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{what}: a frame of {w}x{h} pixels is over the {MAX_PIXELS} pixels taken (4K)")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{what}: not a readable JPEG or PNG image ({first_line(exc)})") from None


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
        _check_size(width, height)
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
        _check_n(n)
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
        _check_size(width, height)
        self._images = check_image_batch(images, what)
        self.width, self.height, self.fps, self.frames, self._at = width, height, fps, int(self._images.shape[0]), 0

    def take(self, n: int, timeout: float | None = None, should_stop: Callable[[], bool] | None = None):
        """See :class:`FrameSource`."""
        _check_n(n)
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


class NewestFrames:
    """A bounded buffer of the newest frames, filled by one thread and taken by another (see the module
    docstring for the latency bound). ``pushed``/``dropped`` count frames put in / dropped unseen."""

    def __init__(self, capacity: int = LIVE_CAPACITY, what: str = "live input"):
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"{what}: the buffer's capacity must be an int >= 1 (frames), got {capacity!r}")
        self.capacity, self.what = capacity, what
        self._frames: collections.deque[np.ndarray] = collections.deque(maxlen=capacity)
        self._cond = threading.Condition()
        self.pushed = self.dropped = 0
        self.ended, self.error = False, None

    def push(self, frame: np.ndarray) -> None:
        """Hold ``frame`` (the oldest one dropped when the buffer is full); after the end it is ignored."""
        with self._cond:
            if self.ended:
                return
            if len(self._frames) == self.capacity:
                self.dropped += 1
            self._frames.append(frame)
            self.pushed += 1
            self._cond.notify_all()

    def end(self, error: str | None = None) -> None:
        """No more frames (``error``: one line saying why the input broke off). The frames held can still be taken."""
        with self._cond:
            if not self.ended:
                self.ended, self.error = True, error
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._frames)

    def held_bytes(self) -> int:
        """Bytes of the frames held now (at most capacity x one frame's)."""
        return sum(f.nbytes for f in list(self._frames))

    def take(self, n: int, timeout: float | None = None,
             should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """The oldest ``n`` frames held, stacked [n, ...], waiting until there are ``n``; None at the end or once
        ``should_stop()`` is true (asked every POLL_S s). Raises ValueError for ``n`` above the capacity,
        TimeoutError after ``timeout`` s without ``n`` frames, RuntimeError when the input broke off."""
        _check_n(n)
        if n > self.capacity:
            raise ValueError(f"{self.what}: {n} frames asked of a buffer that holds {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._frames) < n:
                if self.ended:
                    self._frames.clear()
                    if self.error:
                        raise RuntimeError(self.error)
                    return None
                if should_stop is not None and should_stop():
                    return None
                wait = POLL_S if should_stop is not None else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{self.what}: {len(self._frames)} of {n} frames came in {timeout:g} s")
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return np.stack([self._frames.popleft() for _ in range(n)])


class PushedSource:
    """Frames pushed in by another thread (the webcam route: :meth:`push_image` with each posted JPEG/PNG),
    through a :class:`NewestFrames` buffer of ``capacity`` frames, resized to the run's size as they come."""

    live, frames = True, None

    def __init__(self, width: int, height: int, capacity: int = LIVE_CAPACITY, what: str = WEBCAM,
                 fps: float | None = None):
        _check_size(width, height)
        self.width, self.height, self.fps, self.what = width, height, fps, what
        self.buffer = NewestFrames(capacity, what)

    def push(self, frame) -> None:
        """One uint8 frame [h, w, 3] (any size: resized to the run's) from any thread. Raises ValueError."""
        arr = frame.cpu().numpy() if torch.is_tensor(frame) else np.asarray(frame)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape) < 1:
            raise ValueError(f"{self.what}: a frame must be uint8 [h, w, 3], got {list(arr.shape)} {arr.dtype}")
        self.buffer.push(fit_frames(arr[None], self.width, self.height)[0])

    def push_image(self, data: bytes) -> None:
        """One JPEG or PNG image (bytes) as the next frame. Raises ValueError (see :func:`decode_image`)."""
        self.push(decode_image(data, self.what))

    def take(self, n: int, timeout: float | None = None, should_stop: Callable[[], bool] | None = None):
        """See :class:`FrameSource` and :meth:`NewestFrames.take`."""
        out = self.buffer.take(n, timeout, should_stop)
        return None if out is None else torch.from_numpy(out)

    def close(self) -> None:
        self.buffer.end()


class MjpegSource(PushedSource):
    """An HTTP MJPEG stream (``multipart/x-mixed-replace``, each part one JPEG, read by urllib on a reader
    thread, part by part by :func:`video.multipart.iter_parts`, decoded with Pillow) through a
    :class:`NewestFrames` buffer. Raises ValueError (one line) for a URL that cannot be opened or does not
    answer with an MJPEG stream; a stream that breaks off later (a part that is no image, a lost connection,
    no data for ``timeout`` s) makes take() raise RuntimeError saying why."""

    def __init__(self, url: str, width: int, height: int, capacity: int = LIVE_CAPACITY, timeout: float = 10.0):
        import urllib.error
        import urllib.request

        super().__init__(width, height, capacity, f"MJPEG stream {url}")
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{url}: an MJPEG stream's URL starts with http:// or https://")
        try:
            self._response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ValueError(f"{url}: could not open it ({first_line(exc)})") from None
        ctype = self._response.headers.get("Content-Type", "")
        boundary = mjpeg_boundary(ctype)
        if boundary is None:
            self._response.close()
            raise ValueError(f"{url}: not an MJPEG stream (Content-Type {ctype or 'missing'}; expected "
                             f"multipart/x-mixed-replace with a boundary)")
        self._boundary, self._closing = boundary, False
        self._thread = threading.Thread(target=self._read, name="block-cascade-mjpeg", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        error = None
        try:
            for data in iter_parts(self._response, self._boundary, lambda: self.buffer.ended):
                self.push_image(data)
        except Exception as exc:  # noqa: BLE001 - told to the consumer through take()
            why = first_line(exc)
            error = None if self._closing else why if why.startswith(self.what) else f"{self.what}: {why}"
        self.buffer.end(error)

    def close(self) -> None:
        self._closing = True
        super().close()
        with contextlib.suppress(Exception):  # the reader may be closing it at the same time
            self._response.close()


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
