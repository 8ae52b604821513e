"""Copies between host memory and a CUDA device that never make the host wait.

A plain ``tensor.to("cuda")`` of pageable host memory, or ``.cpu()`` of a CUDA tensor, blocks the
calling thread until the copy (for ``.cpu()``: and everything queued before it on the stream) is
done, which stalls a loop that should only queue GPU work. These helpers go through pinned
(page-locked) host memory and queue the copy on the current CUDA stream instead. Torch's pinned
memory cache does not reuse a staging buffer before the copies queued on it have run, so the
buffers may be dropped right away. Between the CPU and the CPU they are plain ``.to()`` calls.
"""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` (any shape and dtype) on ``device``.

    From host memory to a CUDA device the copy goes through a pinned buffer and is queued on that
    device's current stream without blocking the host (``x`` may be changed once this returns).
    Any other move is ``x.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    if not (x.is_pinned() and x.is_contiguous()):
        x = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
    return x.to(device, non_blocking=True)


def to_host_async(x: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """Queue a copy of ``x`` into host memory; returns (host tensor, event recorded after the copy).

    For a CUDA tensor the copy is queued on the current stream of ``x``'s device, into a new pinned
    tensor of ``x``'s shape and dtype; its values may be read only after ``event.synchronize()`` (or
    once ``event.query()`` is true). A tensor already in host memory is returned as it is, with None.
    """
    if not x.is_cuda:
        return x, None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(x.device))
    return host, done
