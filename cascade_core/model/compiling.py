"""When the DiT's regions are compiled, and where torch keeps what it compiled.

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

import torch

COMPILE_CHOICES = ("auto", "on", "off")


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
