"""Attention kernels from optional packages: FlashAttention-4 ("flash4") and xformers ("xformers").

Guarantees: a :class:`LibraryKernel` computes softmax(q k^T / sqrt(d)) v, and on request the
log-sum-exp of the scaled scores [B, H, Lq] (float32, natural log), for q [B, H, Lq, d] and k, v
[B, H, Lk, d], like the rest of :mod:`model.attention`. Both libraries take [B, L, H, d], the layout of the
KV pool and of the model's projections, so the transposes here are views of it. Neither package is
ever required: each is imported on first use, and a missing package, or one that is installed but
does not import (its CUDA libraries, a missing dependency), makes its kernel unavailable, the reason
kept for a one-line refusal.

- flash4: ``flash_attn.cute.flash_attn_func`` of the ``flash-attn-4`` package (CuTe DSL kernels for
  Hopper and Blackwell, compiled on first use).
- xformers: ``xformers.ops.fmha.memory_efficient_attention`` and, with the log-sum-exp,
  ``memory_efficient_attention_partial`` (whose outputs are meant to be merged by log-sum-exp, as
  :func:`model.attention.merge_attention` does); its dispatcher picks among the kernels its build carries.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

import torch

from ..common.messages import first_line


class LibraryKernel:
    """One optional package's attention kernel.

    ``module`` (and ``attribute`` in it, or the module itself) is what gets imported; ``call(loaded,
    q, k, v, lse)`` runs it on [B, L, H, d] tensors and returns (out [B, Lq, H, d], lse [B, H, Lq] or
    None); ``install`` is the pip requirement named in refusals; ``runs_on`` says where it runs.
    """

    def __init__(self, name: str, install: str, module: str, attribute: str | None,
                 call: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], runs_on: str):
        self.name, self.install, self.module, self.attribute = name, install, module, attribute
        self.runs_on, self._call = runs_on, call
        self.loaded: Any = None  # the imported function or module; False where it cannot be imported
        self.broken: str | None = None  # why an installed package does not import

    def available(self) -> bool:
        """Whether the package imports. Tried once (FlashAttention-4's import loads its compiler).
        Where it does not, the package counts as installed but broken when its distribution is
        installed (so a broken FlashAttention-2, which owns ``flash_attn`` too, is not taken for a
        broken flash-attn-4)."""
        if self.loaded is None:
            try:
                module = importlib.import_module(self.module)
                self.loaded = getattr(module, self.attribute) if self.attribute else module
            except Exception as exc:
                self.loaded, self.broken = False, first_line(exc)[:160] if installed(self.install) else None
        return self.loaded is not False

    def unavailable(self) -> str:
        """One line: why the kernel cannot be used (not installed, or installed but broken)."""
        if self.broken is not None:
            return (f"attention backend {self.name}: {self.install} is installed but does not import "
                    f"({self.broken}); use auto")
        return f"attention backend {self.name} needs the {self.install} package (pip install {self.install}); use auto"

    def off_device(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the kernel cannot run on ``device`` in ``dtype`` whatever is installed; None if it may."""
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return (f"attention backend {self.name} runs only on {self.runs_on} in float16 or bfloat16; "
                    f"this run is on {device} in {str(dtype).removeprefix('torch.')}: run on a CUDA GPU, or use auto")
        return None

    @torch.compiler.disable  # a library call, never traced (the cross-attention runs in compiled regions)
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool):
        """(out [B, H, Lq, d], lse [B, H, Lq] float32 or None) for q [B, H, Lq, d], k, v [B, H, Lk, d].
        Raises RuntimeError where the package does not import; the library's own errors pass through."""
        if not self.available():
            raise RuntimeError(self.unavailable())
        out, out_lse = self._call(self.loaded, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lse)
        if out_lse is not None:  # xformers allows rows of padding past Lq
            out_lse = out_lse[..., :q.shape[2]].float()
        return out.transpose(1, 2).to(q.dtype), out_lse


def installed(distribution: str) -> bool:
    """Whether a distribution of that name (as pip names it) is installed."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _flash4_call(flash_attn_func, q, k, v, lse: bool):
    return flash_attn_func(q, k, v, return_lse=lse)


def _xformers_call(fmha, q, k, v, lse: bool):
    if lse:
        return fmha.memory_efficient_attention_partial(q, k, v)
    return fmha.memory_efficient_attention(q, k, v), None


LIBRARY_KERNELS = {
    "flash4": LibraryKernel("flash4", "flash-attn-4", "flash_attn.cute", "flash_attn_func", _flash4_call,
                            "NVIDIA Hopper and Blackwell GPUs (CUDA)"),
    "xformers": LibraryKernel("xformers", "xformers", "xformers.ops.fmha", None, _xformers_call,
                              "NVIDIA GPUs (CUDA)"),
}
