"""The command line's context prefix: ``generate --image FILE`` (a start image) and ``--continue FILE``
(latents that ``--latents-out`` wrote, or a video file), checked and read before any model work, then
encoded by the Wan2.1 VAE encoder (:mod:`video.vae_encode`) where they are pixels.

What the outputs hold (``--latents-out``, the decoded video): the start image's latent frame then the
generated blocks; with ``--continue LATENTS`` every given latent frame then the new ones (so runs
chain); with ``--continue VIDEO`` the encoded context frames then the new ones. The context of a
continuation is the last K latent frames (:func:`sampling.context.context_of`, K = ``--context-frames``, else
the window, else every frame).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..common.constants import DTYPES
from ..sampling.config import CascadeConfig
from ..sampling.context import CONTINUATION, START_IMAGE, context_frames_for, context_of, prefix_config
from ..sampling.plan import check_prefix, check_prefix_config, latent_size
from .checks import UsageError, check_input, check_latents

LATENTS_EXT = ".safetensors"


@dataclasses.dataclass
class PrefixInput:
    """A prefix as read from its file, before encoding. ``source``: "image", "latents" or "video";
    ``pixels`` [1, 3, T, H, W] in [-1, 1] to encode (image, video) or ``context`` [1, 16, K, h, w]
    (latents); ``head`` [1, 16, T - K, h, w]: the given latents before the context (latents only)."""
    source: str
    path: str
    pixels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    head: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        """Latent frames of the context (the pixels' 1 + (T - 1) // 4 before encoding)."""
        return self.context.shape[2] if self.context is not None else 1 + (self.pixels.shape[2] - 1) // 4


def prefix_settings(args, cfg: CascadeConfig) -> tuple[CascadeConfig, list[str]]:
    """The config of a run with ``--image``/``--continue`` (:func:`sampling.context.prefix_config`) and its
    ``note:`` lines; ``cfg`` unchanged without them. Reads no file. Raises UsageError for options
    that do not fit together or a config under which a prefix is not defined."""
    if args.context_frames < 0:
        raise UsageError(f"--context-frames must be >= 0 (0: the window, or every frame without one), "
                         f"got {args.context_frames}")
    if args.context_frames and not args.continue_from:
        raise UsageError("--context-frames needs --continue FILE (the video whose last frames are the context)")
    if args.image is None and args.continue_from is None:
        return cfg, []
    flag, path = ("--image", args.image) if args.image is not None else ("--continue", args.continue_from)
    cfg, notes = prefix_config(cfg, START_IMAGE if args.image is not None else CONTINUATION)
    try:  # the engine's own rule of where a prefix is defined, before what it needs and the file
        check_prefix_config(cfg)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    needs_vae = args.image is not None or not path.lower().endswith(LATENTS_EXT)
    if needs_vae and not args.vae:
        what = "an image" if args.image is not None else "a video (or give latents that --latents-out wrote)"
        raise UsageError(f"{flag} {path} needs --vae FILE (the complete Wan2.1 VAE) to encode {what}")
    check_input(flag, path)
    return cfg, [f"note: {line}" for line in notes]


def read_prefix(args, cfg: CascadeConfig) -> PrefixInput | None:
    """The file of ``--image``/``--continue`` read and checked (after :func:`prefix_settings`), None
    without one: an image or the last frames of a video as pixels of the run's size, or the latents'
    context and head. Raises UsageError for latents of another size, CheckpointError for a file that
    cannot be read."""
    from ..video.vae_encode import load_image, load_video
    from .inputs import single_tensor

    if args.image is not None:
        return PrefixInput("image", args.image, pixels=load_image(args.image, args.width, args.height))
    path = args.continue_from
    if path is None:
        return None
    if not path.lower().endswith(LATENTS_EXT):
        unbounded = sys.maxsize  # the count asked for, else the window; every frame without one
        most = context_frames_for(cfg, unbounded, args.context_frames)
        pixels = load_video(path, args.width, args.height, None if most == unbounded else most)
        return PrefixInput("video", path, pixels=pixels)
    latents = single_tensor(path, "latents [1, 16, T, H/8, W/8]")
    check_latents("--continue", path, latents)
    h, w = latent_size(args.width, args.height)
    if tuple(latents.shape[3:]) != (h, w):
        given_h, given_w = latents.shape[3:]
        raise UsageError(f"--continue {path}: its latents are {given_h}x{given_w} (a {8 * given_w}x{8 * given_h} "
                         f"video) but --width {args.width} --height {args.height} needs {h}x{w}")
    try:  # every given frame goes to the outputs: none may be NaN or overflow the run's dtype
        check_prefix(latents, cfg, h, w, DTYPES[args.dtype])
    except ValueError as exc:
        raise UsageError(f"--continue {path}: {exc}") from None
    context = context_of(latents, cfg, args.context_frames)
    return PrefixInput("latents", path, context=context, head=latents[:, :, :latents.shape[2] - context.shape[2]])


def prefix_latents(prefix: PrefixInput, cfg: CascadeConfig, asked: int, vae: str, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """The context prefix [1, 16, K, h, w] for :func:`sampling.loop.generate`: ``prefix.context``, or its
    pixels through the Wan2.1 VAE encoder of ``vae`` (``dtype`` on ``device``, freed afterwards) and,
    for a video, its last K latent frames (``asked``, see :func:`sampling.context.context_of`). Raises
    CheckpointError when ``vae`` is not a complete Wan2.1 VAE."""
    if prefix.context is not None:
        return prefix.context
    from ..video.vae_encode import encode, load_encoder

    encoder = load_encoder(vae, dtype=dtype, device=device)
    latents = encode(encoder, prefix.pixels).cpu()
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return latents if prefix.source == "image" else context_of(latents, cfg, asked)
