"""Input checks shared by validate_inputs (at queue time) and execute (before any GPU work).

Each check raises ValueError whose message states the allowed range; ``as_validation`` turns that
into the string ComfyUI shows for a failed validation. ComfyUI reports such a string once for every
input a node's ``validate_inputs`` takes, so a node's ``validate_inputs`` takes one input only; the
other ranges are schema limits (ComfyUI checks those itself, each on its own input), and checks
across inputs run when the node executes, still before any model work.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from cascade_core.common.constants import TEXT_TOKENS
from cascade_core.common.latent_space import WAN21_LATENTS, LatentSpace
from cascade_core.sampling.blend import MAX_BLEND_BLOCKS
from cascade_core.sampling.config import CascadeConfig, PromptSchedule
from cascade_core.sampling.context import CONTINUATION, START_IMAGE
from cascade_core.sampling.families import DEFAULT_FAMILY, family_with
from cascade_core.sampling.plan import check_prefix, check_prefix_config, latent_size

log = logging.getLogger("block_cascade")

SIZE_MULTIPLE = 16  # the widgets' step: Wan2.1's rule (8 px a latent pixel x patch 2); a model's own rule is
# its latent space's (LatentSpace.size_multiple: 32 px for Wan2.2), checked by video_size with the model
MAX_SIZE = 4096
MAX_BLOCKS = 1000
MAX_STEPS = 16
MAX_LATENT_FRAMES = 10000


def as_validation(check: Callable[[], object]) -> bool | str:
    try:
        check()
    except ValueError as exc:
        return str(exc)
    return True


def int_range(name: str, value, lo: int, hi: int, hint: str = "") -> int:
    if value is None:  # linked input: checked again at execution
        return value
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must lie in {lo}..{hi}{hint}, got {v}")
    return v


def video_size(width, height, latent_space: LatentSpace = WAN21_LATENTS, patch=(1, 2, 2)) -> None:
    """The video's size in pixels (None: a linked input, checked at execution): multiples of ``latent_space``'s
    rule for a model of ``patch`` (:meth:`LatentSpace.size_multiple`: 16 for Wan2.1, 32 for Wan2.2) up to
    MAX_SIZE. Raises ValueError naming the input and the multiple."""
    mult = latent_space.size_multiple(patch)
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if not mult <= int(v) <= MAX_SIZE or int(v) % mult:
            for_model = "" if latent_space == WAN21_LATENTS else f" for a model of {latent_space.name} latents"
            raise ValueError(f"{name} must be a multiple of {mult} in {mult}..{MAX_SIZE}{for_model} "
                             f"(e.g. 832 x 480), got {v}")
    if width is not None and height is not None:
        latent_size(int(width), int(height), patch, latent_space)


def blocks(value) -> None:
    int_range("length (blocks)", value, 0, MAX_BLOCKS, " (1 block = 12 video frames = 0.75 s at 16 fps; 0 = endless, "
              "until Cancel)")


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"steps must be comma-separated integers in 0..1000, strictly decreasing "
                         f"(e.g. 1000,750,500,250), got {text!r}") from None
    if not 1 <= len(steps) <= MAX_STEPS:
        raise ValueError(f"steps must list 1..{MAX_STEPS} denoising steps (e.g. 1000,750,500,250), got {text!r}")
    return steps


def step_list(text: str, what: str = "steps") -> tuple[int, ...] | None:
    """A step-list widget on its own (its queue-time check): None for "auto" (the family's)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        steps = parse_steps(text)
        CascadeConfig(steps=steps).validate()  # in 0..1000, strictly decreasing
    except ValueError as exc:
        raise ValueError(str(exc).replace("steps", what, 1) + ' (or "auto": the family\'s)') from None
    return steps


AUTO_CHOICES = ("auto", "on", "off")


def cascade_config(family: str, steps: str, parallel: int, attention: str, window: int, sink: int,
                   shift: float = 0.0, flashblock: bool = False, frames_per_block: int = 0,
                   independent_first_frame: str = "auto", first_block_steps: str = "auto",
                   warp: str = "auto", context_noise: float = 0.0,
                   kv_recompute: int = -1, kv_dtype: str = "default") -> tuple[CascadeConfig, tuple[str, ...]]:
    """(config, the fields the widgets set) of the config node: the family's settings (auto: read as
    self-forcing here; the sampler reads the model's) under every widget not left to the family
    (steps "auto", shift 0, frames per block 0, window/sink/kv_recompute -1, auto choices). Every range is
    checked."""
    explicit = {"flashblock": "reuse" if flashblock else "off", "context_noise": float(context_noise),
                "kv_dtype": kv_dtype}
    if int(parallel):
        explicit["parallel"] = int(parallel)
    if attention != "auto":
        explicit["attention"] = attention
    for name, text in (("steps", steps), ("first_block_steps", first_block_steps)):
        if str(text).strip().lower() == "none" and name == "first_block_steps":
            explicit[name] = None  # block 0 takes the step list
        elif (st := step_list(text, name.replace("_", " "))) is not None:
            explicit[name] = st
    for name, choice in (("independent_first_frame", independent_first_frame), ("warp", warp)):
        if choice not in AUTO_CHOICES:
            raise ValueError(f"{name.replace('_', ' ')} must be one of {', '.join(AUTO_CHOICES)}, got {choice!r}")
        if choice != "auto":
            explicit[name] = choice == "on"
    if float(shift) != 0.0:
        if not 0.1 <= float(shift) <= 20.0:
            raise ValueError(f"shift must lie in 0.1..20 (0 = the family's: 5, CausVid 8), got {shift}")
        explicit["shift"] = float(shift)
    if int(frames_per_block):
        explicit["frames_per_block"] = int_range("frames per block", frames_per_block, 0, 64, " (0 = the family's)")
    int_range("window", window, -1, MAX_LATENT_FRAMES, " latent frames (-1 = the family's, 0 = unlimited)")
    int_range("sink", sink, -1, MAX_LATENT_FRAMES, " latent frames (-1 = the family's)")
    if int(window) >= 0:
        explicit["window"] = int(window) or None
    if int(sink) >= 0:
        explicit["sink"] = int(sink)
    elif int(window) == 0:  # unlimited: a family's sink would mean nothing
        explicit["sink"] = 0
    int_range("kv recompute", kv_recompute, -1, MAX_LATENT_FRAMES, " context frames (-1 = the family's, 0 = off)")
    if int(kv_recompute) >= 0:
        explicit["kv_recompute"] = int(kv_recompute)
    if not 0.0 <= float(context_noise) <= 1000.0:
        raise ValueError(f"context noise must lie in 0..1000 (the clean pass's timestep), got {context_noise}")
    cfg = family_with(DEFAULT_FAMILY if family == "auto" else family, explicit)
    steps_now = len(cfg.steps)
    auto = " (family auto is checked as self-forcing until the model is known: choose the family here)" \
        if family == "auto" else ""
    try:
        int_range("parallelism", cfg.parallel, 1, steps_now + 1, f" (1 = sequential, {steps_now + 1} = steps + 1 "
                  f"for the {steps_now}-step list; 0 = the family's)")
        cfg.validate(unlimited_window="0")
    except ValueError as exc:
        raise ValueError(f"{exc}{auto}") from None
    return cfg, tuple(explicit)


def conditioning_embeds(cond, what: str) -> torch.Tensor:
    """Core CONDITIONING [[tensor [1, L, D], {...}]] -> prompt embeddings [L, D]."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0:
        raise ValueError(f"{what}: the CONDITIONING is empty; connect a CLIPTextEncode (CLIPLoader type wan)")
    if len(cond) != 1:
        raise ValueError(f"{what}: the CONDITIONING holds {len(cond)} prompts; Block Cascade takes one per "
                         f"entry (use Prompt Schedule to switch prompts)")
    entry = cond[0]
    t = entry[0] if isinstance(entry, (list, tuple)) and entry else None
    if not torch.is_tensor(t) or t.dim() != 3 or t.shape[0] != 1 or t.shape[1] < 1:
        shape = list(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"{what}: expected prompt embeddings [1, L, 4096], got {shape}")
    if t.shape[1] > TEXT_TOKENS:  # the reference's text encoder keeps the first 512 tokens too
        log.warning("Block Cascade: %s has %d tokens; the model reads the first %d", what, t.shape[1], TEXT_TOKENS)
        return t[0, :TEXT_TOKENS]
    return t[0]


def prompt_width(embeds: torch.Tensor, text_dim: int, what: str) -> None:
    if embeds.shape[-1] != text_dim:
        hint = " (a CLIP/SD text encoder?)" if embeds.shape[-1] in (768, 1024, 1280, 2048) else ""
        raise ValueError(f"{what}: the conditioning has width {embeds.shape[-1]}{hint}; the model expects "
                         f"{text_dim} (umt5-xxl: CLIPLoader with type wan, then CLIPTextEncode)")


def blend_at(start_block, blend_blocks) -> int:
    """A Prompt Schedule entry's blend_blocks (0..MAX_BLEND_BLOCKS; none at block 0, which has no prompt
    before it), its start block checked too. Raises ValueError (one line)."""
    start = int_range("start block", start_block, 0, MAX_BLOCKS - 1)
    n = int_range("blend_blocks", blend_blocks or 0, 0, MAX_BLEND_BLOCKS, " (0: a hard switch)")
    if n and start == 0:
        raise ValueError(f"blend_blocks {n} at start block 0: the first prompt has nothing to blend from; set it "
                         f"on a later entry, or 0")
    return n


def schedule(entries, blocks_: int, text_dim: int, blends=()) -> PromptSchedule:
    """The sampler's checked :class:`PromptSchedule` of (start block, embeddings) ``entries`` and (start block,
    N) ``blends`` for a video of ``blocks_`` blocks (0: endless). Raises ValueError (one line)."""
    if not entries:
        raise ValueError("the prompt schedule is empty; add a Prompt Schedule entry at block 0")
    sched = PromptSchedule([(int(s), e) for s, e in entries], dict(blends))
    for s, e in sched.entries:
        prompt_width(e, text_dim, f"prompt at block {s}")
    try:
        sched.validate(blocks_, text_dim)
    except ValueError as exc:
        where = f"0..{blocks_ - 1}" if blocks_ else "0 or later (an endless video)"
        raise ValueError(f"prompt schedule: {exc} (switch blocks must lie in {where}, the first at 0)") from None
    return sched


def context_kind(start_image, prefix, vae, width: int, height: int, context_frames: int = 0,
                 cfg: CascadeConfig | None = None) -> str | None:
    """What comes before block 0 by the sampler's optional inputs: ``context.START_IMAGE`` (with
    ``start_image``, which needs ``vae`` to be encoded; :data:`HELD_IMAGE` where ``cfg`` holds the image as block 0's
    frame 0 instead, :attr:`CascadeConfig.holds_image`), ``context.CONTINUATION`` (with ``prefix``) or
    None. Raises ValueError naming the input for both at once, ``context_frames`` without a prefix, a
    start image without a VAE, one that is not a float IMAGE [B, H, W, C >= 3] (0..1), whose first
    image (the one encoded) holds NaN or infinite values, or whose centre crop to the aspect ratio of
    ``width`` x ``height`` (pixels) keeps less than 2 pixels either way."""
    if start_image is not None and prefix is not None:
        raise ValueError("connect either start_image (image to video) or prefix (continue a video), not both")
    if prefix is None and context_frames:
        raise ValueError(f"context_frames ({context_frames}) needs the prefix input: it counts the latent frames "
                         f"of the continued video the new blocks see; set it to 0 without a prefix")
    if start_image is None:
        return None if prefix is None else CONTINUATION
    if vae is None:
        raise ValueError("start_image needs the vae input: the model's VAE encodes the image into the video's "
                         "first latent frame (connect a VAELoader with wan_2.1_vae.safetensors, or "
                         "wan2.2_vae.safetensors for a Wan2.2 model)")
    shape = list(start_image.shape) if torch.is_tensor(start_image) else type(start_image).__name__
    if not torch.is_tensor(start_image) or start_image.dim() != 4 or start_image.shape[3] < 3 \
            or 0 in start_image.shape:
        raise ValueError(f"start_image: expected an IMAGE [B, H, W, 3] (e.g. from LoadImage), got {shape}")
    if not start_image.is_floating_point():
        raise ValueError(f"start_image: expected an IMAGE of floats on the 0..1 scale (e.g. from LoadImage), "
                         f"got {start_image.dtype}")
    if not bool(torch.isfinite(start_image[:1]).all()):
        raise ValueError("start_image: the image holds NaN or infinite values")
    h, w = start_image.shape[1:3]
    kept_w, kept_h = min(w, h * width / height), min(h, w * height / width)
    if min(kept_w, kept_h) < 2:
        raise ValueError(f"start_image: its centre crop to the video's aspect ratio ({width} x {height}) keeps "
                         f"{kept_w:.3g} x {kept_h:.3g} of its {w} x {h} pixels, less than 2 either way; use a "
                         f"larger image, or one closer to that aspect ratio")
    return HELD_IMAGE if cfg is not None and cfg.holds_image else START_IMAGE


# ---- Wan2.2: a start image held as block 0's frame 0, decoders of the run's latent space -------------------------

HELD_IMAGE = "held image"  # a start image that is block 0's frame 0 (LongLive 2.0), not a frame before block 0
HELD_WORDS = "start image as block 0's frame 0 (held at timestep 0)"  # the settings line's context


def held_image(kind: str | None, session) -> None:
    """A held start image (:data:`HELD_IMAGE`) checked against the run's plan before any GPU work: the engine's rules
    (:func:`cascade_core.sampling.ticks.check_image_latent`, on a stand-in of its shape) and one device (the worker
    pool does not take it). ValueError naming ``start_image``."""
    if kind != HELD_IMAGE:
        return
    from cascade_core.sampling.ticks import check_image_latent

    if session.pooled:
        raise ValueError("start_image: LongLive 2.0's start image (block 0's frame 0) runs on one device for now; "
                         "set the config's devices to one GPU")
    plan = session.plan
    try:
        check_image_latent(torch.zeros(1, plan.latent_space.channels, 1, *plan.shape[-2:]), plan)
    except ValueError as exc:
        raise ValueError(f"start_image: {exc}") from None


def decoder_space(file) -> LatentSpace | None:
    """The latent space a Load Video Decoder output decodes: its ``latent_space`` where it has one, else its decoder
    class's (``kind``, a class of :mod:`cascade_core.video`); None when neither tells."""
    space = getattr(file, "latent_space", None)
    if space is not None:
        return space
    from cascade_core.video import taew, vae, vae22

    kind = str(getattr(file, "kind", ""))
    cls = next((getattr(m, kind) for m in (vae22, taew, vae) if kind and hasattr(m, kind)), None)
    return getattr(cls, "latent_space", None)


def decoder_spaces(session, files):
    """The sampler's decoder inputs (``files``: :class:`nodes.decoders.Decoders`) checked against the run's latent
    space (:meth:`cascade_core.session.RunSession.check_decoder`: one line naming both); ``files`` returned."""
    for what, file in (("decoder", files.output), ("preview_decoder", files.preview)):
        space = None if file is None else decoder_space(file)
        if space is not None:
            session.check_decoder(space, f"{what}: {file.name}")
    return files


def prefix_latents(prefix, width: int, height: int, latent_space: LatentSpace = WAN21_LATENTS,
                   patch=(1, 2, 2)) -> torch.Tensor:
    """The raw latents [1, C, T, height/s, width/s] of the sampler's ``prefix`` LATENT (a sampler's
    output: ``{"samples": ...}``; C, s: the model's ``latent_space``'s channels and spatial factor, Wan2.1
    16 and 8, Wan2.2 48 and 16). Raises ValueError for anything else: another layout or latent space, a batch of
    several videos, no frames, frames of another size than the node's width x height, or values that
    are not real floating point (complex, integer)."""
    samples = prefix.get("samples") if isinstance(prefix, dict) else None
    c, s = latent_space.channels, latent_space.spatial
    if not torch.is_tensor(samples) or samples.dim() != 5 or samples.shape[1] != c \
            or samples.shape[2] < 1:
        got = list(samples.shape) if torch.is_tensor(samples) else type(samples if samples is not None
                                                                         else prefix).__name__
        raise ValueError(f"prefix: expected a video LATENT [1, {c}, T, H/{s}, W/{s}] with T >= 1 (a "
                         f"Block Cascade Sampler's LATENT"
                         f"{'' if latent_space == WAN21_LATENTS else ' of ' + latent_space.words()}), got {got}")
    if not samples.is_floating_point():
        raise ValueError(f"prefix: expected a LATENT of real floating-point values (a Block Cascade Sampler's "
                         f"LATENT), got {samples.dtype}")
    if samples.shape[0] != 1:
        raise ValueError(f"prefix: the LATENT holds {samples.shape[0]} videos; a continuation takes one (batch 1)")
    h, w = latent_size(int(width), int(height), patch, latent_space)
    if tuple(samples.shape[3:]) != (h, w):
        raise ValueError(f"prefix: its frames are {samples.shape[4] * s} x {samples.shape[3] * s}, the node's "
                         f"width x height {width} x {height}; set width and height to the video's size")
    return samples


def context_allowed(context: torch.Tensor | None, cfg: CascadeConfig, width: int, height: int, what: str,
                    dtype: torch.dtype | None = None, latent_space: LatentSpace = WAN21_LATENTS,
                    patch=(1, 2, 2)) -> None:
    """The engine's rules for a context prefix (:func:`cascade_core.sampling.plan.check_prefix`, ``dtype``: the
    model's, ``latent_space`` its latents'), before any model work: on the normalised latents [1, C, T, h, w] of
    a continuation
    (every frame of the given video, context or not: the outputs hold them all), or, for a start
    image not encoded yet (``context`` None), the config's rules only
    (:func:`cascade_core.sampling.plan.check_prefix_config`). Raises ValueError naming the input ``what``."""
    h, w = latent_size(int(width), int(height), patch, latent_space)
    try:
        if context is None:
            check_prefix_config(cfg)
        else:
            check_prefix(context, cfg, h, w, dtype, latent_space)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
