"""The live inputs of a video-to-video run: an HTTP MJPEG stream (:class:`MjpegSource`) or frames pushed in
(:class:`PushedSource`: the browser's webcam, through the pack's route ``nodes/live_input.py``), each a
:class:`.frame_source.FrameSource`; :func:`.sources.open_source` picks one from what the user gave.

Live sources run at the input's pace through a :class:`NewestFrames` buffer of ``capacity``
frames: when frames arrive faster than they are taken, each new frame drops the oldest one held, so
nothing queues without bound (memory: capacity x height x width x 3 bytes) and a frame handed out had at
most ``capacity - 1`` newer frames behind it. LATENCY BOUND: a frame waits in the buffer at most
capacity x the input's frame interval (LIVE_CAPACITY = 8: 0.5 s at 16 fps, 0.27 s at 30 fps), plus, when
the input is slower than the consumer, the time until a chunk's ``n`` frames have arrived.

Each frame is resized to the run's size as it comes, by :func:`.frame_source.fit_frames`.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import re
import threading
import time
import warnings
from typing import Callable

import numpy as np
import torch

from ..common.messages import first_line
from .frame_source import POLL_S, InputBrokeOff, check_size, check_take, fit_frames
from .multipart import iter_parts, mjpeg_boundary
from .vae_encode import eight_bit  # the CLI's 16-bit -> 8-bit rescale (one helper for both)

log = logging.getLogger("block_cascade")

LIVE_CAPACITY = 8  # frames a live source holds (two 4-frame chunks): the latency bound in frame intervals
MAX_PIXELS = 3840 * 2160  # the largest live frame taken (4K), refused from its header before decoding
WEBCAM = "webcam"  # what open_source takes for the browser's webcam (frames pushed through the route)
MAX_BAD_PARTS = 30  # parts in a row of an MJPEG stream that are no image before it counts as ended
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # an object's repr with its address, kept out of messages


def decode_image(data: bytes, what: str) -> np.ndarray:
    """One JPEG or PNG image (bytes) -> uint8 [h, w, 3] RGB (alpha dropped; 16-bit grey levels scaled to 8 bits
    as the CLI's image loader does, :func:`video.vae_encode.eight_bit`). An image of more than MAX_PIXELS pixels
    is refused from its header, before any pixel is decoded. Raises ValueError (one line, naming ``what``)."""
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
            return np.asarray(eight_bit(image).convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not a readable JPEG or PNG image (no image format recognised in its {len(data)} "
                         f"bytes)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{what}: not a readable JPEG or PNG image ({_ADDRESS.sub('the data', first_line(exc))})"
                         ) from None


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

    def push(self, frame: np.ndarray) -> bool:
        """Hold ``frame`` (the oldest one dropped when the buffer is full). Returns whether it was taken in: after
        the end it is ignored (False)."""
        with self._cond:
            if self.ended:
                return False
            if len(self._frames) == self.capacity:
                self.dropped += 1
            self._frames.append(frame)
            self.pushed += 1
            self._cond.notify_all()
            return True

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
        TimeoutError after ``timeout`` s without ``n`` frames, :class:`InputBrokeOff` when the input broke off
        (once fewer than ``n`` frames are left)."""
        check_take(n)
        if n > self.capacity:
            raise ValueError(f"{self.what}: {n} frames asked of a buffer that holds {self.capacity}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._frames) < n:
                if self.ended:
                    self._frames.clear()
                    if self.error:
                        raise InputBrokeOff(self.error)
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
        check_size(width, height)
        self.width, self.height, self.fps, self.what = width, height, fps, what
        self.buffer = NewestFrames(capacity, what)

    def push(self, frame) -> bool:
        """One uint8 frame [h, w, 3] (any size: resized to the run's) from any thread; whether it was taken in
        (False once the input has ended: the run is over). Raises ValueError."""
        arr = frame.cpu().numpy() if torch.is_tensor(frame) else np.asarray(frame)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape) < 1:
            raise ValueError(f"{self.what}: a frame must be uint8 [h, w, 3], got {list(arr.shape)} {arr.dtype}")
        return self.buffer.push(fit_frames(arr[None], self.width, self.height)[0])

    def push_image(self, data: bytes) -> bool:
        """One JPEG or PNG image (bytes) as the next frame; whether it was taken in (see :meth:`push`). Raises
        ValueError (see :func:`decode_image`)."""
        return self.push(decode_image(data, self.what))

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
    answer with an MJPEG stream; a stream that breaks off later (a lost connection, no data for ``timeout`` s, a
    part over its bound) makes take() raise :class:`InputBrokeOff` saying why. A part that is no image (or one too
    large) is skipped and counted in ``bad_parts``; MAX_BAD_PARTS of them in a row end the stream as its
    end would (logged in one line)."""

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
        self._boundary, self._closing, self.bad_parts = boundary, False, 0
        self._thread = threading.Thread(target=self._read, name="block-cascade-mjpeg", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        error, in_a_row = None, 0
        try:
            for data in iter_parts(self._response, self._boundary, lambda: self.buffer.ended):
                try:
                    self.push_image(data)
                    in_a_row = 0
                except ValueError as exc:  # one bad part: skipped
                    self.bad_parts, in_a_row = self.bad_parts + 1, in_a_row + 1
                    if self.bad_parts == 1:
                        log.warning("Block Cascade: skipping a part that is no image (%s)", first_line(exc))
                    if in_a_row == MAX_BAD_PARTS:
                        log.warning("Block Cascade: %s ended: its last %d parts were no image", self.what, in_a_row)
                        break
        except Exception as exc:  # noqa: BLE001 - told to the consumer through take()
            why = first_line(exc)
            error = None if self._closing else why if why.startswith(self.what) else f"{self.what}: {why}"
        self.buffer.end(error)

    def close(self) -> None:
        self._closing = True
        super().close()
        with contextlib.suppress(Exception):  # the reader may be closing it at the same time
            self._response.close()

