"""The command line's checks: everything that can be refused or warned about before any model work.

Each check raises :class:`UsageError` (one line, exit code 2) or writes one ``warning:`` line to
stderr. Nothing here loads weights or runs a model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import torch

from ..common.constants import GIB
from ..common.latent_space import WAN21_LATENTS, LatentSpace
from ..model import attention
from ..model.wan_config import WanConfig
from ..sampling.blend import check_blend_blocks
from ..sampling.config import CascadeConfig
from ..sampling.families import (
    DEFAULT_FAMILY,
    check_family_model,
    default_family,
    family_config,
    guess_family,
    model_words,
)
from ..sampling.memory import available_bytes, blocks_to_swap, cheaper_settings
from ..sampling.recompute import first_reencoding_block, why_a_vae
from ..weights.expert_files import expert_folders

SEED_MAX = 2 ** 64 - 1  # torch generators take unsigned 64-bit seeds
BUILTIN = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)  # the untrained demo model (no --checkpoint)
TRAINED_LATENT_FRAMES = 21  # what the released 1.3B block-causal checkpoints were trained on (81 frames)


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2."""


def seed_value(text: str) -> int:
    """argparse type of --seed: an integer in 0..2^64-1."""
    try:
        seed = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{SEED_MAX}, got {text!r}") from None
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must lie in 0..2^64-1 ({SEED_MAX}), got {seed}")
    return seed


def _nearest_existing(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _probe_folder(folder: str, flag: str, path: str) -> None:
    """Create and remove a nameless file in ``folder``: the real permission (root, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write into {folder} ({exc.strerror})") from None


def _check_new_path(flag: str, path: str) -> None:
    """A path that does not exist yet: its nearest existing parent must be a writable folder."""
    folder = _nearest_existing(path)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder")
    _probe_folder(folder, flag, path)


def check_output_file(flag: str, path: str | None, suffix: str | None = None) -> None:
    """Refuse an output file that cannot be written: a folder, under a file, no write permission, or (``suffix``,
    e.g. ".mp4") a name of another kind of file than the one written.

    Missing folders are fine where they can be created (the writers create them)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if suffix is not None and not path.lower().endswith(suffix):
        raise UsageError(f"{flag} {path}: the file written is {suffix[1:].upper()}; give a name ending in {suffix}")
    if os.path.exists(path) and not os.path.isfile(path):  # a device, a FIFO: writers replace it by a file
        raise UsageError(f"{flag} {path} is not a regular file; give a file name")
    if os.path.exists(path):
        try:
            with open(path, "ab"):  # appends nothing: the file stays as it is until the run writes it
                pass
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot write it ({exc.strerror})") from None
        return
    _check_new_path(flag, path)


def check_output_folder(flag: str, path: str | None) -> None:
    """Refuse an output folder that is a file, lies under a file or cannot be written into."""
    if path is None:
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a file, not a folder")
        _probe_folder(path, flag, path)
        return
    _check_new_path(flag, path)


def check_input(flag: str, path: str | None) -> None:
    """Refuse an input file or folder (a diffusers folder) that is not there."""
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder")


def check_latents(flag: str, path: str, latents: torch.Tensor, latent_space: LatentSpace = WAN21_LATENTS) -> None:
    """Refuse a tensor that is not latents [1, C, T, H/s, W/s] with T >= 1 (as --latents-out writes them; C, s: the
    ``latent_space``'s channels and spatial factor, Wan2.1's 16 and 8 by default)."""
    c, s = latent_space.channels, latent_space.spatial
    if latents.dim() != 5 or latents.shape[:2] != (1, c) or latents.shape[2] < 1:
        raise UsageError(f"{flag} {path}: expected latents [1, {c}, T, H/{s}, W/{s}], got {list(latents.shape)}")


def model_latent_space(args) -> LatentSpace:
    """The latent space of the run's DiT, told before it is loaded: the --checkpoint's, from its names and shapes
    (:func:`weights.probe.stored_latent_space`), else the built-in model's (Wan2.1). A file it cannot tell is
    planned as Wan2.1; loading it then names what is wrong."""
    from ..weights.probe import stored_latent_space

    return (stored_latent_space(args.checkpoint) if args.checkpoint else None) or WAN21_LATENTS


def check_decoder_spaces(args, session) -> None:
    """The one refusal of a decoder of another latent space than the model's, at the entry: --vae and
    --preview-vae, each told by its names and shapes (:func:`weights.probe.stored_decoder_space`: headers only,
    no weight read), against the plan's space (:meth:`session.RunSession.check_decoder`). UsageError naming both;
    a file it cannot tell is left to the decoder's loading, which names what it is."""
    from ..weights.probe import stored_decoder_space

    for flag, path in (("--vae", args.vae), ("--preview-vae", getattr(args, "preview_vae", None))):
        space = stored_decoder_space(path) if path and os.path.exists(path) else None
        if space is not None:
            try:
                session.check_decoder(space, f"{flag} {os.path.basename(os.path.normpath(path))}")
            except ValueError as exc:
                raise UsageError(str(exc)) from None


def input_bytes(path: str) -> int:
    """Bytes of an input file, or of every file in an input folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def check_backend(name: str, device: torch.device, dtype: torch.dtype, flag: str = "--attention-backend") -> None:
    """Refuse an attention backend that this device cannot run (:func:`model.attention.refusal`), naming ``flag``."""
    why = attention.refusal(name, device, dtype)
    if why is not None:
        raise UsageError(f"{flag}: {why}")


def check_weight_dtype(args, device: torch.device) -> None:
    """--fp8 read as --weight-dtype fp8_e4m3fn_fast (refused beside another choice); a warning when fp8
    products were asked of a device without fp8 matrix units (the weights are widened per product there)."""
    from ..model.fp8 import has_fp8_matmul

    if args.fp8:
        if args.weight_dtype not in ("default", "fp8_e4m3fn_fast"):
            raise UsageError(f"--fp8 is --weight-dtype fp8_e4m3fn_fast; it excludes --weight-dtype {args.weight_dtype}")
        args.weight_dtype = "fp8_e4m3fn_fast"
    if args.weight_dtype == "fp8_e4m3fn_fast" and device.type != "meta" and not has_fp8_matmul(device):
        print(f"warning: fp8 products on {device}: no fp8 matrix units, so each layer's weight is widened for its "
              f"product instead (one byte a block weight, rounded to fp8)", file=sys.stderr)


def model_kind(args) -> tuple[int, int, str] | None:
    """(latent channels, experts, words naming it) of the run's DiT, told before it is loaded: the built-in
    model's (16, 1), a two-expert folder's (its experts' channels, 2), else the --checkpoint's by its names and
    shapes (:func:`weights.probe.stored_latent_space`); None where the file cannot tell (loading it names what it
    is)."""
    from ..weights.probe import stored_latent_space

    if not args.checkpoint:
        return BUILTIN.in_dim, 1, "the built-in untrained model"
    name = os.path.basename(os.path.normpath(args.checkpoint))
    folders = expert_folders(args.checkpoint)
    if folders is not None:
        space = stored_latent_space(folders.high)
        return (WAN21_LATENTS if space is None else space).channels, 2, name
    space = stored_latent_space(args.checkpoint) if os.path.exists(args.checkpoint) else None
    return None if space is None else (space.channels, 1, name)


def sampling_config(args, runs: str | None = None, own_parallel: bool = False
                    ) -> tuple[CascadeConfig, str, str | None]:
    """(config, family name, why it was assumed or None) of a ``generate`` run: the --family's
    reference settings (or the family the --checkpoint/--lora path names; a two-expert folder's; else
    longlive-2 for a 48-channel DiT, self-forcing otherwise), with every explicit option over them. Raises
    UsageError for settings out of range and, the one check of it, for a family the model is not made for
    (:func:`sampling.families.check_family_model` on :func:`model_kind`; ``runs``: how that message starts).
    ``own_parallel``: --parallel is left out (the family's stays), the run checking it by its own rule (video-to-
    video: :func:`sampling.v2v_config.v2v_config`)."""
    name, assumed = args.family, None
    kind = model_kind(args)
    if name is None:
        guess = guess_family(args.checkpoint or "", args.lora)
        if kind is not None and kind[1] == 2:  # a pair: its family, whatever the name
            guess = ("causal-wan2.2-a14b", f"{args.checkpoint} holds two experts, transformer/ and transformer_2/")
        elif guess is None and kind is not None and default_family(kind[0]) != DEFAULT_FAMILY:
            guess = (default_family(kind[0]), f"{kind[2]} is {model_words(kind[0])}")
        name = guess[0] if guess else DEFAULT_FAMILY
        assumed = guess[1] if guess else None
    if kind is not None:
        try:
            check_family_model(name, *kind, why=f"assumed: {assumed}" if assumed else None, runs=runs)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    first_steps = None if args.first_block_steps == "none" else args.first_block_steps
    explicit = {"steps": args.steps, "first_block_steps": first_steps, "shift": args.shift,
                "warp": None if args.warp is None else args.warp == "on", "frames_per_block": args.frames_per_block,
                "independent_first_frame": args.independent_first_frame, "context_noise": args.context_noise,
                "parallel": None if own_parallel else args.parallel, "attention": args.attention, "window": args.window or None,
                "sink": args.sink, "flashblock": args.flashblock, "fold_clean": args.fold_clean,
                "switch_mode": args.switch_mode, "kv_recompute": args.kv_recompute, "kv_dtype": args.kv_dtype}
    try:
        cfg = family_config(name, **explicit)
        if args.window == 0:  # explicitly unlimited, whatever the family's window (and its sink)
            cfg = dataclasses.replace(cfg, window=None, sink=cfg.sink if args.sink is not None else 0)
        if args.first_block_steps == "none":  # block 0 takes the step list, whatever the family says
            cfg = dataclasses.replace(cfg, first_block_steps=None)
        cfg.validate(unlimited_window="0")
    except ValueError as exc:  # an assumed family's settings: the message says whose they are
        raise UsageError(f"{exc} (family {name} assumed: {assumed}; --family sets another)" if assumed
                         else str(exc)) from None
    return cfg, name, assumed


def prompt_switches(specs: list[str], blocks: int) -> list[tuple[int, str, bool, int]]:
    """--switch BLOCK[~N]:FILE|BLOCK[~N]:TEXT values -> sorted (block, file or text, is a file, N). A value
    ending in .safetensors is an embedding file (it must exist); anything else is a prompt text; ``~N``
    blends the old and new prompts over N blocks (:mod:`sampling.blend`; 0 or none: a hard switch). Raises
    UsageError for a malformed value, a block outside 1..blocks-1 (any block >= 1 in an endless video,
    ``blocks`` 0), an N outside 0..MAX_BLEND_BLOCKS or two switches at one block."""
    out = {}
    for spec in specs:
        head, sep, value = spec.partition(":")
        block, tilde, blend = head.partition("~")
        if not sep or not block.strip().isdigit() or not value.strip() or (tilde and not blend.strip().isdigit()):
            raise UsageError(f"--switch {spec!r}: expected BLOCK:FILE (a .safetensors embedding) or BLOCK:TEXT, "
                             f"BLOCK~N:... to blend the prompts over N blocks")
        try:
            n = check_blend_blocks(int(blend) if tilde else 0, f"--switch {spec!r}")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        b = int(block)
        if b < 1 or (blocks and b >= blocks):
            raise UsageError(f"--switch {spec!r}: the block must lie in 1..{blocks - 1} (block 0 takes the first "
                             f"prompt; the video has {blocks} blocks)")
        if b in out:
            raise UsageError(f"--switch: two prompts at block {b}")
        is_file = value.lower().endswith(".safetensors")
        if is_file:
            check_input("--switch", value)
        out[b] = (value, is_file, n)
    return [(b, *out[b]) for b in sorted(out)]


def check_settings(args, cfg: CascadeConfig) -> None:
    """Refuse settings that would silently do nothing (UsageError)."""
    if args.swap_blocks > 0 and args.devices is not None:
        raise UsageError("--swap-blocks streams weights to one device; with --devices each worker holds the whole "
                         "model: leave it out (or give -1)")
    if args.switch_mode is not None and not args.switch:
        raise UsageError(f"--switch-mode {args.switch_mode} needs a --switch (it says what a prompt switch does)")
    if (why := why_a_vae(args.blocks, cfg.frames_per_block, cfg.kv_recompute)) and not args.vae:
        fewer = f", or at most --blocks {first_reencoding_block(cfg.frames_per_block, cfg.kv_recompute)}"
        raise UsageError(f"{why}: pass --vae FILE (the complete Wan2.1 VAE){fewer if args.blocks else ''}")
    if args.independent_first_frame and cfg.frames_per_block == 1:
        raise UsageError("--independent-first-frame with 1 frame per block does nothing (every block is one "
                         "latent frame already)")


def length_warnings(cfg: CascadeConfig, blocks: int, context_frames: int = 0) -> list[str]:
    """The warning line to print once every check has passed (so a refusal stays one line) when a video
    of ``blocks`` blocks after ``context_frames`` latent frames of context attends more frames than the
    released models were trained on; none with a window."""
    frames = cfg.grid.total(blocks) + context_frames
    if cfg.attended_window is None and frames > TRAINED_LATENT_FRAMES:
        most = max(b for b in range(1, TRAINED_LATENT_FRAMES + 1) if cfg.grid.total(b) <= TRAINED_LATENT_FRAMES) \
            if cfg.grid.first <= TRAINED_LATENT_FRAMES else 0
        fewer = (", or fewer blocks or --context-frames" if context_frames else
                 f", or use at most {most} blocks" if most else "")
        return [f"warning: {frames} latent frames without a window exceed the {TRAINED_LATENT_FRAMES} the "
                f"released 1.3B models were trained on (quality drops past it); bound the attention with "
                f"--window 12 --sink 3{fewer}"]
    return []


def place_weights(args, device: torch.device, plan, model_cfg, dtype: torch.dtype, prompts: int, vae_bytes: int,
                  need: int, what: str, weights: int, block: int, stored_small: bool, experts: int = 1) -> int:
    """Blocks of the DiT streamed from host memory (--swap-blocks, or as few as fit what ``device`` has
    available now: :func:`sampling.memory.blocks_to_swap`); UsageError naming the cheapest setting that would
    fit where even every block swapped does not (``need``: the run's bytes besides the weights, ``what`` their
    parts; ``weights``/``block``: the DiT's bytes and its largest block's; ``stored_small``: they are fp8 or GGUF;
    ``experts``: 2 for a Wan2.2 A14B pair, the count then per expert: :func:`sampling.memory.blocks_to_swap`)."""
    layers = model_cfg.num_layers
    if not -1 <= args.swap_blocks <= layers:
        raise UsageError(f"--swap-blocks: the model has {layers} transformer blocks; give 0..{layers}, or -1 (as "
                         f"few as fit), got {args.swap_blocks}")
    free = available_bytes(device)
    if device.type == "cuda":
        swapped = blocks_to_swap(free, need, weights, block, layers, args.swap_blocks, experts)
    else:  # host memory is the device's: streaming blocks from it saves nothing (done only when asked)
        swapped = max(args.swap_blocks, 0) if free is None or need + weights <= free else None
        if swapped:
            print(f"note: --swap-blocks on {device}: the weights already live in host memory; swapping saves "
                  f"nothing there (it adds two staging blocks)", file=sys.stderr)
    if swapped is None:
        cheaper = cheaper_settings(plan, model_cfg, dtype, prompts, vae_bytes, free, weights, block, stored_small,
                                   experts)
        flag = {"weight_dtype fp8_e4m3fn": "--weight-dtype fp8_e4m3fn", "kv_dtype fp8": "--kv-dtype fp8"}.get(
            cheaper, "--window 12 --sink 3" if cheaper else "")
        raise UsageError(f"the run needs about {need / GIB:.2f} GiB on {device} ({what}) besides the weights "
                         f"({weights / GIB:.2f} GiB) but {free / GIB:.2f} GiB are available even with every block "
                         f"swapped to CPU memory; " + (f"{flag} would fit" if flag else
                                                       "use fewer --blocks, a smaller size or another device"))
    if swapped and args.swap_blocks < 0:
        print(f"note: {swapped} of {layers} blocks swapped to CPU memory: the weights do not fit {device} beside "
              f"the run ({free / GIB:.2f} GiB available)", file=sys.stderr)
    return swapped
