"""Every decision about devices, in one place.

- :func:`check` turns the config's ``devices`` text ("auto", "cpu", "cuda:0", "cuda:0,cuda:1") into a
  list of torch devices through the engine's parser, checking that each is present (a pure function
  of the text and of what is installed, so it runs at validation time).
- Where one device and several part is the run session's (:class:`cascade_core.session.RunSession`, kept
  pool): one device runs the engine in ComfyUI's process, several run through cascade_core.distributed's
  persistent worker pool (one process per GPU, the KV pool shared over NCCL).
- :func:`make_room` asks ComfyUI to unload its models until a run fits; where the weights then sit (resident or
  swapped), or the refusal, is the sampler's :func:`nodes.sampler.make_room` over the one memory estimate.
"""
from __future__ import annotations

import torch

from cascade_core.distributed import devices as engine_devices
from cascade_core.sampling.memory import available_bytes


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
    return engine_devices.cuda_count()


def free_bytes(device: torch.device) -> int:
    """Free memory of a device as ComfyUI counts it (device free + torch's cached but unused)."""
    mm = _comfy_mm()
    if mm is not None and hasattr(mm, "get_free_memory"):
        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        return available_bytes(device)
    return 1 << 62


def check(spec: str) -> list[torch.device]:
    """The config's ``devices`` text as torch devices, by the engine's parser
    (:func:`cascade_core.distributed.devices.parse_devices`) with ComfyUI's hooks: "auto" (or nothing)
    is ComfyUI's own device, and a missing GPU's message lists the GPUs present with ComfyUI's free
    memory. Raises ValueError naming what is wrong."""
    return engine_devices.parse_devices(spec, auto=default_device, count=cuda_count(), free=free_bytes)


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
