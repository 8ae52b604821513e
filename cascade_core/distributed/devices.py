"""The device list syntax ("cuda:0,cuda:1", "cpu,cpu", "auto"), checked against the machine: the one
parser the CLI, the worker pool and the nodes share."""
from __future__ import annotations

import socket
from typing import Callable, Sequence

import torch

from ..common.constants import GIB
from ..sampling.memory import available_bytes


def cuda_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe_cuda(count: int, free: Callable[[torch.device], int | None] | None = None) -> str:
    """'cuda:0 (NVIDIA H100, 71.2 GiB free), cuda:1 (...)' for the first ``count`` GPUs, or 'none'.

    ``free``: free bytes of a device (default :func:`sampling.memory.available_bytes`)."""
    if count == 0:
        return "none"
    free = free or available_bytes
    parts = []
    for i in range(count):
        d = torch.device("cuda", i)
        try:
            name = torch.cuda.get_device_name(i)
        except Exception:  # noqa: BLE001 - a name is decoration only
            name = "GPU"
        try:
            parts.append(f"cuda:{i} ({name}, {free(d) / GIB:.1f} GiB free)")
        except Exception:  # noqa: BLE001 - so is the free memory
            parts.append(f"cuda:{i} ({name})")
    return ", ".join(parts)


def parse_devices(spec: str | Sequence[str | torch.device], *, auto: Callable[[], torch.device] | None = None,
                  count: int | None = None, free: Callable[[torch.device], int | None] | None = None
                  ) -> list[torch.device]:
    """Devices of a list such as "cuda:0,cuda:1" or "cpu,cpu"; ValueError naming what is wrong.

    One type only; a GPU at most once (one process per GPU); CPU ranks may repeat; "cuda" is cuda:0.
    Hooks: ``auto`` picks the device for "auto" or an empty text (without it both are refused);
    ``count`` is the number of CUDA devices present (default: what torch sees); ``free`` gives a
    device's free bytes for the message that lists the GPUs present (see :func:`describe_cuda`).
    """
    text = spec.strip().lower() if isinstance(spec, str) else None
    if auto is not None and text in ("", "auto"):
        return [torch.device(auto())]
    hint = "auto, cpu or cuda:N" if auto is not None else "cpu or cuda:N"
    items = text.split(",") if text is not None else list(spec)
    devices = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        try:
            d = torch.device(name)
        except (RuntimeError, ValueError):
            raise ValueError(f"devices: {name!r} is not a device; use {hint}, or a list such as cuda:0,cuda:1") from None
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"devices: {name!r} is not supported; use {hint}")
        devices.append(torch.device("cuda", d.index or 0) if d.type == "cuda" else torch.device("cpu"))
    if not devices:
        raise ValueError(f"devices: none given; use {hint}, or a list such as cuda:0,cuda:1")
    names = ",".join(str(d) for d in devices)
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"devices: {names} mixes CPU and CUDA; use only cuda:N or only cpu")
    gpus = [d for d in devices if d.type == "cuda"]
    twice = sorted({str(d) for d in gpus if gpus.count(d) > 1})
    if twice:
        raise ValueError(f"devices: {', '.join(twice)} is listed twice in {names}; one process per GPU")
    if gpus:
        count = cuda_count() if count is None else count
        missing = [str(d) for d in gpus if d.index >= count]
        if missing:
            raise ValueError(f"devices: {', '.join(missing)} is not present; {names} asks for {len(gpus)} GPU(s) "
                             f"and this machine has {count} CUDA device(s): {describe_cuda(count, free)}")
    return devices


def _loopback_interface() -> str | None:
    try:
        names = {name for _, name in socket.if_nameindex()}
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _worker_env() -> dict[str, str]:
    """Environment every worker sets before it touches NCCL or gloo."""
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    lo = _loopback_interface()
    if lo:  # the pool is one host: bootstrap and gloo traffic stay on the loopback interface
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


def _missing_peer_access(devices: Sequence[torch.device]) -> list[tuple[int, int]]:
    idx = [d.index for d in devices if d.type == "cuda"]
    return [(a, b) for a in idx for b in idx if a != b and not torch.cuda.can_device_access_peer(a, b)]


def _free_bytes(device: torch.device) -> tuple[int, int] | None:
    """(usable, total) bytes of a CUDA device for this process (free + cached but unused)."""
    if device.type != "cuda":
        return None
    return available_bytes(device), int(torch.cuda.mem_get_info(device)[1])
