"""Scaled dot-product attention over several backends, chosen once per device.

Guarantees: every backend computes softmax(q k^T / sqrt(d)) v for q [B, H, Lq, d] and k, v
[B, H, Lk, d] (any strides with a contiguous last dim); the choice changes speed, not the function.
``set_backend`` picks one by name. "auto" on a CUDA device times every fused backend once per
(device, heads, head width, dtype) on the first call of that kind, at that call's shape, and uses the
fastest from then on; elsewhere it lets torch dispatch.

:func:`attend_lse` also returns the log-sum-exp of the scores [B, H, Lq] (float32, natural log), so
attention over disjoint key sets can be computed piecewise and combined exactly by
:func:`merge_attention` (the FlashBlock split into block-external and in-block keys).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *SDPA_BACKENDS)

log = logging.getLogger("block_cascade")

_backend = "auto"
_measured: dict[tuple, str | None] = {}  # (device, heads, head_dim, dtype) -> fastest fused backend


def set_backend(name: str) -> None:
    """Use one backend for every following call ("auto": torch's own dispatch)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [B, H, Lq, d]; ``mask`` (bool, True = attend) broadcasts to [B, H, Lq, Lk]."""
    name = _backend if _backend != "auto" or mask is not None else fastest(q, k, v)
    ctx = contextlib.nullcontext() if name in ("auto", None) or mask is not None else sdpa_kernel(
        [SDPA_BACKENDS[name]])
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fastest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The fused backend that ran this kind of call fastest on this device (None: let torch choose)."""
    if q.device.type != "cuda":
        return None
    key = (q.device, q.shape[1], q.shape[-1], q.dtype)
    if key not in _measured:
        _measured[key] = _time_backends(q, k, v)
    return _measured[key]


def _time_backends(q, k, v, repeats: int = 5) -> str | None:
    """Quick timing of each fused backend: one warm-up call, then ``repeats`` calls between events."""
    times = {}
    for name in ("cudnn", "flash", "efficient"):
        try:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                F.scaled_dot_product_attention(q, k, v)  # warm-up (and: does this backend take it?)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    F.scaled_dot_product_attention(q, k, v)
                end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end)
        except RuntimeError:
            continue
    return min(times, key=times.get) if times else None


def measured_backends() -> dict[str, str | None]:
    """What "auto" chose so far, for reports: "device heads x head_dim dtype" -> backend."""
    return {f"{d} {h}x{hd} {str(t).removeprefix('torch.')}": b for (d, h, hd, t), b in _measured.items()}


def _lse_cuda(q, k, v):
    """(out, lse) from a fused CUDA kernel: cuDNN first (fastest on Hopper), then flash."""
    if _backend == "auto":  # the measured fastest first, then the usual order on Hopper
        order = tuple(dict.fromkeys(n for n in (fastest(q, k, v), "cudnn", "flash") if n))
    else:
        order = (_backend,)
    for name in order:
        try:
            if name == "cudnn":
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
            elif name == "flash":
                r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
            elif name == "efficient":
                r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)
            else:
                break
            # cuDNN gives [B, H, Lq, 1], flash [B, H, Lq], efficient [B, H, Lq rounded up to 32]
            return r[0], r[1].reshape(*q.shape[:2], -1)[..., :q.shape[2]].float()
        except RuntimeError as exc:
            _fell_back(name, q, exc)
    _fell_back("fused kernels", q, None)
    return _lse_math(q, k, v)


_warned: set[tuple] = set()


def _fell_back(name: str, q: torch.Tensor, exc: Exception | None) -> None:
    """Log once per (backend, device, shape kind) that a log-sum-exp kernel was skipped: the next
    one, or in the end the float32 reference path (score matrices of Lq x Lk floats), runs instead."""
    key = (name, q.device, q.shape[1], q.shape[-1], q.dtype)
    if key not in _warned:
        _warned.add(key)
        why = f": {str(exc).splitlines()[0][:160]}" if exc is not None else ""
        nxt = "trying the next" if exc is not None else "using the float32 reference path (slow, large)"
        log.warning("attention with log-sum-exp: %s unavailable for %d heads x %d %s on %s%s; %s",
                    name, q.shape[1], q.shape[-1], str(q.dtype).removeprefix("torch."), q.device, why, nxt)


def _lse_math(q, k, v):
    """Reference path in float32: exact, any device, slow."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, Lq, d] and the log-sum-exp of the scaled scores [B, H, Lq] (float32)."""
    if q.device.type == "cuda" and _backend != "math" and q.dtype in (torch.float16, torch.bfloat16):
        return _lse_cuda(q, k, v)  # the fused kernels take half precision only
    if q.device.type == "cpu" and _backend in ("auto", "flash"):
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
