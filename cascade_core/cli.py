"""``python -m cascade_core generate``: block-causal text-to-video latents from the command line.

Without ``--checkpoint`` a small built-in model with random weights runs (labelled untrained in the
summary), so the command works on any machine. ``--checkpoint`` reads any Wan2.1 T2V DiT layout
(:mod:`checkpoint`), ``--lora`` merges a LoRA into it, ``--prompt`` embeds a text with a local umt5-xxl
encoder (:mod:`text`). Bad arguments print one line and exit with code 2.
Progress goes to stderr, one JSON summary line to stdout.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

from . import attention, distributed
from .checkpoint import EMA_MODES, load_dit
from .fp8 import quantize_layers
from .frames import FrameStream, VideoWriter, load_decoder, video_frames
from .model import WanConfig, WanModel
from .safe_io import CheckpointError, read_tensor_file, save_safetensors
from .sampler import ATTENTION_MODES, FLASHBLOCK_MODES, CascadeConfig, PromptSchedule, Result, generate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUILTIN = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)  # untrained demo model


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block
        raise UsageError(message)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m cascade_core", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    g = sub.add_parser("generate", help="generate latent video")
    g.add_argument("--checkpoint", help="Wan2.1 T2V DiT weights: .safetensors (ComfyUI, diffusers, fp8), "
                                        "a training .pt (read with weights_only) or a diffusers/Wan folder")
    g.add_argument("--ema", choices=EMA_MODES, default="auto",
                   help="EMA weights of a training checkpoint (auto: when present and no --lora)")
    g.add_argument("--lora", help="LoRA merged into --checkpoint at load (LongLive, peft, ComfyUI/kohya keys)")
    g.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--embeds", help=".safetensors holding one [L, 4096] prompt embedding (random if absent)")
    text.add_argument("--prompt", help="prompt text, embedded with --text-encoder")
    g.add_argument("--text-encoder", help="umt5-xxl encoder weights (ComfyUI text_encoders/umt5_xxl_*.safetensors "
                                          "or Wan's models_t5_umt5-xxl-enc-bf16.pth)")
    g.add_argument("--tokenizer", help="local umt5-xxl tokenizer folder (optional when the encoder file "
                                       "carries its tokenizer, as ComfyUI's do)")
    g.add_argument("--width", type=int, default=832)
    g.add_argument("--height", type=int, default=480)
    g.add_argument("--blocks", type=int, default=7, help="latent blocks (7 x 3 latent frames = 81 video frames)")
    g.add_argument("--frames-per-block", type=int, default=3)
    g.add_argument("--steps", type=int_list, default=(1000, 750, 500, 250), help="denoising step list")
    g.add_argument("--shift", type=float, default=5.0)
    g.add_argument("--context-noise", type=float, default=0.0, help="timestep of the clean pass")
    g.add_argument("--parallel", type=int, default=1, help="blocks in flight, 1..steps+1")
    g.add_argument("--attention", choices=ATTENTION_MODES, default="causal", help="in-flight visibility")
    g.add_argument("--window", type=int, help="latent frames attended, sink and own block included")
    g.add_argument("--sink", type=int, default=0, help="first latent frames the window always keeps")
    g.add_argument("--flashblock", choices=FLASHBLOCK_MODES, default="off",
                   help="reuse block-external attention across a block's steps (reuse), or split exactly (exact)")
    g.add_argument("--fold-clean", action="store_true",
                   help="P1: run each clean pass in the next block's first forward (same result, fewer forwards)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=DTYPES, default="bf16")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when present)")
    g.add_argument("--devices", help="several devices sharing the KV pool, one worker process each: "
                                     "cuda:0,cuda:1,... (NCCL) or cpu,cpu (gloo); torchrun: the ranks torchrun "
                                     "started (several machines; see the README)")
    g.add_argument("--attention-backend", choices=attention.BACKENDS, default="auto")
    g.add_argument("--fp8", action="store_true",
                   help="fp8 matrix products in the transformer layers (faster on GPUs with fp8 units; approximate)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the layers (auto: on CUDA); the first run pays the compilation")
    g.add_argument("--noise", help=".safetensors with the initial noise [1, 16, T, H/8, W/8]")
    g.add_argument("--latents-out", help="write the latents [1, 16, T, H/8, W/8] to this .safetensors")
    g.add_argument("--vae", help="Wan2.1 VAE (file, or diffusers vae/ folder) or taew2_1 preview decoder "
                                 "weights: decode each block as it finishes, on its own CUDA stream")
    g.add_argument("--video-out", help="MP4 to write (with --vae; default out/video.mp4)")
    g.add_argument("--frames-dir", help="also write each frame as a PNG into this folder as it is decoded")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def single_tensor(path: str, what: str) -> torch.Tensor:
    tensors = read_tensor_file(path)
    if not isinstance(tensors, dict) or len(tensors) != 1:
        raise CheckpointError(path, f"expected exactly one tensor ({what})")
    return next(iter(tensors.values()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    devices = distributed.parse_devices(name)  # the one parser of device names: type, presence
    if len(devices) > 1:
        raise UsageError(f"--device takes one device; for several use --devices {name}")
    return devices[0]


def several_devices(args):
    """None (one device, --device), "torchrun", or the two or more devices of --devices."""
    if args.devices is None:
        return None
    if args.device != "auto":
        raise UsageError("--device and --devices exclude each other")
    if args.devices.strip().lower() == "torchrun":
        return "torchrun"
    devices = distributed.parse_devices(args.devices)
    if len(devices) == 1:
        args.device = str(devices[0])
        return None
    return devices


def load_weights(args, dtype: torch.dtype):
    """(state dict on the CPU, CheckpointInfo) of --checkpoint with --lora merged; None without one."""
    if args.checkpoint is None:
        return None
    return load_dit(args.checkpoint, dtype=dtype, ema=args.ema, lora=args.lora, lora_scale=args.lora_scale)


def build_model(weights, device: torch.device, dtype: torch.dtype) -> tuple[WanModel, str]:
    if weights is None:
        return WanModel.random(BUILTIN, seed=0).to(device, dtype), "built-in untrained model (random weights)"
    sd, info = weights
    return WanModel.from_state_dict(sd, device=device, num_heads=info.num_heads), info.describe()


def check_text_arguments(args) -> None:
    if args.lora and not args.checkpoint:
        raise UsageError("--lora needs --checkpoint (the base weights it is merged into)")
    if args.prompt is not None and not args.text_encoder:
        raise UsageError("--prompt needs --text-encoder FILE (umt5-xxl weights) and, unless that file carries "
                         "its tokenizer, --tokenizer DIR")
    if args.prompt is None and (args.text_encoder or args.tokenizer):
        raise UsageError("--text-encoder and --tokenizer are used only with --prompt")


def prompt_embeddings(args, device: torch.device) -> tuple[torch.Tensor, str]:
    """The --prompt text through the umt5 encoder, which is freed before the DiT loads."""
    from .text import TextEncoder

    encoder = TextEncoder.load(args.text_encoder, args.tokenizer, device=device,
                               dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    embeds = encoder([args.prompt])[0]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds, f"{len(embeds)} tokens"


class BlockProgress:
    """A one-line progress bar on stderr, advanced per finished block."""

    def __init__(self, blocks: int, enabled: bool):
        self.blocks, self.enabled, self.start = blocks, enabled, time.perf_counter()

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        done = event.block + 1
        bar = "#" * (20 * done // self.blocks)
        sys.stderr.write(f"\rblock {done}/{self.blocks} [{bar:<20}] {time.perf_counter() - self.start:6.1f} s")
        if done == self.blocks:
            sys.stderr.write("\n")
        sys.stderr.flush()


def summary(result: Result, args, model_label: str, device: torch.device | str) -> dict:
    frames = video_frames(result.latents.shape[2])
    return {
        "model": model_label,
        "device": str(device),
        "blocks": result.blocks,
        "ticks": result.ticks,
        "forwards": result.forwards,
        "parallel": args.parallel,
        "latent_shape": list(result.latents.shape),
        "video_frames": frames,
        "seconds": round(result.seconds, 4),
        "first_block_seconds": round(result.first_block_seconds, 4),
        "frames_per_second": round(frames / result.seconds, 2),
        "latents_out": args.latents_out,
    }


def run_generate(args) -> dict | None:
    devices = several_devices(args)
    if devices == "torchrun":
        device = distributed.init_from_env()
        if torch.distributed.get_rank() != 0:  # weights, prompt and noise come from rank 0
            distributed.generate_collective(None, None, None, device=device)
            return None
        where = f"{torch.distributed.get_world_size()} ranks (torchrun)"
    else:
        device = resolve_device(args.device) if devices is None else devices[0]
        where = str(device) if devices is None else ",".join(map(str, devices))
    dtype = DTYPES[args.dtype]
    attention.set_backend(args.attention_backend)
    cfg = CascadeConfig(steps=args.steps, shift=args.shift, frames_per_block=args.frames_per_block,
                        context_noise=args.context_noise, parallel=args.parallel, attention=args.attention,
                        window=args.window, sink=args.sink, flashblock=args.flashblock,
                        fold_clean=args.fold_clean)
    cfg.validate()
    if args.blocks < 1:
        raise UsageError(f"--blocks must be >= 1, got {args.blocks}")
    check_text_arguments(args)
    if (args.video_out or args.frames_dir) and not args.vae:
        raise UsageError("--video-out and --frames-dir need --vae FILE (the decoder)")
    weights = load_weights(args, dtype)  # checked (and kept on the CPU) before the text encoder runs
    embeds, prompt_label = None, None
    if args.prompt is not None:
        embeds, prompt_label = prompt_embeddings(args, device)
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
    progress = BlockProgress(args.blocks, not args.quiet)
    writer = frames = None
    if args.vae:
        vae_dtype = torch.float32 if device.type == "cpu" or dtype == torch.float32 else torch.float16
        decoder = load_decoder(args.vae, vae_dtype, device)
        writer = VideoWriter(args.video_out or "out/video.mp4", frames_dir=args.frames_dir)
        frames = FrameStream(decoder, on_frames=writer.write, keep=False)

    def on_block(event):
        if frames is not None:
            frames.push(event)
        progress(event)

    run, pool = generate, None
    if devices == "torchrun":
        run = functools.partial(distributed.generate_collective, device=device)
    elif devices is not None:
        pool = distributed.WorkerPool(devices)
        run = pool.generate
    start = time.perf_counter()
    try:
        result = run(model, PromptSchedule.single(embeds), cfg, blocks=args.blocks, width=args.width,
                     height=args.height, seed=args.seed, noise=noise, on_block=on_block,
                     on_tick=None if frames is None else frames.poll)
        if frames is not None:
            frames.finish()
    finally:
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.close()
    if args.latents_out:
        save_safetensors({"latents": result.latents}, args.latents_out)
    out = summary(result, args, label, where)
    if writer is not None:
        seconds = time.perf_counter() - start
        out.update(video_out=writer.path, frames_dir=args.frames_dir, frames_written=writer.count,
                   end_to_end_seconds=round(seconds, 4), frames_out_per_second=round(writer.count / seconds, 2))
    if prompt_label:
        out["prompt"] = prompt_label
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        out = run_generate(args)
        if out is not None:  # ranks other than 0 of a torchrun job print nothing
            print(json.dumps(out))
        return 0
    except (UsageError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except distributed.WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
