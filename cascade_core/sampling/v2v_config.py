"""StreamDiffusionV2's video-to-video settings and its per-chunk rules (the run loop: :mod:`sampling.v2v`).

Source: chenfengxu714/StreamDiffusionV2@c5a0f20 (its sequential path ``streamv2v/inference_wo_batch.py`` is
the P1 target); each rule below names its file and lines. The rules are pure functions of numbers and pixels,
so a test can hold them apart from the loop.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..model.sdv2_cache import check_cache
from .config import CascadeConfig
from .schedule import TRAIN_STEPS

# configs/wan_causal_dmd_v2v.yaml:14-19 without its trailing 0 (dropped for v2v: causal_stream_inference.py:76-78)
SDV2_STEPS = (700, 500, 400, 200)
MOTION_NORM = 0.2  # pixel RMS difference that counts as full motion (inference.py:54)
STEP_BELOW_NOISE = 100  # a later chunk's first timestep lies this far below its noise scale's (inference.py:56)
NOISE_SCALE_MIN = 0.201  # the smallest s_0 (in thousandths) whose later first timesteps stay above 0
_SETTLE_CHUNKS = 64  # chunks of full motion after which s_k no longer moves in float64 (0.1^k shrinks it)


def sdv2_steps(count: int) -> tuple[int, ...]:
    """SDv2's ``--step N``: the first N of 700, 500, 400, 200 (inference_common.py:83-89; the scripts run
    N = 2 for 1.3B and 1 for 14B, run_v2v.sh:32-36). ValueError outside 1..4."""
    if type(count) is not int or not 1 <= count <= len(SDV2_STEPS):
        raise ValueError(f"StreamDiffusionV2 takes 1..{len(SDV2_STEPS)} steps of {list(SDV2_STEPS)}, got {count!r}")
    return SDV2_STEPS[:count]


@dataclass(frozen=True)
class V2VConfig:
    """How a video is restyled. ``steps``: denoising timesteps (0..1000, unwarped; the first is chunk 0's and is
    replaced for later chunks, see :func:`first_timestep`); ``shift``: of the sigma table the timesteps are
    looked up in; ``noise_scale``: s_0, chunk 0's share of noise (the sequential script's default 0.7; SDv2's
    stream paths use 0.8); ``cache_frames``/``sink``/``adapt_sink_threshold``: the KV cache
    (:mod:`model.sdv2_cache`; -1: no adaptive sink); ``refresh_frames``: the RoPE position at which it restarts
    at ``cache_frames`` - 1; ``parallel``: chunks in flight, 1..len(steps) (:mod:`sampling.v2v`). The defaults are
    SDv2's 1.3B run (configs/wan_causal_dmd_v2v.yaml:53-57, inference_wo_batch.py:82,383,387; shift 8 in
    models/wan/wan_wrapper.py:163-166). :meth:`validate` raises ValueError naming the allowed range; the noise
    scale's is :data:`NOISE_SCALE_MIN`..1 (:func:`noise_scale_reaches_a_timestep`)."""

    steps: tuple[int, ...] = SDV2_STEPS[:2]
    shift: float = 8.0
    noise_scale: float = 0.7
    cache_frames: int = 6
    sink: int = 3
    adapt_sink_threshold: float = 0.2
    refresh_frames: int = 50
    parallel: int = 1

    def validate(self) -> None:
        steps = self.steps
        if not steps or any(type(t) is not int or not 0 < t <= TRAIN_STEPS for t in steps) \
                or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"the step list must be decreasing integers in 1..{TRAIN_STEPS} (StreamDiffusionV2: "
                             f"700,500; 700,500,400,200 in full), got {list(steps)}")
        if not 0 < self.shift < float("inf"):
            raise ValueError(f"shift must be a positive finite number, got {self.shift}")
        if not noise_scale_reaches_a_timestep(self.noise_scale):
            why = (f": below {NOISE_SCALE_MIN:g} a later chunk's first timestep int(1000 s) - {STEP_BELOW_NOISE} "
                   f"falls to 0 or below at full motion (s falls toward noise_scale - 0.1)"
                   if self.noise_scale < NOISE_SCALE_MIN else "")
            raise ValueError(f"the noise scale (noise_scale, chunk 0's share of noise) must lie in "
                             f"{NOISE_SCALE_MIN:g}..1, got {self.noise_scale}{why}")
        check_cache(self.cache_frames, self.sink, self.adapt_sink_threshold)
        if type(self.refresh_frames) is not int or self.refresh_frames < self.cache_frames:
            raise ValueError(f"the RoPE refresh must come at or after the cache's {self.cache_frames} frames, got "
                             f"{self.refresh_frames!r}")
        if type(self.parallel) is not int or not 1 <= self.parallel <= len(steps):
            raise ValueError(f"parallelism must lie in 1..{len(steps)} (the steps: chunks in flight), got "
                             f"{self.parallel!r}")


_FAMILY_ONLY = {"warp": False, "frames_per_block": 1, "first_block_steps": None, "independent_first_frame": False,
                "context_noise": 0.0, "attention": "causal", "window": None, "sink": 0, "flashblock": "off",
                "fold_clean": False, "switch_mode": "none", "rope_positions": "absolute", "sink_ema": 0.0,
                "rolling_window": False, "kv_recompute": 0, "kv_dtype": "default"}


def v2v_config(cfg: CascadeConfig, **settings) -> V2VConfig:
    """The :class:`V2VConfig` of a sampling config of the ``streamdiffusionv2`` family (its steps, shift and
    parallel; ``settings``: V2VConfig fields over them), validated. ValueError naming the settings that
    StreamDiffusionV2's rule has no place for (a warp, a window, a clean pass at noise, ...)."""
    clash = [f"{name} {getattr(cfg, name)!r}" for name, value in _FAMILY_ONLY.items() if getattr(cfg, name) != value]
    if clash:
        raise ValueError(f"StreamDiffusionV2's video-to-video has its own cache, chunks and schedule; it takes no "
                         f"{', '.join(clash)} (leave those to the family)")
    out = V2VConfig(steps=tuple(cfg.steps), shift=cfg.shift, parallel=cfg.parallel)
    out = dataclasses.replace(out, **settings)
    out.validate()
    return out


@dataclass(frozen=True)
class VideoChunk:
    """One chunk of the input: ``latents`` [1, 16, f, h, w], the raw VAE mean of its frames (no latent
    normalisation: SDv2 feeds the DiT ``stream_encode(..., scale=None)``, wan_base/modules/vae.py:546-583);
    f = 2 for chunk 0 (video frames 0..4), 1 after (4 frames each). ``pixels`` [1, 3, n, H, W], those video
    frames on the [-1, 1] scale (n = 5, then 4), for the motion measure; None: not known (a still input is
    assumed, d = 0)."""

    latents: torch.Tensor
    pixels: torch.Tensor | None = None


def chunk_count(video_frames: int) -> int:
    """Chunks of a video of ``video_frames`` frames: (T - 1) // 4; the frames past 1 + 4 * chunks are dropped
    (inference_wo_batch.py:427-428)."""
    return max(0, (video_frames - 1) // 4)


def video_chunks(latents: torch.Tensor, pixels: torch.Tensor | None = None) -> Iterator[VideoChunk]:
    """A whole video's raw latents [1, 16, T, h, w] (T >= 2) and pixels [1, 3, >= 1 + 4(T - 1), H, W] (or None)
    as its chunks: latent frames [0, 2) with video frames [0, 5), then latent frame k + 1 with video frames
    [1 + 4k, 5 + 4k). ValueError for fewer frames."""
    frames = latents.shape[2] if latents.dim() == 5 else 0
    if frames < 2:
        raise ValueError(f"latents must be [1, 16, T, h, w] with T >= 2 (chunk 0 is 2 latent frames), got "
                         f"{list(latents.shape)}")
    if pixels is not None and (pixels.dim() != 5 or pixels.shape[2] < 1 + 4 * (frames - 1)):
        raise ValueError(f"pixels must be [1, 3, >= {1 + 4 * (frames - 1)}, H, W] for {frames} latent frames, got "
                         f"{list(pixels.shape)}")
    for k in range(frames - 1):
        lo, hi = (0, 2) if k == 0 else (k + 1, k + 2)
        seen = None if pixels is None else pixels[:, :, 0:5] if k == 0 else pixels[:, :, 1 + 4 * k:5 + 4 * k]
        yield VideoChunk(latents[:, :, lo:hi], seen)


def pixel_chunks(frames: Iterable[torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Iterator[VideoChunk]:
    """Video frames as they arrive -> chunks as soon as each is complete: ``frames`` yields [3, H, W] on the
    [-1, 1] scale (a file, a camera, a stream); every 5 (chunk 0), then every 4, are stacked into pixels
    [1, 3, n, H, W] and given to ``encode`` (a streaming VAE encoder: pixels -> raw latents [1, 16, 2 or 1, h, w],
    its causal cache kept between calls, as SDv2's ``stream_encode``, vae.py:546-583). Frames left over when
    ``frames`` ends are dropped. Nothing is read ahead: chunk k is made when asked for."""
    held, need = [], 5
    for frame in frames:
        held.append(frame)
        if len(held) == need:
            pixels = torch.stack(held, 1).unsqueeze(0)
            yield VideoChunk(encode(pixels), pixels)
            held, need = [], 4


def taken_chunks(take: Callable[[int], torch.Tensor | None], encode: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Iterator[VideoChunk]:
    """A source that hands out n frames at a time -> chunks: ``take(n)`` gives pixels [1, 3, n, H, W] on the
    [-1, 1] scale (waiting for them; a live source's newest-frames buffer, :mod:`video.live_sources`' ``take`` with
    its ``to_pixels``), or None at the end; 5 frames for chunk 0, then 4, each encoded by ``encode`` as in
    :func:`pixel_chunks`. Asked for only when the run pulls the next chunk."""
    need = 5
    while (pixels := take(need)) is not None:
        yield VideoChunk(encode(pixels), pixels)
        need = 4


def motion(previous_last: torch.Tensor, pixels: torch.Tensor) -> float:
    """SDv2's motion measure d of a chunk (inference.py:53-54): over its frames [1, 3, n, H, W], each against
    its predecessor (the first against ``previous_last`` [1, 3, 1, H, W], the previous chunk's last),
    d = clamp(max_f sqrt(mean_{c,h,w} (x_f - x_{f-1})^2) / 0.2, 0, 1), in the pixels' dtype."""
    frames = torch.cat([previous_last.to(pixels), pixels], 2)
    squared = (frames[:, :, 1:] - frames[:, :, :-1]) ** 2
    return (torch.sqrt(squared.mean(dim=(0, 1, 3, 4))).max() / MOTION_NORM).clamp(0, 1).item()


def next_noise_scale(first: float, previous: float, d: float) -> float:
    """A later chunk's noise scale s_k = (s_0 - 0.1 d) * 0.9 + 0.1 s_{k-1} (inference.py:55)."""
    return (first - 0.1 * d) * 0.9 + previous * 0.1


def first_timestep(scale: float) -> int:
    """A later chunk's first timestep, int(1000 s) - 100, written over the step list's first
    (inference.py:56, causal_stream_inference.py:312); chunk 0 starts at the list's first whatever s is."""
    return int(1000 * scale) - STEP_BELOW_NOISE


def lowest_noise_scale(first: float) -> float:
    """The lowest noise scale s_k the adaptive rule reaches from s_0 = ``first``: :func:`next_noise_scale` grows
    with s_{k-1} and falls with d, so the lowest comes from full motion (d = 1) at every chunk, where s_k falls
    toward its fixed point s_0 - 0.1 (s_k - (s_0 - 0.1) = 0.1^(k+1)). Computed with the rule itself, in the loop's
    floats, over enough chunks for it to settle."""
    lowest = scale = first
    for _ in range(_SETTLE_CHUNKS):
        scale = next_noise_scale(first, scale, 1.0)
        lowest = min(lowest, scale)
    return lowest


def noise_scale_reaches_a_timestep(first: float) -> bool:
    """Whether s_0 = ``first`` is a usable noise scale: in (0, 1] and every later chunk's first timestep
    (:func:`first_timestep` of the adaptive s_k) stays a timestep, above 0, even at the lowest s_k
    (:func:`lowest_noise_scale`). The reference checks neither: from s_0 < 0.201 its loop tells the model a
    timestep of 0 or below (inference.py:55-56, causal_stream_inference.py:312), so those are refused; the
    smallest s_0 kept, :data:`NOISE_SCALE_MIN`, is 0.201 whatever the steps (chunk 0 always starts at the
    list's first). A first timestep below the list's second is the reference's own doing (e.g. s_0 = 0.7 at
    steps 700, 500 reaches 500 at full motion) and is kept, as it is."""
    return 0 < first <= 1 and first_timestep(lowest_noise_scale(first)) > 0


def rope_position(chunk: int, cache_frames: int, refresh: int) -> int:
    """The RoPE frame position of a chunk's first latent frame: 0 for chunk 0, k + 1 for chunk k, restarting
    at ``cache_frames`` - 1 whenever it reaches ``refresh`` (current_start = kv_cache_length - frame_seq_length
    once current_start reaches t_refresh = 50 frames: inference_wo_batch.py:82, 314-316), so positions run
    2, 3, ..., refresh - 1, then cache_frames - 1, ..., refresh - 1 again."""
    if chunk == 0:
        return 0
    p = chunk + 1
    return p if p < refresh else cache_frames - 1 + (p - refresh) % (refresh - cache_frames + 1)


class SigmaTable:
    """The shifted sigma table SDv2's scheduler holds (``FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True).set_timesteps(1000)``, wan_wrapper.py:163-166, flow_match.py:19-34): s =
    linspace(1, 0, 1001)[:-1] in float32, sigma = shift s / (1 + (shift - 1) s), t = 1000 sigma. A timestep's
    sigma is the entry of the nearest t: compared in float64 for x0 (wan_wrapper.py:188-196) and in float32 for
    the re-noising (``add_noise``, flow_match.py:67-72), as the reference does."""

    def __init__(self, shift: float):
        s = torch.linspace(1.0, 0.0, TRAIN_STEPS + 1)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)  # float32
        self.timesteps = self.sigmas * TRAIN_STEPS

    def for_x0(self, t: int) -> float:
        """sigma of timestep ``t`` for x0 = x_t - sigma v (float64 argmin), as a Python float (float64)."""
        i = (self.timesteps.double() - float(t)).abs().argmin()
        return float(self.sigmas[i].double())

    def for_noise(self, t: int) -> torch.Tensor:
        """sigma of timestep ``t`` for re-noising (float32 argmin), a float32 0-dim tensor."""
        return self.sigmas[(self.timesteps - torch.tensor(float(t))).abs().argmin()]
