"""Time the streaming Wan2.1 decoder as it is and with changes tried for speed (CUDA only).

    python3 scripts/decoder_probe.py [--runs 3] [--variants as_is,...] [--profile [--shapes]]

Random weights of the released width (``WanVAEDecoder(dim=96)``), fp16, 21 latent frames at 832x480
decoded as 7 blocks of 3, a whole block per decoder pass (the widget's and the CLI's path). Variants,
each a fresh decoder and stream, timed after one warm-up decode: ``as_is``; ``cudnn_benchmark``
(cuDNN autotuning on); ``compiled_norm_silu`` (each RMS norm + SiLU written behind the cached frames by one
``torch.compile``d function). One
JSON line per variant: warm seconds, the warm-up's seconds, and the largest and mean absolute
difference of the frames from ``as_is``. ``--profile``: GPU time of one ``as_is`` decode by kind of
kernel (``--shapes``: and a table of the operators taking the most of it, by input shape).
None of the variants is part of the decoder; BENCHMARKS.md says what each did.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cascade_core.video import vae

LATENTS = (1, 16, 21, 60, 104)  # 832x480


def decode(decoder, latents: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(seconds, frames [1, 3, F, H, W]) of one streamed decode, block by block."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    stream = decoder.stream(None)
    frames = [stream.decode(latents[:, :, b:b + 3]) for b in range(0, latents.shape[2], 3)]
    stream.synchronize()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(frames, 2)


def _norm_silu_into(x, gamma, room):
    room.copy_(F.silu(F.rms_norm(x, (x.shape[-1],), gamma, vae.NORM_EPS)))


@contextlib.contextmanager
def variant(name: str, decoder):
    """The decoder with the change ``name`` applied while inside."""
    saved_fill = vae.RMSNorm.silu_into
    if name == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    elif name == "compiled_norm_silu":
        fused = torch.compile(_norm_silu_into, dynamic=True)
        vae.RMSNorm.silu_into = lambda self, x: (lambda room: fused(x, self.gamma.reshape(-1), room))
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False
        vae.RMSNorm.silu_into = saved_fill


def kernel_kind(name: str) -> str:
    if "nchwToNhwc" in name or "nhwcToNchw" in name:
        return "layout transposes"
    if "xmma" in name or "implicit_gemm" in name or "conv" in name.lower():
        return "convolutions"
    if "elementwise" in name or "reduce" in name or "norm" in name.lower():
        return "element-wise and reductions"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="as_is,cudnn_benchmark,compiled_norm_silu",
                    help="which to time, as_is first (the others are compared with it)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shapes", action="store_true",
                    help="with --profile: also the operators taking the most GPU time, by input shape")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decoder_probe.py times the decoder on a CUDA GPU: it needs one")
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    reference = None
    for name in a.variants.split(","):
        torch.manual_seed(0)  # the same random weights for every variant
        decoder = vae.WanVAEDecoder(dim=96).to("cuda", torch.float16).eval()
        with variant(name, decoder):
            warmup, _ = decode(decoder, latents)
            runs = [decode(decoder, latents) for _ in range(a.runs)]
        frames = runs[-1][1].float()
        reference = frames if reference is None else reference
        diff = (frames - reference).abs()
        print(json.dumps({"figure": "decoder_variant", "variant": name, "warmup_s": round(warmup, 4),
                          "seconds": [round(t, 4) for t, _ in runs], "max_abs_diff": float(diff.max()),
                          "mean_abs_diff": float(diff.mean())}), flush=True)
    if a.profile:
        torch.manual_seed(0)
        decoder = vae.WanVAEDecoder(dim=96).to("cuda", torch.float16).eval()
        decode(decoder, latents)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode(decoder, latents)
        kinds: dict[str, float] = {}
        for e in prof.key_averages():
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / 1e6
        print(json.dumps({"figure": "decoder_profile", "seconds_by_kind": {k: round(v, 4) for k, v in kinds.items()},
                          "total_s": round(sum(kinds.values()), 4)}), flush=True)
        if a.shapes:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA],
                                        record_shapes=True) as prof:
                decode(decoder, latents)
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40,
                max_shapes_column_width=90), flush=True)


if __name__ == "__main__":
    main()
