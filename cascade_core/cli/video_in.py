"""``generate --family streamdiffusionv2 --video-in FILE``: StreamDiffusionV2's video-to-video from the command
line (the engine: :mod:`sampling.v2v`).

The input is a video file (:class:`video.sources.FileSource`: PyAV, every frame resized to --width x --height by
:func:`video.frame_source.fit_frames`, StreamDiffusionV2's rule; then :func:`video.frame_source.to_pixels` in the
run's dtype), encoded chunk by chunk with --vae's Wan2.1 encoder (:class:`video.vae_encode.StreamEncoder`: the raw
mean, no latent normalisation), or raw latents
[1, 16, T, H/8, W/8] in a .safetensors (its size is the run's; with no pixels the motion measure is 0: a still
input's noise scales). The length comes from the input: (frames - 1) // 4 chunks, the trailing frames dropped
(--blocks is not used). The outputs (--latents-out, the decoded video) hold the restyled latents
[1, 16, chunks + 1, h, w] in DiT space (what SDv2 decodes). Settings the family has no place for are refused
in one line before any model work; Ctrl-C stops before the next tick, keeping what was decoded.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from ..common.constants import DTYPES
from ..common.stop import StopRequest
from ..model import attention
from ..model.compiling import resolve_compile
from ..model.dit import WanConfig
from ..sampling.config import PromptSchedule
from ..sampling.ticks import Interrupted
from ..sampling.v2v import video_to_video
from ..sampling.v2v_config import V2VConfig, chunk_count, sdv2_steps, taken_chunks, v2v_config, video_chunks
from ..video.frame_source import to_pixels
from ..video.sources import FileSource, count_frames
from ..weights.safe_io import save_safetensors
from . import checks as cli_checks
from .checks import UsageError
from .inputs import (
    build_model,
    check_text_arguments,
    load_weights,
    prompt_embeddings,
    resolve_checkpoint,
    resolve_device,
    single_tensor,
)
from .outputs import BlockProgress, check_outputs, kept, open_video, vae_dtype, video_path

FAMILY = "streamdiffusionv2"
RUNS_ON = "--video-in runs StreamDiffusionV2's video-to-video on"  # the refusal of another model: "... on a Wan2.1 DiT"
WAN_14B_DIM = 5120
LATENTS_EXT = ".safetensors"
PATCH = WanConfig.patch_size  # (t, h, w) of every Wan DiT the engine runs
# options of text-to-video that StreamDiffusionV2's video-to-video has no place for: (flag, attribute, default)
NOT_HERE = (("--devices", "devices", None), ("--image", "image", None), ("--continue", "continue_from", None),
            ("--context-frames", "context_frames", 0), ("--preview-vae", "preview_vae", None),
            ("--preview-out", "preview_out", None), ("--decode-device", "decode_device", "auto"),
            ("--swap-blocks", "swap_blocks", -1), ("--kv-recompute", "kv_recompute", None),
            ("--window", "window", None), ("--sink", "sink", None), ("--frames-per-block", "frames_per_block", None),
            ("--independent-first-frame", "independent_first_frame", None),
            ("--first-block-steps", "first_block_steps", None), ("--warp", "warp", None),
            ("--context-noise", "context_noise", None), ("--attention", "attention", None),
            ("--flashblock", "flashblock", "off"), ("--fold-clean", "fold_clean", False),
            ("--switch-mode", "switch_mode", None), ("--kv-dtype", "kv_dtype", "default"))


class StoppedInput(Exception):
    """Ctrl-C stopped the run; the message says where and what was kept (cli.run turns it into its Stopped)."""


def wanted(args) -> bool:
    """Whether ``generate`` restyles a video (--video-in, or the streamdiffusionv2 family)."""
    return getattr(args, "video_in", None) is not None or args.family == FAMILY


@dataclasses.dataclass
class Checked:
    """What :func:`check` found: the settings, the device and dtype, the input (its chunks, its latents when
    given as latents) and the prompt switches (at chunks)."""
    cfg: V2VConfig
    device: torch.device
    dtype: torch.dtype
    chunks: int
    latents: torch.Tensor | None
    switches: list
    notes: list[str]


def check(args) -> Checked:
    """Every refusal of a video-to-video ``generate`` before model work (UsageError, one line)."""
    notes = []
    if args.family is None:
        args.family = FAMILY
        notes.append(f"note: family {FAMILY} assumed (--video-in restyles a video as StreamDiffusionV2 does)")
    if args.family != FAMILY:
        raise UsageError(f"--video-in restyles a video as StreamDiffusionV2 does: it takes --family {FAMILY}, got "
                         f"--family {args.family}")
    if args.video_in is None:
        raise UsageError(f"--family {FAMILY} restyles a video: give it with --video-in FILE (a video, with --vae; or "
                         f"raw latents [1, 16, T, H/8, W/8] in a .safetensors)")
    given = [flag for flag, name, default in NOT_HERE if getattr(args, name, default) != default]
    if given:
        raise UsageError(f"--video-in ({FAMILY}) has its own chunks, cache and schedule; it takes no "
                         f"{', '.join(given)}")
    if args.width % 16 or args.height % 16 or args.width < 16 or args.height < 16:
        raise UsageError(f"--width and --height must be positive multiples of 16, got {args.width}x{args.height}")
    notes += resolve_checkpoint(args)  # a file of a pair's expert: the pair (refused below), a shard: its folder
    # a model of another kind than SDv2's is refused there; --parallel is the video-to-video rule's (v2v_config)
    cascade, _, _ = cli_checks.sampling_config(args, runs=RUNS_ON, own_parallel=True)
    given = {"noise_scale": args.noise_scale, "parallel": args.parallel}
    settings = {k: v for k, v in given.items() if v is not None}
    try:
        cfg = v2v_config(cascade, **settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cli_checks.check_input("--video-in", args.video_in)
    latents = None
    if args.video_in.lower().endswith(LATENTS_EXT):
        latents = single_tensor(args.video_in, "raw latents [1, 16, T, H/8, W/8]")
        ph, pw = PATCH[1:]  # a Wan2.1 DiT's patch: the latents' height and width are whole patches, at least one
        if latents.dim() != 5 or latents.shape[:2] != (1, 16) or latents.shape[2] < 2 \
                or latents.shape[3] < ph or latents.shape[4] < pw or latents.shape[3] % ph or latents.shape[4] % pw:
            raise UsageError(f"--video-in {args.video_in}: expected raw latents [1, 16, T, H/8, W/8] with T >= 2 and "
                             f"H/8, W/8 positive multiples of the DiT's patch {ph}x{pw}, got {list(latents.shape)}")
        args.height, args.width = 8 * latents.shape[3], 8 * latents.shape[4]  # the input's size is the run's
        chunks = latents.shape[2] - 1
    else:
        if not args.vae:
            raise UsageError(f"--video-in {args.video_in} is a video: give --vae FILE (the complete Wan2.1 VAE) to "
                             f"encode it (or raw latents in a .safetensors)")
        frames = count_frames(args.video_in)
        chunks = chunk_count(frames)
        if not chunks:
            raise UsageError(f"--video-in {args.video_in}: {frames} frames; StreamDiffusionV2's first chunk takes 5")
    switches = cli_checks.prompt_switches(args.switch, chunks)
    check_text_arguments(args, sum(not is_file for _, _, is_file, _ in switches))
    check_outputs(args)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    cli_checks.check_backend(args.attention_backend, device, dtype)
    cli_checks.check_weight_dtype(args, device)
    return Checked(cfg, device, dtype, chunks, latents, switches, notes)


def _source(args, run: Checked, source: FileSource | None):
    """The input's chunks, made as the run asks for them: its latents, or ``source``'s frames (uint8, resized to
    the run's size) on the [-1, 1] scale in the run's dtype, encoded chunk by chunk."""
    if run.latents is not None:
        return video_chunks(run.latents)
    from ..video.vae_encode import StreamEncoder, load_encoder

    encoder = StreamEncoder(load_encoder(args.vae, dtype=vae_dtype(run.device, run.dtype), device=run.device))

    def take(n: int):
        frames = source.take(n)
        return None if frames is None else to_pixels(frames, run.dtype)

    return taken_chunks(take, encoder)


def run_video_to_video(args) -> dict:
    """``generate --video-in``: the checks, the model, the run chunk by chunk (decoded as chunks finish with
    --vae), the outputs; the JSON summary. Raises UsageError/ValueError/CheckpointError and StoppedInput."""
    run = check(args)
    attention.set_backend(args.attention_backend)
    weights = load_weights(args, run.dtype)
    texts = ([args.prompt] if args.prompt is not None else []) + [v for _, v, file, _ in run.switches if not file]
    encoded = prompt_embeddings(args, texts, run.device) if texts else []
    model, label = build_model(weights, run.device, run.dtype, args.weight_dtype)
    del weights
    cfg = run.cfg
    if args.steps is None and model.cfg.dim == WAN_14B_DIM:  # SDv2 runs the 14B with --step 1 (run_v2v.sh:32)
        cfg = dataclasses.replace(cfg, steps=sdv2_steps(1))
        cfg.validate()
        run.notes.append("note: 14B: StreamDiffusionV2's one step, 700; --steps sets others")
    compiled, _ = resolve_compile(args.compile, run.device)
    model.compile_layers(compiled)
    embeds = encoded.pop(0) if args.prompt is not None else (
        single_tensor(args.embeds, "a [L, 4096] prompt embedding") if args.embeds else
        torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(args.seed)))
    entries = [(0, embeds)] + [(b, single_tensor(v, "a [L, 4096] prompt embedding") if file else encoded.pop(0))
                               for b, v, file, _ in run.switches]
    prompts = PromptSchedule(entries, {b: n for b, *_, n in run.switches if n})
    noise = single_tensor(args.noise, "the initial noise") if args.noise else None
    for line in run.notes:
        print(line, file=sys.stderr)
    writer = frames = None
    if args.vae:
        writer, frames = open_video(args.vae, video_path(args), args.frames_dir, run.device, run.dtype)
    finished = []
    progress = BlockProgress(run.chunks, not args.quiet, unit="chunk")

    def on_chunk(event):
        finished.append(event.latents)
        if frames is not None:
            frames.push(event)
        progress(event)

    start = time.perf_counter()
    source = None if run.latents is not None else FileSource(args.video_in, args.width, args.height)
    with StopRequest() as stop:
        try:
            result = video_to_video(model, prompts, cfg, _source(args, run, source), seed=args.seed, chunks=run.chunks,
                                    noise=noise, on_chunk=on_chunk, should_stop=stop,
                                    on_tick=None if frames is None else frames.poll, keep=False)
            if frames is not None:
                frames.finish()
        except Interrupted:
            if frames is not None:
                frames.finish()
            progress.close()
            raise StoppedInput(f"stopped at chunk {min(progress.done + 1, run.chunks)} of {run.chunks}; "
                               f"{kept(writer)}{_kept_latents(args.latents_out, finished)}") from None
        finally:
            progress.close()
            for done_with in (frames, writer, source):
                if done_with is not None:
                    done_with.close()
    seconds = time.perf_counter() - start
    latents = torch.cat(finished, 2)
    if args.latents_out:
        save_safetensors({"latents": latents.cpu()}, os.path.realpath(args.latents_out))
    out = {"model": label, "device": str(run.device), "family": FAMILY, "video_in": args.video_in,
           "chunks": result.chunks, "ticks": result.ticks, "forwards": result.forwards, "parallel": cfg.parallel,
           "settings": describe_v2v(cfg), "latent_shape": list(latents.shape), "latent_frames": latents.shape[2],
           "seconds": round(result.seconds, 4), "first_chunk_seconds": round(result.first_chunk_seconds, 4),
           "latent_frames_per_second": round(latents.shape[2] / result.seconds, 2), "latents_out": args.latents_out,
           "prompt_switches": [b for b, *_ in run.switches]}
    if writer is not None:
        out.update(video_frames=writer.count, video_out=writer.path, frames_dir=args.frames_dir,
                   end_to_end_seconds=round(seconds, 4))
    return out


def describe_v2v(cfg: V2VConfig) -> dict:
    """The effective video-to-video settings, for the summary."""
    return {"steps": list(cfg.steps), "shift": cfg.shift, "noise_scale": cfg.noise_scale,
            "cache_frames": cfg.cache_frames, "sink": cfg.sink, "adapt_sink_threshold": cfg.adapt_sink_threshold,
            "refresh_frames": cfg.refresh_frames, "parallel": cfg.parallel}


def _kept_latents(path: str | None, finished: list[torch.Tensor]) -> str:
    """Write the finished chunks' latents of a stopped run to ``path``; the words for the message."""
    if not path or not finished:
        return ""
    save_safetensors({"latents": torch.cat(finished, 2).cpu()}, os.path.realpath(path))
    return f"; {path} holds the latents of {len(finished)} chunks"
