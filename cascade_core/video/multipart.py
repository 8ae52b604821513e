"""Reading an HTTP MJPEG stream's body (``multipart/x-mixed-replace``) part by part, for
:class:`video.live_sources.MjpegSource`: the boundary from the Content-Type, then each part's bytes. Bounded: a part
(MAX_PART bytes) and a header line (MAX_LINE bytes).
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Iterator

MAX_PART = 16 * 1024 * 1024  # bytes of one MJPEG part
MAX_LINE = 4096  # bytes of one line of an MJPEG part's headers


def mjpeg_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/x-mixed-replace; boundary=...`` Content-Type (quotes and leading
    dashes dropped), or None when it is not one."""
    kind, *params = [p.strip() for p in (content_type or "").split(";")]
    if kind.lower() != "multipart/x-mixed-replace":
        return None
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"').lstrip("-"):
            return value.strip().strip('"').lstrip("-").encode("latin-1")
    return None


def delimiter(line: bytes, boundary: bytes) -> str | None:
    """What a body line is (RFC 2046 5.1.1): "open" for a delimiter (``--`` + boundary), "close" for the close
    delimiter (the same followed by ``--``), None for any other line. Trailing whitespace is ignored; so are any
    dashes past the first two before the boundary (``boundary`` has its leading dashes dropped, as
    :func:`mjpeg_boundary` gives it, and servers differ on repeating them). A boundary may end in dashes itself:
    for "frame-" the delimiter is ``--frame-`` and the close ``--frame---``."""
    mark = line.rstrip()
    if not mark.startswith(b"--"):
        return None
    body = mark.lstrip(b"-")
    return "open" if body == boundary else "close" if body == boundary + b"--" else None


def iter_parts(r: BinaryIO, boundary: bytes, stop: Callable[[], bool] = lambda: False) -> Iterator[bytes]:
    """The bytes of each part of the multipart body ``r`` (readline/read), until its closing boundary, the end
    of the data or ``stop()``. A part with a Content-Length is read by it, others up to the next boundary line
    (the CRLF before that line not included). Raises ValueError for a part over MAX_PART bytes; what ``r``
    raises (a lost connection, a timeout) goes through."""
    at_part = False
    while not stop():
        if not at_part:  # skip to the next boundary line
            line = r.readline(MAX_PART)
            kind = delimiter(line, boundary)
            if not line or kind == "close":
                return  # the end of the stream
            at_part = kind == "open"
            continue
        headers = {}
        while (line := r.readline(MAX_LINE)).strip():
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if not line:
            return
        length = headers.get("content-length", "")
        if length.isdigit():
            if int(length) > MAX_PART:
                raise ValueError(f"a part of {length} bytes is over {MAX_PART}")
            data, at_part = r.read(int(length)), False
        else:
            lines, size, kind = [], 0, None
            while (line := r.readline(MAX_PART)) and not (kind := delimiter(line, boundary)):
                lines.append(line)
                size += len(line)
                if size > MAX_PART:
                    raise ValueError(f"a part is over {MAX_PART} bytes")
            data, at_part = b"".join(lines).removesuffix(b"\n").removesuffix(b"\r"), kind == "open"
            if not line or kind == "close":
                yield data
                return  # the part ran to the end of the stream
        yield data
