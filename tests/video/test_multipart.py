"""An MJPEG body read part by part (cascade_core/video/multipart.py), from bytes in memory.

What this proves: a line is a delimiter only when it is ``--`` and the boundary (any extra leading dashes
allowed, trailing whitespace ignored) and the close delimiter only when that is followed by ``--``, so a boundary
that ends in dashes (RFC 2046 allows them) reads every part, with or without Content-Length, and a line that
only starts like the delimiter is data; the close delimiter ends the body.
"""
from __future__ import annotations

import io

import pytest

from cascade_core.video.multipart import delimiter, iter_parts, mjpeg_boundary


@pytest.mark.parametrize("line, boundary, kind", [
    (b"--frame\r\n", b"frame", "open"),
    (b"--frame--\r\n", b"frame", "close"),
    (b"--frame \t\r\n", b"frame", "open"),
    (b"----frame\r\n", b"frame", "open"),  # a server that repeats the parameter's own leading dashes
    (b"--frame-\r\n", b"frame-", "open"),
    (b"--frame---\r\n", b"frame-", "close"),
    (b"--frame-\r\n", b"frame", None),
    (b"--frame\r\n", b"frame-", None),
    (b"--frame---\r\n", b"frame", None),
    (b"--a--b\r\n", b"a--b", "open"),
    (b"--a--b--\r\n", b"a--b", "close"),
    (b"frame\r\n", b"frame", None),
    (b"--frames\r\n", b"frame", None),
    (b"", b"frame", None),
])
def test_a_line_is_a_delimiter_a_close_delimiter_or_data(line, boundary, kind):
    assert delimiter(line, boundary) == kind


def body(parts, boundary: bytes, lengths) -> bytes:
    out = b"preamble\r\n"
    for data, with_length in zip(parts, lengths):
        head = b"Content-Type: image/jpeg\r\n" + (b"Content-Length: %d\r\n" % len(data) if with_length else b"")
        out += b"--" + boundary + b"\r\n" + head + b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue\r\n"


@pytest.mark.parametrize("boundary", [b"frame", b"frame-", b"frame--", b"a--b"])
@pytest.mark.parametrize("lengths", [(True,) * 3, (False,) * 3, (True, False, True)])
def test_every_part_is_read_whatever_dashes_the_boundary_ends_in(boundary, lengths):
    # data lines that start like the delimiter but are not it stay in the part
    parts = [b"one\r\n--" + boundary + b"x\r\nmore", b"two", b"three\r\n--" + boundary + b"-"]
    ctype = f"multipart/x-mixed-replace; boundary={boundary.decode()}"
    got = list(iter_parts(io.BytesIO(body(parts, mjpeg_boundary(ctype), lengths)), mjpeg_boundary(ctype)))
    assert got == parts


def test_the_close_delimiter_ends_the_body():
    data = body([b"one"], b"frame-", [False]) + b"--frame-\r\n\r\nafter the close\r\n"
    assert list(iter_parts(io.BytesIO(data), b"frame-")) == [b"one"]
