"""When the DiT's regions are compiled, and where torch keeps what it compiled.

- :func:`compiled_regions`: the one torch.compile of a layer's regions per process and backend.
- :func:`resolve_compile` is the one reading of the compile choice (auto / on / off) of the nodes, the CLI
  and the bench: auto compiles on CUDA where torch.compile can generate kernels there (Triton importable),
  and otherwise says in one line why not and what to install.
- :func:`use_disk_cache` points torch's compile caches (Inductor's FX graph and kernel caches, Triton's
  kernels) at a folder that outlives the process, so a restarted ComfyUI reuses what an earlier one
  compiled (unless the user set ``TORCHINDUCTOR_CACHE_DIR`` already).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Sequence

import torch

COMPILE_CHOICES = ("auto", "on", "off")
COMPILED: dict[tuple, tuple[Callable, ...]] = {}  # (functions, backend) -> their compiled versions


def compiled_regions(functions: Sequence[Callable], backend: str | Callable = "inductor") -> tuple[Callable, ...]:
    """The process's compiled versions of ``functions`` (a layer's regions) for ``backend``: made on first use,
    then shared by every model, so a model built again compiles nothing. The number of segments is left to
    torch's automatic dynamic shapes (a second count compiles a version for every count). Each weight
    storage and video size is a version of its own: dynamo keeps up to 64 of a function (its default, 8,
    would run a process of several models eagerly without a word)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    key = (tuple(functions), backend)
    if key not in COMPILED:
        COMPILED[key] = tuple(torch.compile(f, dynamic=None, backend=backend) for f in functions)
    return COMPILED[key]


def can_compile(device: torch.device) -> str | None:
    """None where torch.compile's Inductor backend can build kernels for ``device``; else why not (one line)."""
    if device.type != "cuda":
        return f"compile is off on {device.type} (auto compiles on CUDA GPUs only)"
    if importlib.util.find_spec("triton") is None:
        return ("compile is off: torch.compile needs Triton, which this Python lacks (pip install triton; on "
                "Windows: pip install triton-windows)")
    return None


def resolve_compile(choice: str, device: torch.device) -> tuple[bool, str | None]:
    """(compile or not, the line saying why auto chose off or None) for a ``choice`` of :data:`COMPILE_CHOICES`.
    "on" compiles wherever asked (torch raises on its first forward where it cannot). Raises ValueError for
    another choice."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on", None
    why = can_compile(device)
    return why is None, why


def use_disk_cache(folder: str) -> str:
    """Keep torch's compile caches under ``folder`` (created) unless ``TORCHINDUCTOR_CACHE_DIR`` is set, with
    Inductor's FX graph cache on; returns the folder in use. Worker processes started later inherit it."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        return current
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except (ImportError, AttributeError):  # an older torch: its defaults apply
        pass
    return folder
