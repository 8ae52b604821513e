"""``python -m cascade_core.bench``: DiT-only speed of the engine at every parallelism level.

Random weights of the real shapes (speed does not depend on the values): 1.3B = 1536/12/30/8960,
14B = 5120/40/40/13824; on a machine without CUDA a tiny configuration. For each level P it prints
one JSON line: seconds for the whole video, video frames per second, latency to the first finished
block, peak GPU memory, and the relative L2 deviation of the latents from the exact engine (P1, no
FlashBlock reuse, no fp8; same seed and noise): the approximation of cascading, FlashBlock reuse and
fp8, reported rather than hidden.
"""
from __future__ import annotations

import itertools
import json
import time

import torch

from ..common.constants import LATENT_CHANNELS, TEXT_TOKENS
from ..model import attention
from ..model.attention_libraries import LIBRARY_KERNELS
from ..model.dit import WanModel
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.loop import generate
from ..sampling.schedule import CascadeSchedule
from ..video.frames import FrameStream, video_frames
from ..video.taew import LightTAE22Decoder, LightTAEDecoder, TinyWan22Decoder, TinyWanDecoder
from ..video.vae import WanVAEDecoder
from ..video.vae22 import Wan22VAEDecoder
from .bench_args import SIZES, parse_arguments, run_config


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner(a):
    """generate, or with ``--devices`` the worker pool's (one process per device, same signature)."""
    if a.devices:
        from ..distributed import get_pool
        return get_pool(a.devices).generate
    return generate


def exchange_row(a, tag: dict, run: int, ticks: int) -> None:
    """Each rank's K/V exchange in the pool's last run, per tick: MiB received from the other ranks
    and milliseconds its work waited for them (the exposed communication)."""
    from ..distributed import get_pool

    per_rank = get_pool(a.devices).last_exchange
    emit(figure="exchange", **tag, run=run, ticks=ticks,
         mib_per_tick={r: round(b / ticks / 2**20, 3) for r, (b, _) in sorted(per_rank.items())},
         exposed_ms_per_tick={r: round(s / ticks * 1000, 3) for r, (_, s) in sorted(per_rank.items())})


def timed_runs(model, embeds, cfg, a, device, tag):
    """One warm-up run (kernels, compilation; its time is printed), then ``a.runs`` timed runs."""
    run = dict(blocks=a.blocks, width=a.width, height=a.height, seed=0)
    generate_run = runner(a)
    t0 = time.perf_counter()
    generate_run(model, PromptSchedule.single(embeds), cfg, **run)
    sync(device)
    emit(figure="warmup", **tag, seconds=round(time.perf_counter() - t0, 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.runs):
        sync(device)
        t0 = time.perf_counter()
        res = generate_run(model, PromptSchedule.single(embeds), cfg, **run)
        sync(device)
        yield res, time.perf_counter() - t0


def bench_decoder(kind: str, device: torch.device, wan22: bool = False):
    """A decoder with random weights (one of :data:`BENCH_DECODERS`): the Wan VAE's (``wan``), LightVAE's
    (``lightvae``, the Wan decoder at base width 24), taew2_1's (``taew``) or LightTAE's (``lighttae``); with
    ``wan22`` (a model of Wan2.2 latents) the Wan2.2 VAE's, taew2_2's or lighttaew2_2's (no Wan2.2 LightVAE);
    the released widths on a GPU (fp16), tiny ones elsewhere (float32)."""
    gpu = device.type == "cuda"
    if kind in ("taew", "lighttae"):
        tiny = {(False, "taew"): TinyWanDecoder, (False, "lighttae"): LightTAEDecoder,
                (True, "taew"): TinyWan22Decoder, (True, "lighttae"): LightTAE22Decoder}[wan22, kind]
        decoder = tiny() if gpu else tiny((8, 8, 8, 8))
    elif wan22:
        decoder = Wan22VAEDecoder(dim=256 if gpu else 8)
    else:
        decoder = WanVAEDecoder(dim=(96 if kind == "wan" else 24) if gpu else 8)
    return decoder.to(device, torch.float16 if gpu else torch.float32).eval()


def end_to_end(model, embeds, levels, a, device, size, steps, kind: str) -> None:
    """Streaming decoder ``kind`` alone, then DiT + decode, with the time from the run's start to its first
    frames handed out: the decode on its own CUDA stream beside the next blocks' DiT work (``overlap``), and
    each block decoded while the DiT waits (what overlapping buys on one GPU, where both are compute-bound)."""
    decoder = bench_decoder(kind, device, wan22=model.cfg.latent_space.channels != LATENT_CHANNELS)
    generate_run = runner(a)  # with --devices: the DiT on the pool's devices, the decoder on --device
    lat = generate_run(model, PromptSchedule.single(embeds), run_config(a, steps, levels[0]), blocks=a.blocks,
                       width=a.width, height=a.height, seed=0).latents.to(device)
    fpb = run_config(a, steps, levels[0]).frames_per_block
    for per_pass in (1, None):  # one latent frame per decoder pass, or a whole block
        for r in range(a.runs + 1):  # the first is the warm-up
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            stream = decoder.stream(per_pass)
            for b in range(a.blocks):
                stream.decode(lat[:, :, b * fpb:(b + 1) * fpb])
            stream.synchronize()
            emit(figure="vae_stream", size=size, decoder=kind, frames_per_pass=per_pass or fpb, run=r - 1,
                 seconds=round(time.perf_counter() - t0, 4), latent_frames=lat.shape[2],
                 peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)
    for p, overlap in itertools.product(levels, (True, False)):  # decode beside the DiT, or after each block
        cfg = run_config(a, steps, p, a.flashblock.split(",")[-1], fold_clean=a.fold_clean)
        for r in range(a.runs + 1):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            handed_out: list[float] = []  # seconds from the stream's start, per block of frames
            frames = FrameStream(decoder, on_frames=lambda event: handed_out.append(event.seconds))

            def on_block(event, frames=frames, overlap=overlap):
                frames.push(event)
                if not overlap:  # the DiT waits until this block's frames are out
                    frames.poll(wait=True)

            res = generate_run(model, PromptSchedule.single(embeds), cfg, blocks=a.blocks, width=a.width,
                               height=a.height, seed=0, on_block=on_block, on_tick=frames.poll)
            video = frames.finish()
            sync(device)
            seconds = time.perf_counter() - t0
            emit(figure="end_to_end", size=size, decoder=kind, backend=attention.get_backend(), parallel=p,
                 overlap=overlap, flashblock=cfg.flashblock, run=r - 1, seconds=round(seconds, 4), frames=video.shape[2],
                 fps=round(video.shape[2] / seconds, 2), first_frames_s=round(handed_out[0], 4),
                 dit_seconds=round(res.seconds, 4), ticks=res.ticks,
                 peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)


def switch_configs(levels, a, steps):
    """(parallel, switch mode, config) of each switching run: every level in mode none, and with
    ``--switch-mode`` also recache where it is defined (P1; a row says why not elsewhere)."""
    for p in levels:
        for mode in a.switch_mode.split(","):
            cfg = run_config(a, steps, p, a.flashblock.split(",")[-1], switch_mode=mode)
            try:
                cfg.validate()
                cfg.check_run(1)
            except ValueError as exc:
                emit(figure="switch_skipped", parallel=p, switch_mode=mode, why=str(exc))
                continue
            yield p, mode, cfg


def switch_series(model, embeds, levels, a, device, size, steps) -> None:
    """Per-tick wall times of runs whose prompt switches every ``a.switch_every`` blocks (new random
    prompts in every run), after one warm-up run: a stall at a switch (a recompilation, a re-cache)
    shows as a tick far above the median."""
    for p, mode, cfg in switch_configs(levels, a, steps):
        for r in range(a.runs + 1):  # the first is the warm-up
            g = torch.Generator().manual_seed(2 + r)
            prompts = PromptSchedule([(b, torch.randn(embeds.shape, generator=g))
                                      for b in range(0, a.blocks, a.switch_every)])
            marks = []

            def on_tick(e, marks=marks):
                sync(device)
                marks.append(time.perf_counter())
            sync(device)
            t0 = time.perf_counter()
            res = runner(a)(model, prompts, cfg, blocks=a.blocks, width=a.width, height=a.height, seed=0,
                            on_tick=on_tick)
            ticks = [round(t - s, 4) for s, t in zip([t0] + marks, marks)]
            median = sorted(ticks)[len(ticks) // 2]
            emit(figure="switch_ticks", size=size, parallel=p, switch_mode=mode, window=a.window, sink=a.sink,
                 switch_every=a.switch_every, run=r - 1, switches=len(prompts.entries) - 1, forwards=res.forwards,
                 seconds=round(res.seconds, 4), median_tick_s=median, max_over_median=round(max(ticks) / median, 2),
                 switch_ticks=entry_ticks(cfg, a.blocks, [s for s, _ in prompts.entries[1:]]),
                 tick_seconds=ticks)


def entry_ticks(cfg: CascadeConfig, blocks: int, starts: list[int]) -> list[int]:
    """The ticks in which the blocks ``starts`` take their first step."""
    plan = CascadeSchedule(blocks, len(cfg.steps), cfg.parallel, cfg.fold_clean)
    return [plan.entry(b) for b in starts]


def steer_latency(model, embeds, levels, a, device, size, steps) -> None:
    """Seconds from a steered prompt switch (returned by ``steer`` before a tick) to the end of the first
    block that takes it (its latents final: the first new frames, before decoding), for switches at
    several ticks spread over the middle of the video, after one warm-up run per configuration."""
    for p, mode, cfg in switch_configs(levels, a, steps):
        ticks = len(CascadeSchedule(a.blocks, len(cfg.steps), cfg.parallel, cfg.fold_clean))
        at_ticks = sorted({ticks // 4 + i * (ticks // 2) // max(a.steer_runs - 1, 1) for i in range(a.steer_runs)})
        latencies = []
        for r, at in enumerate([at_ticks[0]] + at_ticks):  # the first is the warm-up
            polls, sent, landed, done = [0], [], [], {}
            new = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(50 + r))

            def steer(polls=polls, sent=sent, at=at, new=new):
                polls[0] += 1
                if polls[0] - 1 != at:
                    return []
                sync(device)
                sent.append(time.perf_counter())
                return [(None, new)]

            def on_block(e, done=done):
                sync(device)
                done[e.block] = time.perf_counter()
            runner(a)(model, PromptSchedule.single(embeds), cfg, blocks=a.blocks, width=a.width, height=a.height,
                      seed=0, steer=steer, on_switch=landed.append, on_block=on_block)
            if r and landed and landed[0].block is not None:
                latencies.append(done[landed[0].block] - sent[0])
                emit(figure="steer_latency", size=size, parallel=p, switch_mode=mode, steered_before_tick=at,
                     landed_block=landed[0].block, seconds=round(latencies[-1], 4))
        if latencies:
            emit(figure="steer_latency_summary", size=size, parallel=p, switch_mode=mode, runs=len(latencies),
                 min_s=round(min(latencies), 4), median_s=round(sorted(latencies)[len(latencies) // 2], 4),
                 max_s=round(max(latencies), 4))


def endless_runs(model, embeds, levels, a, device, size, steps) -> None:
    """Endless videos (blocks 0, a window needed) stopped after ``a.endless`` final blocks, after a warm-up
    of a few blocks: per-block GPU memory in use (flat: the KV cache, latent window and prompt table are
    bounded), the steady-state rate over the second half, and, with ``--switch-every N``, a steered
    switch to a new random prompt every N blocks (the prompts before each are dropped)."""
    for p in levels:
        cfg = run_config(a, steps, p, a.flashblock.split(",")[-1])
        for blocks in (3, a.endless):  # the first is the warm-up
            done, allocated = [], []
            g = torch.Generator().manual_seed(7)

            def on_block(e, done=done, allocated=allocated):  # no synchronisation: the GPU stays fed
                done.append(time.perf_counter())
                allocated.append(torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)

            def steer(done=done, g=g, sent=[0]):  # noqa: B006 - one counter per run
                due = a.switch_every and len(done) // a.switch_every > sent[0]
                sent[0] += bool(due)
                return [(None, torch.randn(embeds.shape, generator=g))] if due else []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            res = generate(model, PromptSchedule.single(embeds), cfg, blocks=0, width=a.width, height=a.height,
                           seed=0, on_block=on_block, should_stop=lambda done=done, n=blocks: len(done) >= n,
                           steer=steer)
            sync(device)
            end = time.perf_counter()  # the last block's latents are final on the device
            if blocks == 3:
                continue
            half = blocks // 2
            frames = video_frames(cfg.grid.total(blocks)) - video_frames(cfg.grid.total(half))
            gib = [round(x / 2**30, 3) for x in allocated]
            emit(figure="endless", size=size, parallel=p, window=a.window, sink=a.sink, blocks=res.blocks,
                 switch_every=a.switch_every, first_block_s=round(res.first_block_seconds, 4),
                 steady_fps=round(frames / (end - done[half - 1]), 2),
                 gib_at_block={b: gib[b - 1] for b in (10, half, blocks)}, gib_min_after_10=min(gib[9:]),
                 gib_max_after_10=max(gib[9:]), peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                 if device.type == "cuda" else None)


def lse_backends(device, repeats: int = 20) -> None:
    """Attention with log-sum-exp (the FlashBlock path) per fused backend (flash4, xformers where installed),
    against the public ``flex_attention(..., return_lse=True)`` (compiled): 12 heads x 128, bf16,
    4680 queries."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator(device).manual_seed(0)
    for keys in (4680, 32760):
        q = torch.randn(1, 12, 4680, 128, generator=g, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 12, keys, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
        fused = [n for n in attention.FUSED if n not in LIBRARY_KERNELS or LIBRARY_KERNELS[n].available()]
        calls = {name: (lambda name=name: (attention.set_backend(name), attention.attend_lse(q, k, v)))
                 for name in fused}
        calls["flex_attention"] = lambda: flex(q, k, v, return_lse=True)
        for name, call in calls.items():
            call()
            sync(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            sync(device)
            emit(figure="attend_lse", backend=name, queries=4680, keys=keys,
                 ms=round(start.elapsed_time(end) / repeats, 3))
    attention.set_backend("auto")


def main(argv: list[str] | None = None) -> None:
    a, device, size, dtype, steps, levels = parse_arguments(argv, __doc__.splitlines()[0])
    model = WanModel.random(SIZES[size], seed=0, device=device, dtype=dtype)
    embeds = torch.randn(TEXT_TOKENS, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    # every row's deviation is measured against the exact engine: P1, no FlashBlock, no fp8
    exact = run_config(a, steps)
    reference = generate(model, PromptSchedule.single(embeds), exact, blocks=a.blocks, width=a.width,
                         height=a.height, seed=0).latents.float()
    if a.devices:  # the pool's GPUs hold the weights: none stay on --device beside rank 0's copy
        model.to("cpu")
        reference = reference.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.fp8:
        model = model.with_weight_dtype("fp8_e4m3fn_fast")
    model.compile_layers(a.compile)
    emit(figure="env", torch=torch.__version__, device=str(device),
         gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", size=size, family=a.family,
         steps=list(steps))

    for backend, flashblock, kv_dtype in itertools.product(*(x.split(",") for x in (a.backend, a.flashblock,
                                                                                a.kv_dtype))):
        for p in levels:
            attention.set_backend(backend)
            cfg = run_config(a, steps, p, flashblock, fold_clean=a.fold_clean, kv_dtype=kv_dtype)
            tag = dict(size=size, backend=backend, flashblock=flashblock, parallel=p, compile=a.compile,
                       fp8=a.fp8, kv_dtype=kv_dtype, fold_clean=a.fold_clean, devices=a.devices or str(device))
            for r, (res, seconds) in enumerate(timed_runs(model, embeds, cfg, a, device, tag)):
                lat = res.latents.float()
                frames = video_frames(lat.shape[2])
                emit(figure="cascade_dit", **tag, attention=cfg.attention, run=r, ticks=res.ticks,
                     seconds=round(seconds, 4), frames=frames, fps=round(frames / seconds, 2),
                     first_block_s=round(res.first_block_seconds, 4),
                     peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                     if device.type == "cuda" else None,
                     rel_l2_vs_exact=round(float((lat - reference).norm() / reference.norm()), 5))
                if a.devices:
                    exchange_row(a, tag, r, res.ticks)

    emit(figure="attention_backends", chosen=attention.measured_backends())
    if a.vae:
        for kind in dict.fromkeys(a.decoder.split(",")):
            end_to_end(model, embeds, levels, a, device, size, steps, kind)
    if a.lse and device.type == "cuda":
        lse_backends(device)
    if a.switch_every:
        switch_series(model, embeds, levels, a, device, size, steps)
    if a.steer_runs:
        steer_latency(model, embeds, levels, a, device, size, steps)
    if a.endless:
        endless_runs(model, embeds, levels, a, device, size, steps)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        attention.set_backend(a.backend.split(",")[0])
        cfg = run_config(a, steps, levels[0])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(model, PromptSchedule.single(embeds), cfg, blocks=a.blocks, width=a.width,
                     height=a.height, seed=0)
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
