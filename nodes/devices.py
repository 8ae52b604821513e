"""Every decision about devices, in one place.

- :func:`parse` turns the config's ``devices`` text ("auto", "cpu", "cuda:0", "cuda:0,cuda:1") into a
  list of torch devices, checking that each is present (a pure function of the text and of what is
  installed, so it runs at validation time).
- :func:`runner` is the one place where one device and several part: one device runs the engine in
  ComfyUI's process, several run through cascade_core.distributed's persistent worker pool (one
  process per GPU, the KV pool shared over NCCL), with the same arguments and result.
- :func:`check_free_memory` refuses a run whose estimate does not fit, naming every GPU and its free
  memory.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

GIB = 1024 ** 3


def _comfy_mm():
    try:
        import comfy.model_management as mm
        return mm
    except ImportError:  # only outside ComfyUI (engine scripts)
        return None


def default_device() -> torch.device:
    """ComfyUI's own choice (honours --cpu, --cuda-device, ...); else CUDA when present."""
    mm = _comfy_mm()
    if mm is not None and hasattr(mm, "get_torch_device"):
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_bytes(device: torch.device) -> int:
    """Free memory of a device as ComfyUI counts it (device free + torch's cached but unused)."""
    mm = _comfy_mm()
    if mm is not None and hasattr(mm, "get_free_memory"):
        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return 1 << 62


def describe_cuda(count: int | None = None, free: Callable[[torch.device], int] | None = None) -> str:
    """'cuda:0 (NVIDIA H100, 71.2 GiB free), cuda:1 (...)' or 'no CUDA device'."""
    count = cuda_count() if count is None else count
    free = free or free_bytes
    if count == 0:
        return "no CUDA device"
    parts = []
    for i in range(count):
        d = torch.device("cuda", i)
        try:
            name = torch.cuda.get_device_name(i)
        except Exception:  # noqa: BLE001 - a name is decoration only
            name = "GPU"
        parts.append(f"cuda:{i} ({name}, {free(d) / GIB:.1f} GiB free)")
    return ", ".join(parts)


def parse(spec: str, count: int | None = None) -> list[torch.device]:
    """Devices named by ``spec``; raises ValueError naming what is present when one is not."""
    text = (spec or "").strip().lower()
    if text in ("", "auto"):
        return [default_device()]
    count = cuda_count() if count is None else count
    devices: list[torch.device] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            d = torch.device(item)
        except (RuntimeError, ValueError):
            raise ValueError(f"devices: {item!r} is not a device; use auto, cpu, cuda:N or a list "
                             f"such as cuda:0,cuda:1") from None
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"devices: {item!r} is not supported; use auto, cpu or cuda:N")
        if d.type == "cuda":
            d = torch.device("cuda", d.index or 0)
            if d.index >= count:
                raise ValueError(f"devices: {item} is not present; this machine has {count} CUDA "
                                 f"device(s): {describe_cuda(count) if count else 'none'}")
        if d.type == "cuda" and d in devices:  # cpu,cpu is fine: several CPU processes (gloo)
            raise ValueError(f"devices: {item} is listed twice")
        devices.append(d)
    if not devices:
        raise ValueError("devices: no device given; use auto, cpu, cuda:N or a list such as cuda:0,cuda:1")
    return devices


def check(spec: str) -> list[torch.device]:
    """parse, plus what several devices need: all of one kind (cuda or cpu)."""
    devices = parse(spec)
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"devices: {spec} mixes CPU and GPUs; list only cuda:N devices, or only cpu")
    return devices


def runner(devices: Sequence[torch.device]):
    """The engine's generate for these devices (same signature and result for one or several)."""
    if len(devices) == 1:
        from cascade_core.sampler import generate
        return generate
    from cascade_core.distributed import get_pool
    return get_pool([str(d) for d in devices]).generate


def check_free_memory(devices: Sequence[torch.device], required: int, what: str,
                      free: Callable[[torch.device], int] | None = None) -> None:
    """Raise if a CUDA device has less free memory than ``required`` bytes (estimate described by ``what``)."""
    free = free or free_bytes
    short = [d for d in devices if d.type == "cuda" and free(d) < required]
    if short:
        listing = ", ".join(f"{d} {free(d) / GIB:.2f} GiB free" for d in devices if d.type == "cuda")
        raise ValueError(f"not enough GPU memory on {', '.join(str(d) for d in short)}: the run needs about "
                         f"{required / GIB:.2f} GiB ({what}); {listing}. Close other work on the GPU, "
                         f"use fewer blocks, a window, a smaller size, or another device.")


def make_room(device: torch.device, required: int) -> None:
    """Ask ComfyUI to unload its own models from ``device`` until ``required`` bytes are free."""
    mm = _comfy_mm()
    if device.type == "cuda" and mm is not None and hasattr(mm, "free_memory"):
        mm.free_memory(required, device)


def empty_cache() -> None:
    mm = _comfy_mm()
    if mm is not None and hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()
