"""The command line's runs: ``generate`` (latents, optionally decoded as they finish) and ``decode``
(latents written by ``generate --latents-out`` into an MP4 and/or PNGs).

Ctrl-C during a run asks it to stop before the next tick (on every device); what was decoded so far
is finalised as a playable MP4, and :class:`Stopped` carries the one line to print (exit code 130).
A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import torch
from tqdm import tqdm

from .. import distributed
from ..common.constants import DTYPES
from ..common.stop import StopRequest
from ..model import attention
from ..model.dit import WanConfig
from ..model.fp8 import quantize_layers
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.context import context_notes
from ..sampling.families import describe
from ..sampling.loop import BlockEvent, Interrupted, Result, generate
from ..sampling.plan import latent_size
from ..sampling.recompute import why_a_vae
from ..video.frames import FrameStream, VideoWriter, load_decoder
from ..video.reencode import ContextReencoder
from ..weights.safe_io import save_safetensors
from . import checks as cli_checks
from . import prefix as cli_prefix
from .checks import UsageError
from .inputs import (
    BUILTIN,
    build_model,
    check_text_arguments,
    load_weights,
    prompt_embeddings,
    resolve_device,
    several_devices,
    single_tensor,
)

DEFAULT_VIDEO = "out/video.mp4"


class Stopped(Exception):
    """The run was stopped by Ctrl-C; the message says where and what was kept (exit code 130)."""


class BlockProgress:
    """A progress bar on stderr (tqdm), advanced per finished block; ``done`` counts the blocks
    (``blocks`` None: an endless video, a counter without a total)."""

    def __init__(self, blocks: int | None, enabled: bool, unit: str = "block"):
        self.blocks, self.enabled, self.done = blocks, enabled, 0
        self.bar = tqdm(total=blocks, unit=unit, disable=not enabled, file=sys.stderr, leave=True,
                        dynamic_ncols=True)

    def __call__(self, event) -> None:
        self.bar.update(event.block + 1 - self.done)
        self.done = event.block + 1

    def close(self) -> None:
        self.bar.close()


def vae_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in a run of ``dtype`` on ``device``: fp32 on the CPU or for fp32 runs, else fp16."""
    return torch.float32 if device.type == "cpu" or dtype == torch.float32 else torch.float16


def open_video(vae: str, video_out: str | None, frames_dir: str | None, device: torch.device,
               dtype: torch.dtype, decoder=None) -> tuple[VideoWriter, FrameStream]:
    """The decoder of ``vae`` (:func:`vae_dtype`; or ``decoder``, that file's already loaded) streaming
    into an MP4 (``video_out``; none when only ``frames_dir`` is given) and/or PNGs in ``frames_dir``."""
    decoder = decoder or load_decoder(vae, vae_dtype(device, dtype), device)
    writer = VideoWriter(video_out, frames_dir=frames_dir)
    return writer, FrameStream(decoder, on_frames=writer.write, keep=False)


def kept(writer: VideoWriter | None) -> str:
    """What a stopped run leaves: the finalised MP4 and its frame count, or the PNG folder."""
    if writer is None or writer.count == 0:
        return "no frames were decoded yet"
    where = " and ".join(x for x in (writer.path, writer.frames_dir) if x)
    return f"{where} {'hold' if writer.path and writer.frames_dir else 'holds'} {writer.count} frames"


def summary(result: Result, latents: torch.Tensor, args, model_label: str, device, cfg: CascadeConfig) -> dict:
    """The JSON line: what was made (``latents``, the output: ``latent_frames``; ``video_frames`` only
    where decoded), timing (``latent_frames_per_second``: the generated frames) and the attention
    kernels (``attention_kernels``: what ``auto`` measured and chose in this process, per kind of call;
    empty where nothing was measured here: a pinned backend, a CPU, or the worker pool's processes)."""
    latent_frames = latents.shape[2]
    generated = cfg.grid.total(result.blocks)
    return {
        "model": model_label,
        "device": str(device),
        "blocks": result.blocks,
        "ticks": result.ticks,
        "forwards": result.forwards,
        "parallel": cfg.parallel,
        "fp8": args.fp8,
        "attention_backend": args.attention_backend,
        "attention_kernels": attention.measured_backends(),
        "latent_shape": list(latents.shape),
        "latent_frames": latent_frames,
        "seconds": round(result.seconds, 4),
        "first_block_seconds": round(result.first_block_seconds, 4),
        "latent_frames_per_second": round(generated / result.seconds, 2),
        "latents_out": args.latents_out,
    }


def check_outputs(args) -> None:
    """Every output path of ``generate`` (and the decoder they need), before any model work."""
    if (args.video_out or args.frames_dir) and not args.vae:
        raise UsageError("--video-out and --frames-dir need --vae FILE (the decoder)")
    cli_checks.check_output_file("--latents-out", args.latents_out)
    cli_checks.check_output_file("--video-out", video_path(args))
    cli_checks.check_output_folder("--frames-dir", args.frames_dir)
    cli_checks.check_input("--vae", args.vae)


def kept_latents(path: str | None, finished: list[torch.Tensor], lead: torch.Tensor | None = None) -> str:
    """Write the finished blocks' latents of a stopped run to ``path``, after ``lead`` (the latent
    frames before block 0 that the output starts with, if any); the words for the message."""
    if not path or not finished:
        return ""
    parts = ([] if lead is None else [lead.to(finished[0])]) + finished
    save_safetensors({"latents": torch.cat(parts, 2).cpu()}, os.path.realpath(path))
    after = "" if lead is None else f" after {lead.shape[2]} given latent frames"
    return f"; {path} holds the latents of {len(finished)} blocks{after}"


def video_path(args) -> str | None:
    """The MP4 of a run: --video-out; with --vae and neither --video-out nor --frames-dir, out/video.mp4."""
    if args.video_out or not args.vae:
        return args.video_out
    return None if args.frames_dir else DEFAULT_VIDEO


def weight_bytes(model_cfg: WanConfig, weights, dtype: torch.dtype) -> int:
    if weights is not None:
        return sum(t.numel() * t.element_size() for t in weights[0].values())
    from ..model.dit import WanModel

    with torch.device("meta"):
        return sum(p.numel() for p in WanModel(model_cfg).parameters()) * torch.empty((), dtype=dtype).element_size()


def _prepare(args, devices, device: torch.device, dtype: torch.dtype, cfg: CascadeConfig, switches, prefix_in):
    """The model, its label, the prompt schedule (embeddings [L, text_dim]) and its label, the
    initial noise (or None) and the context prefix (or None) of a ``generate`` run: files read and
    checked, memory estimated (one device), the prefix encoded before the DiT is built.
    ``switches``: :func:`cli_checks.prompt_switches`; ``prefix_in``: :func:`cli_prefix.read_prefix`."""
    weights = load_weights(args, dtype)  # checked (and kept on the CPU) before the text encoder runs
    if devices is None:  # several devices: the worker pool checks each GPU for its own share
        model_cfg = BUILTIN if weights is None else WanConfig.from_state_dict(weights[0], weights[1].num_heads)
        vae_bytes = cli_checks.input_bytes(args.vae) if args.vae else 0
        vae_bytes *= 2 if cfg.kv_recompute else 1  # the context re-encoder holds its own copy
        cli_checks.check_memory(device, model_cfg, dtype, weight_bytes(model_cfg, weights, dtype), cfg, args,
                                vae_bytes, 0 if prefix_in is None else prefix_in.frames)
    prefix = None if prefix_in is None else cli_prefix.prefix_latents(
        prefix_in, cfg, args.context_frames, args.vae, device, vae_dtype(device, dtype))
    texts = ([args.prompt] if args.prompt is not None else []) + [v for _, v, is_file in switches if not is_file]
    encoded = prompt_embeddings(args, texts, device) if texts else []
    embeds = encoded.pop(0) if args.prompt is not None else None
    prompt_label = None if embeds is None else f"{len(embeds)} tokens"
    # several local devices: the weights stay on the CPU here and go to the workers once
    model, label = build_model(weights, torch.device("cpu") if isinstance(devices, list) else device, dtype)
    del weights
    if args.fp8:
        quantize_layers(model)
    model.compile_layers(args.compile == "on" or (args.compile == "auto" and device.type == "cuda"))
    if args.embeds:
        embeds = single_tensor(args.embeds, "a [L, 4096] prompt embedding")
    elif embeds is None:
        embeds = torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(args.seed))
    noise = single_tensor(args.noise, "the initial noise") if args.noise else None
    entries = [(0, embeds)] + [(b, single_tensor(v, "a [L, 4096] prompt embedding") if is_file else encoded.pop(0))
                               for b, v, is_file in switches]
    return model, label, PromptSchedule(entries), prompt_label, noise, prefix


@contextlib.contextmanager
def _refusal_reaches_every_rank(torchrun: bool):
    """Under torchrun only rank 0 reads the files: a failure there is passed on to the other ranks,
    which wait in generate_collective, so they end at once (quietly) instead of at the timeout."""
    try:
        yield
    except Exception as exc:
        if torchrun:
            distributed.refuse_collective(str(exc))
        raise


def run_generate(args) -> dict | None:
    """``generate``: every check first, then the run; the summary dict (None on torchrun ranks > 0).

    Raises UsageError/ValueError/CheckpointError (exit 2), WorkerError (exit 1), Stopped (exit 130)."""
    devices = several_devices(args)
    dtype = DTYPES[args.dtype]
    cfg, family, assumed = cli_checks.sampling_config(args)
    if args.blocks < 0:
        raise UsageError(f"--blocks must be >= 1 (0: endless, until Ctrl-C), got {args.blocks}")
    endless = args.blocks == 0
    if endless and args.noise:
        raise UsageError("--noise gives the initial noise of a video of known length; an endless one (--blocks 0) "
                         "draws each block's as it enters: leave --noise out")
    switches = cli_checks.prompt_switches(args.switch, args.blocks)
    ranks = 1 if devices is None else len(devices) if isinstance(devices, list) else int(os.environ.get("WORLD_SIZE", 2))
    try:
        cfg.check_run(len(switches), ranks, endless)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    latent_size(args.width, args.height)
    cfg, prefix_notes = cli_prefix.prefix_settings(args, cfg)
    check_text_arguments(args, sum(not is_file for *_, is_file in switches))
    cli_checks.check_settings(args, cfg)
    check_outputs(args)
    prefix_in = cli_prefix.read_prefix(args, cfg)
    warnings = cli_checks.length_warnings(cfg, args.blocks, 0 if prefix_in is None else prefix_in.frames)
    if devices == "torchrun":  # every rank checks everything before it joins the group
        device = distributed.rank_device(int(os.environ.get("LOCAL_RANK", "0")))
        where = f"{os.environ.get('WORLD_SIZE', '?')} ranks (torchrun)"
    else:
        device = resolve_device(args.device) if devices is None else devices[0]
        where = str(device) if devices is None else ",".join(map(str, devices))
    cli_checks.check_backend(args.attention_backend, device, dtype)
    cli_checks.check_fp8(args.fp8, device)
    attention.set_backend(args.attention_backend)
    if devices == "torchrun":
        distributed.init_from_env()
        if torch.distributed.get_rank() != 0:  # weights, prompt and noise come from rank 0
            distributed.generate_collective(None, None, None, device=device)
            return None
    context_image = None  # a KV recompute's re-encoder (one device: check_run refuses several)
    if why_a_vae(args.blocks, cfg.frames_per_block, cfg.kv_recompute):
        context_image = ContextReencoder.from_file(args.vae, dtype=vae_dtype(device, dtype), device=device)
    with _refusal_reaches_every_rank(devices == "torchrun"):
        model, label, prompts, prompt_label, noise, prefix = _prepare(args, devices, device, dtype, cfg, switches,
                                                                      prefix_in)
    if prefix_in is not None and prefix_in.source != "image":
        prefix_notes += [f"note: {line}" for line in context_notes(args.context_frames, prefix.shape[2])]
    warnings[0:0] = prefix_notes
    if assumed:  # said once every check has passed (a refusal stays one line)
        warnings.insert(0, f"note: family {family} assumed ({assumed}); --family sets another")
    for line in warnings:
        print(line, file=sys.stderr)
    writer = frames = progress = None
    if args.vae:
        writer, frames = open_video(args.vae, video_path(args), args.frames_dir, device, dtype,
                                    None if context_image is None else context_image.decoder)  # read once
    head = None if prefix_in is None else prefix_in.head  # given latents before the context, output as they are
    lead = None if prefix is None else prefix if head is None else torch.cat([head, prefix], 2)

    finished = []  # latents [1, 16, fpb, h, w] of the finished blocks, kept for a stopped run

    def on_block(event):
        if args.latents_out and not endless:  # an endless run writes its last window (Result.latents)
            finished.append(event.latents)  # no copy in the tick loop; written only if stopped
        # after Ctrl-C: no new decoding, what was decoded is kept; an endless run's every final block is
        if frames is not None and (endless or not stop()):
            frames.push(event)
        progress(event)

    run, pool, startup = generate, None, None
    start = time.perf_counter()
    with StopRequest() as stop:
        try:
            if devices == "torchrun":
                run = functools.partial(distributed.generate_collective, device=device)
            elif devices is not None:
                pool = distributed.WorkerPool(devices)
                startup = time.perf_counter() - start
                run = pool.generate
            progress = BlockProgress(args.blocks or None, not args.quiet)  # after the workers' start-up
            if frames is not None and lead is not None:  # the video starts with the frames before block 0,
                for at in range(0, lead.shape[2], cfg.frames_per_block):  # pushed a block's worth at a time
                    if stop():  # Ctrl-C while a long given video is decoded: what is decoded is kept
                        raise Interrupted("stopped while decoding the frames before block 0")
                    frames.push(BlockEvent(-1, lead[:, :, at:at + cfg.frames_per_block].to(dtype), 0, 0.0))
            result = run(model, prompts, cfg, blocks=args.blocks, width=args.width,
                         height=args.height, seed=args.seed, noise=noise, on_block=on_block,
                         on_tick=None if frames is None else frames.poll, should_stop=stop,
                         prefix=prefix, include_prefix=True,
                         **({} if context_image is None else {"context_image": context_image}))
            if frames is not None:
                frames.finish()
        except Interrupted:
            if frames is not None:
                frames.finish()  # the blocks that finished are decoded and written
            progress.close()  # ends the bar's line before the message
            where = (f"stopped at block {min(progress.done + 1, args.blocks)} of {args.blocks}" if args.blocks
                     else "stopped before the endless video's first block was final")
            raise Stopped(f"{where}; {kept(writer)}{kept_latents(args.latents_out, finished, lead)}") from None
        except KeyboardInterrupt as exc:  # a second Ctrl-C: say what the finalised files hold
            for done_with in (frames, writer):
                if done_with is not None:
                    done_with.close()
            raise KeyboardInterrupt(f"{exc}; {kept(writer)}") from None
        finally:
            if progress is not None:
                progress.close()
            if frames is not None:
                frames.close()  # its writer thread ends before the MP4 is closed
            if writer is not None:
                writer.close()
            if pool is not None:
                pool.close()
    latents = result.latents if head is None or endless else torch.cat([head.to(result.latents), result.latents], 2)
    if args.latents_out:
        save_safetensors({"latents": latents}, os.path.realpath(args.latents_out))  # through a link
    out = summary(result, latents, args, label, where, cfg)
    out.update(family=family, family_assumed=assumed, settings=describe(cfg),
               prompt_switches=[b for b, *_ in switches])
    if endless:  # ended by Ctrl-C, its normal end; the latents are its last window
        given_before = 0 if head is None else head.shape[2]  # the output video's frames before the context
        out.update(endless=True, stopped="Ctrl-C", latents_first_frame=given_before + result.first_frame,
                   generated_latent_frames=cfg.grid.total(result.blocks))
    if startup is not None:
        out["worker_startup_seconds"] = round(startup, 4)
    if writer is not None:
        seconds = time.perf_counter() - start - (startup or 0.0)
        out.update(video_frames=writer.count, video_out=writer.path, frames_dir=args.frames_dir,
                   end_to_end_seconds=round(seconds, 4), video_frames_per_second=round(writer.count / seconds, 2))
    if prompt_label:
        out["prompt"] = prompt_label
    if prefix_in is not None:
        written = prefix.shape[2]  # the context's frames (an endless run's latents may have left them behind)
        given = written + (0 if prefix_in.head is None else prefix_in.head.shape[2])
        out.update(prefix_source=prefix_in.source, prefix_file=prefix_in.path, prefix_frames=written,
                   given_frames=given)
    return out


def run_decode(args) -> dict:
    """``decode``: latents [1, 16, T, H/8, W/8] (DiT space, as ``generate --latents-out`` writes them)
    through the streaming decoder into an MP4 and/or PNGs; the summary dict."""
    video_out = args.video_out or (None if args.frames_dir else DEFAULT_VIDEO)
    cli_checks.check_output_file("--video-out", video_out)
    cli_checks.check_output_folder("--frames-dir", args.frames_dir)
    device = resolve_device(args.device)
    latents = single_tensor(args.latents, "latents [1, 16, T, H/8, W/8]")
    cli_checks.check_latents("--latents", args.latents, latents)
    cli_checks.check_input("--vae", args.vae)
    start = time.perf_counter()
    writer, frames = open_video(args.vae, video_out, args.frames_dir, device, torch.float32)
    passes = range(0, latents.shape[2], args.frames_per_pass)
    progress = BlockProgress(len(passes), not args.quiet, unit="pass")
    with StopRequest() as stop:
        try:
            for i, at in enumerate(passes):
                if stop():
                    frames.finish()  # what was decoded is written before the count is told
                    progress.close()
                    raise Stopped(f"stopped at latent frame {at} of {latents.shape[2]}; {kept(writer)}")
                frames.push(BlockEvent(i, latents[:, :, at:at + args.frames_per_pass], 0, 0.0))
                frames.poll()
                progress(BlockEvent(i, None, 0, 0.0))  # passes handed to the decoder
            frames.finish()
        finally:
            progress.close()
            frames.close()
            writer.close()
    seconds = time.perf_counter() - start
    return {"latent_frames": latents.shape[2], "video_frames": writer.count, "video_out": video_out,
            "frames_dir": args.frames_dir, "seconds": round(seconds, 4)}
