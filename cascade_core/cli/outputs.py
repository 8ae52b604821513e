"""What the command line writes and shows: the progress bar, the streaming decoder into an MP4 / PNGs, what a
stopped run keeps, the JSON summary, and the checks of every output path before any model work."""
from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from ..common.latent_space import WAN21_LATENTS
from ..model import attention
from ..model.fp8 import tensor_bytes, weight_dtype_of
from ..sampling.config import CascadeConfig
from ..sampling.loop import Result
from ..video.frames import FrameStream, VideoWriter, load_decoder
from ..weights.safe_io import save_safetensors
from . import checks as cli_checks
from .checks import UsageError

DEFAULT_VIDEO = "out/video.mp4"


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
               dtype: torch.dtype, decoder=None, latent_space=WAN21_LATENTS) -> tuple[VideoWriter, FrameStream]:
    """The decoder of ``vae`` (:func:`vae_dtype`; or ``decoder``, that file's already loaded) streaming
    into an MP4 (``video_out``; none when only ``frames_dir`` is given) and/or PNGs in ``frames_dir``;
    ``latent_space``: the run's (a decoder of another is refused naming both), whose frame rate the MP4 plays at
    (:attr:`LatentSpace.fps`: Wan2.1 16, Wan2.2 24)."""
    decoder = decoder or load_decoder(vae, vae_dtype(device, dtype), device, latent_space=latent_space)
    writer = VideoWriter(video_out, fps=latent_space.fps, frames_dir=frames_dir)
    return writer, FrameStream(decoder, on_frames=writer.write, keep=False)


def kept(writer: VideoWriter | None) -> str:
    """What a stopped run leaves: the finalised MP4 and its frame count, or the PNG folder."""
    if writer is None or writer.count == 0:
        return "no frames were decoded yet"
    where = " and ".join(x for x in (writer.path, writer.frames_dir) if x)
    return f"{where} {'hold' if writer.path and writer.frames_dir else 'holds'} {writer.count} frames"


def summary(result: Result, latents: torch.Tensor, args, model, model_label: str, device, cfg: CascadeConfig) -> dict:
    """The JSON line: what was made (``latents``, the output: ``latent_frames``; ``video_frames`` only
    where decoded), timing (``latent_frames_per_second``: the generated frames) and the attention
    kernels (``attention_kernels``: what ``auto`` measured and chose in this process, per kind of call;
    empty where nothing was measured here: a pinned backend, a CPU, or the worker pool's processes) and the
    weights (``weight_dtype``: the block weights' storage, :func:`model.fp8.weight_dtype_of`; ``weight_bytes``:
    the DiT's parameters and buffers as this process holds them)."""
    latent_frames = latents.shape[2]
    generated = cfg.grid.total(result.blocks)
    return {
        "model": model_label,
        "device": str(device),
        "blocks": result.blocks,
        "ticks": result.ticks,
        "forwards": result.forwards,
        "parallel": cfg.parallel,
        "weight_dtype": weight_dtype_of(model),
        "weight_bytes": tensor_bytes(model) if model.swap is None else model.swap.device_bytes(),
        "swapped_blocks": 0 if model.swap is None else model.swap.swapped,
        "kv_dtype": cfg.kv_dtype,
        "compiled": model.compiled,
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
    cli_checks.check_output_file("--video-out", video_path(args), ".mp4")
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
