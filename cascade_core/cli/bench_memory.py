"""Runs on smaller cards, stood in for by capping this process's GPU memory: where the weights sit and how fast.

``python -m cascade_core.cli.bench_memory --size 14B --family krea-realtime --caps 0,32,24,16``: for each cap
(GiB; 0 = the whole card) a fresh process builds the model with random weights (``--weight-dtype``), takes
it off the GPU, caps the GPU (``torch.cuda.set_per_process_memory_fraction``), places the weights as the CLI
and the nodes do (:func:`sampling.memory.blocks_to_swap` on the capped available memory) and times one
video after a warm-up; one JSON line per cap: ran or refused (the refusal's line), blocks swapped, peak
memory, seconds, FPS. Krea Realtime's re-encoder is an identity stand-in here (its VAE time is not counted).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from ..common.constants import GIB
from ..model.dit import WanModel
from ..sampling.config import PromptSchedule
from ..sampling.families import family_config
from ..sampling.loop import generate
from ..sampling.memory import available_bytes, blocks_to_swap, cheaper_settings, estimate_run_bytes
from ..sampling.plan import plan_run
from ..video.frames import video_frames
from .bench_args import SIZES

GGUF_Q4_K_M = "gguf_Q4_K_M"  # --weight-dtype of the GGUF stand-in below


def gguf_stand_in(model: WanModel) -> WanModel:
    """``model`` with its blocks' Linear weights replaced by random GGUF blocks of a Q4_K_M file's sizes (timing
    and memory only: the values are random, not a quantisation of ``model``'s): Q4_K (144 bytes a 256 values)
    everywhere but the FFN's down projection, Q6_K (210 bytes), as llama.cpp's Q4_K_M keeps part of its down
    projections at 6 bits. Super-block scales (fp16) are set so that weights stay about 1/sqrt(fan_in)."""
    from ..model import gguf

    q4k, q6k = 12, 14  # GGML quantisation type numbers
    g = torch.Generator(model.device).manual_seed(0)
    sd = {}
    for key, v in model.state_dict().items():
        if not (key.startswith("blocks.") and key.endswith(".weight") and v.dim() == 2):
            sd[key] = v
            continue
        six = key.endswith("ffn.2.weight")
        out_features, in_features = v.shape
        raw = torch.randint(0, 256, (out_features, in_features // 256, 210 if six else 144), generator=g,
                            dtype=torch.uint8, device=v.device)  # [out, super-blocks a row, bytes a super-block]
        scale = torch.tensor([in_features ** -0.5 / (1400 if six else 220)], dtype=torch.float16, device=v.device)
        if six:  # ql, qh, 16 int8 scales, then d
            raw[..., 208:210] = scale.view(torch.uint8)
        else:  # d, dmin, 12 bytes of scales and mins, then the nibbles
            raw[..., 0:2] = raw[..., 2:4] = scale.view(torch.uint8)
        sd[key] = raw.reshape(out_features, -1)
        sd[key.removesuffix(".weight") + gguf.TYPE_SUFFIX] = torch.tensor(q6k if six else q4k)
    return WanModel.from_state_dict(sd, num_heads=model.cfg.num_heads)


def one(a) -> dict:
    """One capped run in this process (see the module docstring)."""
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = family_config(a.family, parallel=a.parallel or None, window=a.window, sink=a.sink, kv_dtype=a.kv_dtype)
    model = WanModel.random(SIZES[a.size], seed=0, device=device, dtype=torch.bfloat16)
    model = gguf_stand_in(model) if a.weight_dtype == GGUF_Q4_K_M else model.with_weight_dtype(a.weight_dtype)
    model = model.to("cpu")
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info(device)[1]
    if a.cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap * GIB / total), device)
    plan = plan_run(cfg, blocks=a.blocks, width=a.width, height=a.height)
    need, what = estimate_run_bytes(plan, model.cfg, torch.bfloat16, 1, 0)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    block = sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())
    free = available_bytes(device)
    row = dict(size=a.size, family=a.family, cap_gib=a.cap, weight_dtype=a.weight_dtype, kv_dtype=a.kv_dtype,
               parallel=cfg.parallel, blocks=a.blocks, need_gib=round(need / GIB, 2), weights_gib=round(weights / GIB, 2),
               available_gib=round(free / GIB, 2))
    swapped = blocks_to_swap(free, need, weights, block, model.cfg.num_layers, a.swap_blocks)
    if swapped is None:
        cheaper = cheaper_settings(plan, model.cfg, torch.bfloat16, 1, 0, free, weights, block,
                                   a.weight_dtype != "default")
        return {**row, "ran": False, "refused": f"needs {need / GIB:.2f} GiB ({what}) besides the weights; "
                                                f"{cheaper or 'nothing cheaper'} would fit"}
    model.swap_blocks(device, swapped) if swapped else model.to(device)
    model.compile_layers(a.compile)
    emb = torch.randn(512, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    context = (lambda latents, first: latents[:, :, -1:]) if cfg.kv_recompute else None  # noqa: E731
    run = dict(blocks=a.blocks, width=a.width, height=a.height, seed=0, context_image=context)
    try:
        generate(model, PromptSchedule.single(emb), cfg, **run)  # warm-up (and compilation)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        res = generate(model, PromptSchedule.single(emb), cfg, **run)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as exc:
        return {**row, "ran": False, "swapped": swapped, "refused": f"out of memory: {str(exc).splitlines()[0]}"}
    frames = video_frames(res.latents.shape[2])
    return {**row, "ran": True, "swapped": swapped, "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "seconds": round(seconds, 3), "frames": frames, "fps": round(frames / seconds, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cascade_core.cli.bench_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="1.3B")
    ap.add_argument("--family", default="self-forcing")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--parallel", type=int, default=0, help="blocks in flight (0: the family's)")
    ap.add_argument("--window", type=int)
    ap.add_argument("--sink", type=int)
    ap.add_argument("--weight-dtype", default="default", help=f"a loader's choice, or {GGUF_Q4_K_M} (random blocks)")
    ap.add_argument("--kv-dtype", default="default")
    ap.add_argument("--swap-blocks", type=int, default=-1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--caps", default="0", help="GiB caps, e.g. 0,32,24,16,12,8 (0: uncapped); one process each")
    ap.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)  # one cap, in this process
    a = ap.parse_args(argv)
    if a.cap is not None:
        print(json.dumps(one(a)), flush=True)
        return
    rest = list(argv if argv is not None else sys.argv[1:])
    if "--caps" in rest:
        del rest[rest.index("--caps"):rest.index("--caps") + 2]
    rest = [x for x in rest if not x.startswith("--caps=")]
    for cap in a.caps.split(","):
        out = subprocess.run([sys.executable, "-m", "cascade_core.cli.bench_memory", *rest, "--cap", cap],
                             capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps(
            {"cap_gib": float(cap), "ran": False, "error": out.stderr.strip().splitlines()[-1:]})
        print(line, flush=True)


if __name__ == "__main__":
    main()
