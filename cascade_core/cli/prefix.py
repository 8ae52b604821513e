"""The command line's context prefix: ``generate --image FILE`` (a start image) and ``--continue FILE``
(latents that ``--latents-out`` wrote, or a video file), checked and read before any model work, then
encoded by the VAE encoder of the model's latent space (:mod:`video.vae_encode`: Wan2.1's, or Wan2.2's for
a Wan2.2 model) where they are pixels; and the latents ``decode`` reads (:func:`latents_to_decode`).

LongLive 2.0 (the families whose step rule is UniPC, :attr:`CascadeConfig.holds_image`) takes a start image otherwise: not
as a frame before block 0 but as block 0's frame 0, held at timestep 0 in every forward
(:func:`sampling.loop.generate`'s ``image_latent``; LongLive 2.0's image-to-video): the outputs hold no extra
frame, block 0 starts with the image's latent frame. One device (the worker pool does not take it).

What the outputs hold (``--latents-out``, the decoded video): the start image's latent frame then the
generated blocks; with ``--continue LATENTS`` every given latent frame then the new ones (so runs
chain); with ``--continue VIDEO`` the encoded context frames then the new ones. The context of a
continuation is the last K latent frames (:func:`sampling.context.context_of`, K = ``--context-frames``, else
the window, else every frame).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from ..common.constants import DTYPES
from ..common.latent_space import LATENT_SPACES, WAN21_LATENTS, LatentSpace
from ..sampling.config import CascadeConfig
from ..sampling.context import CONTINUATION, START_IMAGE, context_frames_for, context_of, prefix_config
from ..sampling.plan import RunPlan, check_prefix, check_prefix_config, latent_size
from ..sampling.ticks import check_image_latent
from .checks import UsageError, check_input, check_latents

LATENTS_EXT = ".safetensors"


@dataclasses.dataclass
class PrefixInput:
    """A prefix as read from its file, before encoding. ``source``: "image", "latents" or "video";
    ``pixels`` [1, 3, T, H, W] in [-1, 1] to encode (image, video) or ``context`` [1, C, K, h, w]
    (latents); ``head`` [1, C, T - K, h, w]: the given latents before the context (latents only); ``held``: an
    image that is block 0's frame 0 (LongLive 2.0, :attr:`CascadeConfig.holds_image`), not a frame before block 0."""
    source: str
    path: str
    pixels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    head: torch.Tensor | None = None
    held: bool = False

    @property
    def frames(self) -> int:
        """Latent frames of the context (the pixels' 1 + (T - 1) // 4 before encoding; 0 for a held image)."""
        if self.held:
            return 0
        return self.context.shape[2] if self.context is not None else 1 + (self.pixels.shape[2] - 1) // 4


def _space_words(args) -> str:
    """"the complete Wan2.1 VAE" / "...Wan2.2 VAE": the VAE that encodes for the model of --checkpoint."""
    from .checks import model_latent_space

    return f"the complete {model_latent_space(args).name} VAE"


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
    if args.image is not None and cfg.holds_image:
        return cfg, _held_image_settings(args)
    cfg, notes = prefix_config(cfg, START_IMAGE if args.image is not None else CONTINUATION)
    try:  # the engine's own rule of where a prefix is defined, before what it needs and the file
        check_prefix_config(cfg)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    needs_vae = args.image is not None or not path.lower().endswith(LATENTS_EXT)
    if needs_vae and not args.vae:
        what = "an image" if args.image is not None else "a video (or give latents that --latents-out wrote)"
        raise UsageError(f"{flag} {path} needs --vae FILE ({_space_words(args)}) to encode {what}")
    check_input(flag, path)
    return cfg, [f"note: {line}" for line in notes]


def _held_image_settings(args) -> list[str]:
    """--image for LongLive 2.0 (block 0's frame 0): its refusals (no --vae, several devices, no such file) and
    its ``note:`` line."""
    from .inputs import several_devices

    if not args.vae:
        raise UsageError(f"--image {args.image} needs --vae FILE ({_space_words(args)}) to encode an image")
    if several_devices(args) is not None:
        raise UsageError("--image: LongLive 2.0's start image (block 0's frame 0) runs on one device for now; "
                         "leave --devices out")
    check_input("--image", args.image)
    return ["note: the start image is block 0's frame 0, held at timestep 0 in every forward (LongLive 2.0's "
            "image-to-video)"]


def read_prefix(args, cfg: CascadeConfig, plan: RunPlan | None = None) -> PrefixInput | None:
    """The file of ``--image``/``--continue`` read and checked (after :func:`prefix_settings`), None
    without one: an image or the last frames of a video as pixels of the run's size, or the latents'
    context and head (``plan``: the run's, whose latent space the latents must be in; Wan2.1's without one).
    Raises UsageError for latents of another size or latent space, or a held image (:attr:`CascadeConfig.holds_image`) the
    plan cannot hold, CheckpointError for a file that cannot be read."""
    from ..video.vae_encode import load_image, load_video

    space = WAN21_LATENTS if plan is None else plan.latent_space
    if args.image is not None:
        held = cfg.holds_image
        if held and plan is not None:  # the engine's rules for it, on a stand-in of its shape
            try:
                check_image_latent(torch.zeros(1, space.channels, 1, *plan.shape[-2:]), plan)
            except ValueError as exc:
                raise UsageError(f"--image: {exc}") from None
        return PrefixInput("image", args.image, pixels=load_image(args.image, args.width, args.height), held=held)
    path = args.continue_from
    if path is None:
        return None
    if not path.lower().endswith(LATENTS_EXT):
        unbounded = sys.maxsize  # the count asked for, else the window; every frame without one
        most = context_frames_for(cfg, unbounded, args.context_frames)
        pixels = load_video(path, args.width, args.height, None if most == unbounded else most)
        return PrefixInput("video", path, pixels=pixels)
    latents = read_latents("--continue", path, space, "the model makes")
    h, w = latent_size(args.width, args.height, latent_space=space)
    if tuple(latents.shape[3:]) != (h, w):
        given_h, given_w, s = *latents.shape[3:], space.spatial
        raise UsageError(f"--continue {path}: its latents are {given_h}x{given_w} (a {s * given_w}x{s * given_h} "
                         f"video) but --width {args.width} --height {args.height} needs {h}x{w}")
    try:  # every given frame goes to the outputs: none may be NaN or overflow the run's dtype
        check_prefix(latents, cfg, h, w, DTYPES[args.dtype], space)
    except ValueError as exc:
        raise UsageError(f"--continue {path}: {exc}") from None
    context = context_of(latents, cfg, args.context_frames)
    return PrefixInput("latents", path, context=context, head=latents[:, :, :latents.shape[2] - context.shape[2]])


def prefix_latents(prefix: PrefixInput, cfg: CascadeConfig, asked: int, vae: str, device: torch.device,
                   dtype: torch.dtype, latent_space: LatentSpace = WAN21_LATENTS) -> torch.Tensor:
    """The context prefix [1, C, K, h, w] for :func:`sampling.loop.generate`: ``prefix.context``, or its
    pixels through the VAE encoder of ``vae`` (``dtype`` on ``device``, freed afterwards; it must encode into
    ``latent_space``, the model's) and, for a video, its last K latent frames (``asked``, see
    :func:`sampling.context.context_of`); a held image's one latent frame [1, C, 1, h, w] likewise. Raises
    CheckpointError when ``vae`` is not a complete VAE (its encoder half), ValueError when it is another space's."""
    if prefix.context is not None:
        return prefix.context
    from ..video.vae_encode import encode, load_encoder

    encoder = load_encoder(vae, dtype=dtype, device=device, latent_space=latent_space)
    latents = encode(encoder, prefix.pixels).cpu()
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return latents if prefix.source == "image" else context_of(latents, cfg, asked)


def prefix_and_image(prefix: PrefixInput | None, plan: RunPlan, asked: int, vae: str, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(context prefix, image latent) of a run, encoded (:func:`prefix_latents`, in the plan's latent space): a held
    image (:attr:`CascadeConfig.holds_image`) is the image latent [1, C, 1, h, w] (generate's ``image_latent``), anything else the
    prefix; (None, None) without either."""
    if prefix is None:
        return None, None
    latents = prefix_latents(prefix, plan.cfg, asked, vae, device, dtype, plan.latent_space)
    return (None, latents) if prefix.held else (latents, None)


def given(**inputs) -> dict:
    """The keyword arguments whose value is not None (generate's optional inputs, passed only when there is one:
    the worker pool takes fewer of them)."""
    return {k: v for k, v in inputs.items() if v is not None}


def read_latents(flag: str, path: str, space: LatentSpace, against: str) -> torch.Tensor:
    """The latents [1, C, T, H/s, W/s] in ``path`` (one tensor, as ``--latents-out`` writes them) of ``space``.
    UsageError, one line: latents of another known space name both spaces (``against``: who wants ``space``, e.g.
    "the model makes" or "--vae X decodes"); any other shape is refused as :func:`cli.checks.check_latents` does."""
    from .inputs import single_tensor

    c, s = space.channels, space.spatial
    latents = single_tensor(path, f"latents [1, {c}, T, H/{s}, W/{s}]")
    other = next((o for o in LATENT_SPACES if o is not space and latents.dim() == 5
                  and tuple(latents.shape[:2]) == (1, o.channels)), None)
    if other is not None:
        raise UsageError(f"{flag} {path} holds {other.words()} but {against} {space.words()}: give "
                         f"{space.name} latents")
    check_latents(flag, path, latents, space)
    return latents


def latents_to_decode(args) -> tuple[torch.Tensor, LatentSpace]:
    """``decode``'s --latents read and checked against --vae's latent space (told by its names and shapes,
    :func:`weights.probe.stored_decoder_space`; Wan2.1's where the file is missing or cannot be told, the decoder's
    loading then naming what it is), then --vae checked to exist; (latents, that space). UsageError, one line."""
    from ..weights.probe import stored_decoder_space

    space = (stored_decoder_space(args.vae) if os.path.exists(args.vae) else None) or WAN21_LATENTS
    name = os.path.basename(os.path.normpath(args.vae))
    latents = read_latents("--latents", args.latents, space, f"--vae {name} decodes")
    check_input("--vae", args.vae)
    return latents, space
