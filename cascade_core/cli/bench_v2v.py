"""``python -m cascade_core.cli.bench_v2v``: video-to-video speed of the engine (StreamDiffusionV2's rules,
:mod:`sampling.v2v`) at each parallelism level, with the time from a chunk's frames in to its restyled frames out.

Random weights of the real shapes (speed does not depend on the values): the 1.3B DiT (1536/12/30/8960, bf16), the
Wan2.1 VAE's encoder (diffusers' ``AutoencoderKLWan`` at base width 96, its encoder half, fp16, through
:class:`video.vae_encode.StreamEncoder`) and its decoder (:class:`video.vae.WanVAEDecoder`, fp16); on a machine
without CUDA a tiny configuration (the DiT of ``--size tiny``, VAE base width 8, float32). The input is the synthetic
video of :func:`synthetic_video`, 1 + 4 ``chunks`` frames on the device in the model's dtype, cut as
StreamDiffusionV2 cuts it (chunk 0: frames 0..4, then 4 a chunk; chenfengxu714/StreamDiffusionV2
streamv2v/inference_wo_batch.py:256-298). Its reference, timed on the same shapes with its own code, is
``.peer/bench/peer_sdv2.py`` (not part of the pack).

One JSON line per figure (``run`` -1 is a warm-up; seconds from ``time.perf_counter`` after synchronising):
- ``v2v_encode``: the whole video through the streaming encoder, chunk by chunk (synchronised per chunk).
- ``v2v_dit`` per level P: the DiT alone on the encoded latents (:func:`sampling.v2v.video_to_video`, no decode):
  seconds, restyled video frames (1 + 4 chunks) and frames per second, ms per chunk, ticks, forwards, peak GPU
  memory, and the relative L2 deviation of its latents from the first level's (P1's when it comes first; the
  same seed, so the same noise).
- ``v2v_decode``: the DiT's latents through the streaming decoder, chunk by chunk (synchronised per chunk).
- ``v2v_end_to_end`` per level: frames in, encoded as the run asks for each chunk, decoded on the decoder's own
  CUDA stream as chunks finish (:class:`video.frames.FrameStream`): seconds from chunk 0's frames in to the last
  chunk's frames in host memory, frames per second, ``steady_fps`` (the second half's frames over its time), and
  the latency of a chunk (its frames handed in, the DiT's stream idle, to its restyled frames in host memory):
  ``first_chunk_latency_ms`` and median/mean/p90/max over chunks 1.. (the reference reports the same).
Bad arguments: one line, exit status 2, before any model work.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from ..common.constants import TEXT_TOKENS
from ..common.messages import first_line
from ..model import attention
from ..model.dit import WanModel
from ..sampling.config import PromptSchedule
from ..sampling.plan import latent_size
from ..sampling.v2v import video_to_video
from ..sampling.v2v_config import V2VConfig, taken_chunks, video_chunks
from ..video.frames import FrameStream
from ..video.vae import WanVAEDecoder
from ..video.vae_encode import StreamEncoder
from .bench import emit
from .bench_args import SIZES, steps_and_levels
from .checks import UsageError, check_backend
from .inputs import resolve_device
from .parser import OneLineParser

PROG = "python -m cascade_core.cli.bench_v2v"
V2V_SIZES = ("1.3B", "14B", "tiny")  # Wan2.1 DiTs (16 latent channels): StreamDiffusionV2's


def synthetic_video(frames: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """The benchmark's input [1, 3, frames, height, width] on the [-1, 1] scale: 0.8 sin(0.05 x + 0.07 y + 0.1 t +
    2 c) (pixel column x, row y, frame t, colour c), a slowly drifting pattern (little motion: StreamDiffusionV2's
    adaptive noise scale stays near its first value). The reference bench draws the same."""
    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1)
    y = torch.arange(height, dtype=torch.float32).view(1, 1, 1, height, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, 1, 1, 1, width)
    c = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1, 1)
    return (torch.sin(0.05 * x + 0.07 * y + 0.1 * t + 2.0 * c) * 0.8).to(device=device, dtype=dtype)


def random_encoder(device: torch.device, vae_dim: int, dtype: torch.dtype):
    """diffusers' ``AutoencoderKLWan`` (Wan2.1: 16 latent channels) at base width ``vae_dim`` with seeded random
    weights, its encoder half only (eval, no gradients), for :class:`StreamEncoder`."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(3)
    model = AutoencoderKLWan(base_dim=vae_dim)
    model.decoder = model.post_quant_conv = None  # the encoder half (video.vae decodes)
    torch.nn.Module.to(model, device, dtype)  # (diffusers' own .to warns about float32 modules it has none of)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (the DiT's; the decoder has a stream of its own)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def stats(seconds: list[float]) -> dict:
    """median, mean, p90 and max of ``seconds``, in milliseconds (empty for none)."""
    v = sorted(seconds)
    if not v:
        return {}
    p90 = v[min(len(v) - 1, math.ceil(0.9 * len(v)) - 1)]
    return {"median_ms": round(1000 * v[len(v) // 2], 2), "mean_ms": round(1000 * sum(v) / len(v), 2),
            "p90_ms": round(1000 * p90, 2), "max_ms": round(1000 * v[-1], 2)}


def chunk_bounds(chunks: int) -> list[tuple[int, int]]:
    """Video frames [lo, hi) of each chunk: [0, 5), then [1 + 4k, 5 + 4k)."""
    return [(0, 5)] + [(1 + 4 * k, 5 + 4 * k) for k in range(1, chunks)]


def encode_video(encoder, video: torch.Tensor, chunks: int, device: torch.device) -> tuple[torch.Tensor, list]:
    """Raw latents [1, 16, chunks + 1, h, w] (float32) of ``video`` through a new :class:`StreamEncoder`, chunk by
    chunk, and each chunk's seconds (synchronised)."""
    stream, out, seconds = StreamEncoder(encoder), [], []
    for lo, hi in chunk_bounds(chunks):
        sync(device)
        t0 = time.perf_counter()
        out.append(stream(video[:, :, lo:hi]))
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return torch.cat(out, 2), seconds


def decode_latents(decoder, latents: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list]:
    """Frames [1, 3, 1 + 4 (T - 1), H, W] of DiT-space latents [1, 16, T, h, w] through a new decoder stream, chunk 0's
    2 latent frames first, then one a chunk (as the run hands them out), and each chunk's seconds (synchronised)."""
    stream, out, seconds = decoder.stream(None), [], []
    bounds = [(0, 2)] + [(k, k + 1) for k in range(2, latents.shape[2])]
    for lo, hi in bounds:
        sync(device)
        t0 = time.perf_counter()
        out.append(stream.decode(latents[:, :, lo:hi]))
        stream.synchronize()
        seconds.append(time.perf_counter() - t0)
    return torch.cat(out, 2), seconds


def dit_run(model, prompts, cfg: V2VConfig, latents: torch.Tensor, video: torch.Tensor, chunks: int):
    """The DiT alone: :func:`video_to_video` on the encoded latents and their pixels (for the motion measure)."""
    pixels = video[:, :, :1 + 4 * chunks]
    return video_to_video(model, prompts, cfg, video_chunks(latents, pixels), seed=0, chunks=chunks)


def end_to_end(model, prompts, cfg: V2VConfig, encoder, decoder, video: torch.Tensor, chunks: int,
               device: torch.device, keep: bool = False) -> dict:
    """Frames in -> restyled frames out: each chunk's frames taken when the run asks for them (its time ``t_in``
    after the DiT's stream has drained), encoded by a new :class:`StreamEncoder`, the finished chunks decoded on
    the decoder's stream and handed out in host memory (``t_out``). Returns t_in, t_out (perf_counter seconds per
    chunk), frames (video frames per chunk), the result and, with ``keep``, the frames [1, 3, F, H, W]."""
    at, t_in, t_out, frames = [0], [], {}, {}

    def take(n: int):
        if at[0] + n > 1 + 4 * chunks:
            return None
        sync(device)
        t_in.append(time.perf_counter())
        pixels = video[:, :, at[0]:at[0] + n]
        at[0] += n
        return pixels

    def out(event):
        t_out[event.block], frames[event.block] = time.perf_counter(), event.frames.shape[2]

    stream = FrameStream(decoder, on_frames=out, keep=keep)
    try:
        result = video_to_video(model, prompts, cfg, taken_chunks(take, StreamEncoder(encoder)), seed=0,
                                chunks=chunks, on_chunk=stream.push, on_tick=stream.poll, keep=False)
        video_out = stream.finish()
    finally:
        stream.close()
    return {"t_in": t_in, "t_out": [t_out[k] for k in range(chunks)], "frames": [frames[k] for k in range(chunks)],
            "result": result, "video": video_out}


def latency_row(level: int, run: int, timed: dict, device: torch.device) -> dict:
    """The ``v2v_end_to_end`` figure of one run (see the module docstring)."""
    t_in, t_out, frames = timed["t_in"], timed["t_out"], timed["frames"]
    n, total = len(t_in), timed["t_out"][-1] - timed["t_in"][0]
    half = n // 2
    latency = [o - i for i, o in zip(t_in, t_out)]
    return dict(figure="v2v_end_to_end", parallel=level, run=run, chunks=n, seconds=round(total, 4),
                frames=sum(frames), fps=round(sum(frames) / total, 2),
                steady_fps=round(sum(frames[half:]) / (t_out[-1] - t_out[half - 1]), 2) if half else None,
                first_chunk_latency_ms=round(1000 * latency[0], 2), latency=stats(latency[1:]),
                ticks=timed["result"].ticks, peak_gib=peak_gib(device))


def peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def parse_arguments(argv: list[str] | None):
    """(options, device, size, dtype, steps, levels); exits with status 2 and one line on bad input."""
    ap = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=V2V_SIZES, help="DiT shape (default: 1.3B on CUDA, tiny on CPU)")
    ap.add_argument("--parallel", default="all", help="levels to run, e.g. 1,2 (default: 1..steps)")
    ap.add_argument("--steps", default="700,500", help="timesteps (StreamDiffusionV2: 700,500; 700,500,400,200)")
    ap.add_argument("--chunks", type=int, default=20, help="chunks of input: 1 + 4 chunks video frames")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per level (after one warm-up)")
    ap.add_argument("--vae-dim", type=int, help="the VAE's base width (default: 96 on CUDA, 8 on CPU)")
    ap.add_argument("--backend", default="auto", help="attention backend")
    ap.add_argument("--compile", action="store_true", help="torch.compile the layers' non-attention regions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    try:
        a = ap.parse_args(argv)
        device = resolve_device(a.device)
        size = a.size or ("1.3B" if device.type == "cuda" else "tiny")
        if device.type == "cpu" and size != "tiny":
            raise UsageError("the real shapes need a GPU; use --size tiny on the CPU")
        for flag, value, least in (("--chunks", a.chunks, 2), ("--runs", a.runs, 1), ("--vae-dim", a.vae_dim, 1)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be at least {least}, got {value}")
        try:
            latent_size(a.width, a.height, SIZES[size].patch_size, SIZES[size].latent_space)
        except ValueError as exc:
            raise UsageError(first_line(exc)) from None
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        check_backend(a.backend, device, dtype, flag="--backend")
        steps, levels = steps_and_levels(a.steps, a.parallel, beyond_steps=0)  # no clean pass
        try:
            for p in levels:
                V2VConfig(steps=steps, parallel=p).validate()
        except ValueError as exc:
            raise UsageError(first_line(exc)) from None
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return a, device, size, dtype, steps, levels


def main(argv: list[str] | None = None) -> None:
    a, device, size, dtype, steps, levels = parse_arguments(argv)
    gpu = device.type == "cuda"
    vae_dtype = torch.float16 if gpu else torch.float32
    vae_dim = a.vae_dim or (96 if gpu else 8)
    attention.set_backend(a.backend)
    model = WanModel.random(SIZES[size], seed=0, device=device, dtype=dtype)
    model.compile_layers(a.compile)
    prompts = PromptSchedule.single(torch.randn(TEXT_TOKENS, model.cfg.text_dim,
                                                generator=torch.Generator().manual_seed(1)))
    encoder = random_encoder(device, vae_dim, vae_dtype)
    torch.manual_seed(4)
    decoder = WanVAEDecoder(dim=vae_dim).to(device, vae_dtype).eval()
    video = synthetic_video(1 + 4 * a.chunks, a.height, a.width, device, dtype)
    emit(figure="env", torch=torch.__version__, device=str(device), gpu=torch.cuda.get_device_name(device)
         if gpu else "cpu", size=size, width=a.width, height=a.height, steps=list(steps), chunks=a.chunks,
         vae_dim=vae_dim, compile=a.compile, backend=a.backend)

    for r in range(a.runs + 1):  # the first is the warm-up
        latents, seconds = encode_video(encoder, video, a.chunks, device)
        emit(figure="v2v_encode", run=r - 1, chunks=a.chunks, seconds=round(sum(seconds), 4),
             first_chunk_ms=round(1000 * seconds[0], 2), per_chunk=stats(seconds[1:]))

    exact = None
    for p in levels:
        cfg = V2VConfig(steps=steps, parallel=p)
        reset_peak(device)
        for r in range(a.runs + 1):
            sync(device)
            t0 = time.perf_counter()
            res = dit_run(model, prompts, cfg, latents, video, a.chunks)
            sync(device)
            seconds = time.perf_counter() - t0
            out = res.latents.float()
            exact = out if exact is None else exact  # P1's, when levels start at 1
            frames = 1 + 4 * a.chunks
            emit(figure="v2v_dit", parallel=p, run=r - 1, chunks=res.chunks, seconds=round(seconds, 4), frames=frames,
                 fps=round(frames / seconds, 2), per_chunk_ms=round(1000 * seconds / res.chunks, 2),
                 first_chunk_s=round(res.first_chunk_seconds, 4), ticks=res.ticks, forwards=res.forwards,
                 peak_gib=peak_gib(device), rel_l2_vs_first_level=round(float((out - exact).norm() / exact.norm()), 6))
        if p == levels[0]:
            dit_latents = res.latents
    for r in range(a.runs + 1):
        _, seconds = decode_latents(decoder, dit_latents, device)
        emit(figure="v2v_decode", run=r - 1, chunks=a.chunks, seconds=round(sum(seconds), 4),
             first_chunk_ms=round(1000 * seconds[0], 2), per_chunk=stats(seconds[1:]))

    for p in levels:
        cfg = V2VConfig(steps=steps, parallel=p)
        reset_peak(device)
        for r in range(a.runs + 1):
            emit(**latency_row(p, r - 1, end_to_end(model, prompts, cfg, encoder, decoder, video, a.chunks, device),
                               device))


if __name__ == "__main__":
    main()
