"""Scaled dot-product attention over several backends, chosen once per device and kind of call.

Guarantees: every backend computes softmax(q k^T / sqrt(d)) v for q [B, H, Lq, d] and k, v
[B, H, Lk, d] (any strides with a contiguous last dim); the choice changes speed, not the function.
``set_backend`` picks one by name. "auto" on a CUDA device times every fused backend once per
(device, heads, head width, dtype, query and key lengths rounded up to a power of two) on the first
call of that kind, at that call's shape, and uses the fastest from then on; elsewhere it lets torch
dispatch. The fused backends are torch's SDPA kernels (cuDNN, flash, efficient) and, where their
optional packages are installed, FlashAttention-4 ("flash4") and xformers ("xformers"), CUDA tensors
only (:mod:`model.attention_libraries`). A kernel that raises, whatever the exception, is skipped by "auto"
and, in :func:`attend_lse`, fallen back from with one warning.

:func:`attend_lse` also returns the log-sum-exp of the scores [B, H, Lq] (float32, natural log), so
attention over disjoint key sets can be computed piecewise and combined exactly by
:func:`merge_attention` (the FlashBlock split into block-external and in-block keys).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..common.messages import first_line
from .attention_libraries import LIBRARY_KERNELS

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *SDPA_BACKENDS, *LIBRARY_KERNELS)
FUSED = ("cudnn", "flash", "efficient", *LIBRARY_KERNELS)  # what "auto" times

log = logging.getLogger("block_cascade")

_backend = "auto"
_measured: dict[tuple, str | None] = {}  # (device, heads, head_dim, dtype, Lq, Lk bucket) -> fastest

# What a fused kernel raises for a shape, dtype or device it does not take: torch's kernels raise
# RuntimeError; flash-attn-4 (a beta) also asserts, and its compiler raises classes of its own. Any
# of them makes the kernel skipped (auto's timing) or fallen back from, with one warning.
REFUSALS = (Exception,)


def _short(exc: BaseException | str) -> str:
    return (first_line(exc) if isinstance(exc, BaseException) else exc)[:160]


def set_backend(name: str) -> None:
    """Use one backend for every following call ("auto": the fastest measured; torch's dispatch off CUDA).

    Raises ValueError for an unknown name, and for a library kernel (flash4, xformers) whose package
    does not import."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in LIBRARY_KERNELS and not LIBRARY_KERNELS[name].available():
        raise ValueError(LIBRARY_KERNELS[name].unavailable())
    _backend = name


def refusal(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run attention on ``device`` in ``dtype``, in one line; None if it
    can ("auto" and "math" always can). A tiny probe call of the kernel decides the fused ones."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if name in ("auto", "math"):
        return None
    library = LIBRARY_KERNELS.get(name)
    if library is not None:
        why_not = library.off_device(device, dtype) or (None if library.available() else library.unavailable())
        if why_not:
            return why_not
    q = torch.zeros(1, 1, 8, 128, device=device, dtype=dtype)
    try:
        library(q, q, q, lse=False) if library else _sdpa(name, q, q, q)
    except REFUSALS as exc:  # torch's own reason only says no kernel was left; a library's says why
        why = f" ({_short(exc)})" if library else ""
        return f"attention backend {name} is not available on {device} for {str(dtype)[6:]}{why}; use auto (or math)"
    return None


def get_backend() -> str:
    return _backend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [B, H, Lq, d]; ``mask`` (bool, True = attend) broadcasts to [B, H, Lq, Lk].
    The library kernels run CUDA tensors only: elsewhere (and with a mask) torch's own dispatch chooses."""
    name = _backend if _backend != "auto" or mask is not None else fastest(q, k, v)
    if mask is not None or name in ("auto", None) or (name in LIBRARY_KERNELS and q.device.type != "cuda"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return LIBRARY_KERNELS[name](q, k, v, lse=False)[0] if name in LIBRARY_KERNELS else _sdpa(name, q, k, v)


def _sdpa(name: str, q, k, v) -> torch.Tensor:
    """torch's SDPA restricted to one of its kernels (RuntimeError where that kernel refuses the call)."""
    with sdpa_kernel([SDPA_BACKENDS[name]]):
        return F.scaled_dot_product_attention(q, k, v)


def fastest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The fused backend that ran this kind of call fastest on this device (None: let torch choose)."""
    if q.device.type != "cuda":
        return None
    key = (q.device, q.shape[1], q.shape[-1], q.dtype, _bucket(q.shape[2]), _bucket(k.shape[2]))
    if key not in _measured:
        _measured[key] = _time_backends(q, k, v)
    return _measured[key]


def _bucket(n: int) -> int:
    """A length rounded up to a power of two: calls within one bucket share a measurement."""
    return 1 << max(n - 1, 0).bit_length()


def _time_backends(q, k, v, repeats: int = 10) -> str | None:
    """Quick timing of each fused backend: two warm-up calls, then ``repeats`` calls between events
    (a few milliseconds at the DiT's shapes; fewer repeats picked a kernel 20 % slower at times)."""
    times = {}
    for name in FUSED:
        library = LIBRARY_KERNELS.get(name)
        if library is not None and not library.available():
            if library.broken is not None:  # installed but broken: say so once, time the others
                _fell_back(name, q, library.broken)
            continue
        call = (lambda: library(q, k, v, lse=False)) if library else \
            (lambda name=name: _sdpa(name, q, k, v))  # what attend() runs, the dispatcher's checks too
        try:
            call(), call()  # warm-up (and: does this backend take it? flash4 compiles here)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end)
        except REFUSALS:
            continue
    return min(times, key=times.get) if times else None


def measured_backends() -> dict[str, str | None]:
    """What "auto" chose so far, for reports: "device heads x head_dim dtype q<=Lq bucket k<=Lk bucket" -> backend."""
    return {f"{d} {h}x{hd} {str(t).removeprefix('torch.')} q<={lq} k<={lk}": b
            for (d, h, hd, t, lq, lk), b in _measured.items()}


def _sdpa_lse(name: str, q, k, v):
    """(out, lse [B, H, Lq] float32) from one of torch's fused SDPA kernels."""
    if name == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
    elif name == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
    else:
        r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)
    # cuDNN gives [B, H, Lq, 1], flash [B, H, Lq], efficient [B, H, Lq rounded up to 32]
    return r[0], r[1].reshape(*q.shape[:2], -1)[..., :q.shape[2]].float()


def _lse_cuda(q, k, v):
    """(out, lse) from a fused CUDA kernel: the chosen one, or under "auto" the measured fastest,
    then cuDNN and flash (the usual order on Hopper)."""
    if _backend == "auto":
        order = tuple(dict.fromkeys(n for n in (fastest(q, k, v), "cudnn", "flash") if n))
    else:
        order = (_backend,)
    for name in order:
        if name not in FUSED:
            break
        try:
            if name in LIBRARY_KERNELS:
                return LIBRARY_KERNELS[name](q, k, v, lse=True)
            return _sdpa_lse(name, q, k, v)
        except REFUSALS as exc:
            _fell_back(name, q, exc)
    _fell_back("fused kernels", q, None)
    return _lse_math(q, k, v)


_warned: set[tuple] = set()


def _fell_back(name: str, q: torch.Tensor, exc: Exception | None) -> None:
    """Log once per (backend, device, shape kind) that a kernel was skipped (a broken install, in
    "auto"'s timing; a failing call, with the log-sum-exp): the next one, or in the end the float32
    reference path (score matrices of Lq x Lk floats), runs instead."""
    key = (name, q.device, q.shape[1], q.shape[-1], q.dtype)
    if key not in _warned:
        _warned.add(key)
        why = f": {_short(exc)}" if exc is not None else ""
        nxt = "trying the next" if exc is not None else "using the float32 reference path (slow, large)"
        log.warning("attention: %s unavailable for %d heads x %d %s on %s%s; %s",
                    name, q.shape[1], q.shape[-1], str(q.dtype).removeprefix("torch."), q.device, why, nxt)


def _lse_math(q, k, v):
    """Reference path in float32: exact, any device, slow."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, Lq, d] and the log-sum-exp of the scaled scores [B, H, Lq] (float32;
    -inf over no keys). Off CUDA every backend but auto and flash takes the float32 reference path."""
    if k.shape[2] == 0:  # no kernel is asked: torch's give +inf or finite log-sum-exps over no keys
        return q.new_zeros(q.shape[:3] + v.shape[3:]), q.new_full(q.shape[:3], -math.inf, dtype=torch.float32)
    if q.device.type == "cuda" and _backend != "math" and q.dtype in (torch.float16, torch.bfloat16):
        return _lse_cuda(q, k, v)  # the fused kernels take half precision only
    # torch's CPU flash kernel: not for a strided last dim (it does not check it)
    if q.device.type == "cpu" and _backend in ("auto", "flash") and all(t.stride(-1) == 1 for t in (q, k, v)):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return out, lse.float()
    return _lse_math(q, k, v)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets: softmax weights renormalised by their log-sum-exps.

    parts: (out [B, H, L, d], lse [B, H, L]) each. Returns the attention over the union of the key
    sets and its log-sum-exp (float32 arithmetic, out in the parts' dtype).
    """
    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)  # [B, H, L]
    out = sum(p[0].float() * torch.exp(p[1] - lse).unsqueeze(-1) for p in parts)
    return out.to(parts[0][0].dtype), lse
