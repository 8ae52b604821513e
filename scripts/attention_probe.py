"""Time the fused attention kernels at the DiT's shapes, whole and with the keys split (CUDA only).

    python3 scripts/attention_probe.py [--heads 12,40] [--reps 20]

One block of 3 latent frames at 832x480 (4680 query tokens, head width 128, bf16) over 3..21 frames
of keys (1560 tokens a frame), the self-attention of the exact engine at P1; and the text
cross-attention (512 keys). For each shape: every fused backend (cuDNN, flash, efficient) as the
engine calls it, FlashAttention-4 and xformers where their packages import, and cuDNN with the keys
split into s equal parts run as one batched call (q repeated, the key parts as strided views of the
pool's [tokens, heads, d] layout) and merged by their log-sum-exps, to see whether filling the last
wave of thread blocks pays for the merge.
One JSON line per (heads, keys, variant): median milliseconds and the rate (4 Lq Lk d heads FLOP
over the median time). The split's output is checked against the whole call's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_core.model.attention import merge_attention  # noqa: E402
from cascade_core.model.attention_libraries import LIBRARY_KERNELS  # noqa: E402

TOKENS_PER_FRAME, QUERY_FRAMES, HEAD_DIM = 1560, 3, 128


def median_ms(fn, reps: int) -> float:
    """Median of ``reps`` timed calls (CUDA events), after two untimed ones."""
    fn(), fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cudnn_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, lse.reshape(*q.shape[:3]).float()


def split_call(q, pool_k, pool_v, s: int, merge):
    """cuDNN over the keys split in s parts as one batch of s, merged. q [1, H, Lq, d];
    pool_k, pool_v [Lk, H, d] (the pool's layout), Lk divisible by s."""
    lk, heads, d = pool_k.shape
    k = pool_k.view(s, lk // s, heads, d).transpose(1, 2)  # [s, H, Lk/s, d], a view
    v = pool_v.view(s, lk // s, heads, d).transpose(1, 2)
    out, lse = cudnn_lse(q.expand(s, -1, -1, -1), k, v)  # [s, H, Lq, d], [s, H, Lq]
    return merge(out, lse)


def merge_eager(out, lse):
    return merge_attention([(out[i:i + 1], lse[i:i + 1]) for i in range(out.shape[0])])[0]


@torch.compile(dynamic=True)
def merge_compiled(out, lse):
    total = torch.logsumexp(lse, 0, keepdim=True)  # [1, H, Lq]
    return (out.float() * torch.exp(lse - total).unsqueeze(-1)).sum(0, keepdim=True).to(out.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="12,40")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated variant name prefixes to run (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_probe.py times CUDA kernels: it needs a CUDA GPU")
    # FlashAttention-4 (the flash-attn-4 package), called directly for its own options
    flash4 = LIBRARY_KERNELS["flash4"].loaded if LIBRARY_KERNELS["flash4"].available() else None
    xformers = LIBRARY_KERNELS["xformers"] if LIBRARY_KERNELS["xformers"].available() else None
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    lq = TOKENS_PER_FRAME * QUERY_FRAMES
    for heads in (int(h) for h in args.heads.split(",")):
        for key_tokens in [512] + [TOKENS_PER_FRAME * f for f in range(3, 22, 3)]:
            q = torch.randn(lq, heads, HEAD_DIM, device=dev, dtype=dt).unsqueeze(0).transpose(1, 2)
            pool_k = torch.randn(key_tokens, heads, HEAD_DIM, device=dev, dtype=dt)
            pool_v = torch.randn(key_tokens, heads, HEAD_DIM, device=dev, dtype=dt)
            k, v = pool_k.unsqueeze(0).transpose(1, 2), pool_v.unsqueeze(0).transpose(1, 2)
            flop = 4 * lq * key_tokens * HEAD_DIM * heads
            whole = cudnn_lse(q, k, v)[0]

            def report(variant, fn, check=None):
                if args.only and not variant.startswith(tuple(args.only.split(","))):
                    return
                try:
                    ms = median_ms(fn, args.reps)
                except (RuntimeError, AssertionError) as exc:  # a backend that refuses the shape
                    print(json.dumps({"heads": heads, "keys": key_tokens, "variant": variant,
                                      "error": str(exc).splitlines()[0][:160]}), flush=True)
                    return
                row = {"heads": heads, "keys": key_tokens, "variant": variant, "ms": round(ms, 4),
                       "tflops": round(flop / ms / 1e9, 1)}
                if check is not None:
                    row["max_abs_diff"] = float((check().float() - whole.float()).abs().max())
                print(json.dumps(row), flush=True)

            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def plain(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v)
                report(f"{name} (no lse)", plain)
            report("cudnn lse", lambda: cudnn_lse(q, k, v))
            if flash4 is not None:
                q4 = q.transpose(1, 2)  # [1, Lq, H, d], FlashAttention's layout (a view here)
                q4c = q4.contiguous()
                k4, v4 = pool_k.unsqueeze(0), pool_v.unsqueeze(0)  # the pool's layout as it is
                for splits in (1, 0):
                    report(f"flash4 lse, splits {splits}",
                           lambda n=splits: flash4(q4c, k4, v4, num_splits=n, return_lse=True),
                           check=lambda n=splits: flash4(q4c, k4, v4, num_splits=n, return_lse=True)[0].transpose(1, 2))
                report("flash4 lse, q a view", lambda: flash4(q4, k4, v4, return_lse=True))
            if xformers is not None:  # as the engine calls it: views of the pool's layout
                report("xformers (no lse)", lambda: xformers(q, k, v, lse=False))
                report("xformers lse", lambda: xformers(q, k, v, lse=True),
                       check=lambda: xformers(q, k, v, lse=True)[0])
            for s in (2, 3, 4):
                if key_tokens % s:
                    continue
                report(f"cudnn split {s}, no merge", lambda s=s: cudnn_lse(q.expand(s, -1, -1, -1),
                       pool_k.view(s, -1, heads, HEAD_DIM).transpose(1, 2),
                       pool_v.view(s, -1, heads, HEAD_DIM).transpose(1, 2)))
                report(f"cudnn split {s}, eager merge", lambda s=s: split_call(q, pool_k, pool_v, s, merge_eager),
                       check=lambda s=s: split_call(q, pool_k, pool_v, s, merge_eager))
                report(f"cudnn split {s}, compiled merge",
                       lambda s=s: split_call(q, pool_k, pool_v, s, merge_compiled),
                       check=lambda s=s: split_call(q, pool_k, pool_v, s, merge_compiled))


if __name__ == "__main__":
    main()
