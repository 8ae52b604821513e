"""Video-to-video as StreamDiffusionV2 defines it, chunk by chunk, in the cascade (settings and per-chunk
rules: :mod:`sampling.v2v_config`; the KV cache: :mod:`model.sdv2_cache`).

Source: chenfengxu714/StreamDiffusionV2@c5a0f20. At parallel 1 the run is its sequential path
(``streamv2v/inference_wo_batch.py``, ``models/wan/causal_stream_inference.py:124-200, 298-348``):

- The input comes as chunks (:class:`~sampling.v2v_config.VideoChunk`) from an iterable, pulled one at a time
  when the chunk enters, so a live source (frames arriving, encoded as they come) drives it; the run ends
  when the source ends. Chunk 0 is 2 latent frames (video frames 0..4), every later one 1 (4 frames); the
  latents are the raw VAE mean, which the DiT takes as it is.
- Chunk k's input is x = eps * s + z * (1 - s) in the model's dtype (inference_wo_batch.py:273-274,
  311-312), eps its frames of the run's initial noise (``noise``; else :func:`sampling.noise.initial_noise`
  over ``chunks`` + 1 latent frames; with no length, each chunk's :func:`sampling.noise.block_noise`),
  s = ``noise_scale`` for chunk 0 and the adaptive s_k after it, from the motion of its pixels
  (:func:`~sampling.v2v_config.motion`, :func:`~sampling.v2v_config.next_noise_scale`).
- Its timesteps are the step list with the first replaced by int(1000 s_k) - 100 for k >= 1 (chunk 0 keeps
  the list's first); each step x0 = x_t - sigma v (float64), then, but after the last, x = (1 - sigma') x0 +
  sigma' eps' in float32, eps' = :func:`sampling.noise.step_noise` (seed, chunk, step). The chunk's output is
  its last x0 (DiT space: SDv2's decoder un-normalises it, vae.py:611-618); no clean pass.
- Self-attention goes through one :class:`~model.sdv2_cache.SDv2Cache` (its rules and quirks); RoPE position
  :func:`~sampling.v2v_config.rope_position`. The reference's extra forwards on stale latents after the last
  chunk (inference_wo_batch.py:293, outputs dropped at :354) are not run.
- Prompts: a :class:`PromptSchedule` over chunks, steering and blends as :class:`sampling.steer.LivePrompts`
  gives them (SDv2 has one prompt; a switch takes effect at the chunk it lands on).

The cascade (``parallel`` P, 1..S for S steps). Chunk b enters at tick floor(b S / P)
(:class:`CascadeSchedule` without clean passes), so up to P chunks at different noise levels are in flight,
run in ONE model forward (chunk 0, of another size, in a forward of its own before the others), and share the
one cache: in a forward, per layer, each chunk in turn (oldest first) writes its K/V by the cache's rule and
attends what that leaves, so the cache sees the forwards in the ticks' order.
- Against P1: chunk b's early steps run while chunk b-1 still denoises, so they see chunk b-1's K/V from a
  noisier step, and the ring's write targets and countdown follow the interleaved order. At P = S = 2 (the
  default steps 700, 500) the order of forwards IS P1's (chunk b's last step shares a tick with chunk b+1's
  first, and P1 has no clean pass in between), so the cascade computes P1's algorithm: it differs only by
  the float rounding of batching two chunks in one forward. Other P > 1 change the result (bounded in
  tests/sampling/test_v2v.py).
- Against SDv2's stream batch (``streamv2v/inference.py``, causal_stream_inference.py:199-296): that runs S
  slots with a copy of the cache each (slot i's written only by the chunks at step i, each slot's queue
  popped at every forward), so a chunk at step i attends the older chunks' step-i K/V and never its
  predecessor's last, at any P: a schedule of its own. The cascade keeps the sequential path's single cache.

Memory stays flat over an endless input: the cache is fixed, at most P chunks' latents are held, outputs are
kept only with ``keep``, and prompts no chunk takes any more are dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..common.transfer import to_device
from ..model.dit import WanModel
from ..model.sdv2_cache import SDv2Cache
from .config import PromptSchedule
from .loop import BlockEvent, TickEvent
from .noise import block_noise, initial_noise, step_noise
from .schedule import CascadeSchedule
from .steer import LivePrompts, Steer, SwitchEvent
from .ticks import Interrupted
from .v2v_config import SigmaTable, V2VConfig, VideoChunk, first_timestep, motion, next_noise_scale, rope_position


@dataclass(frozen=True)
class ChunkEvent(BlockEvent):
    """A finished chunk: ``block`` its index, ``latents`` [1, 16, 2 or 1, h, w] (DiT space), with the noise
    scale s and the first timestep it was given."""

    noise_scale: float = 0.0
    timestep: int = 0


@dataclass
class V2VResult:
    latents: torch.Tensor | None  # [1, 16, chunks + 1, h, w] with ``keep``; None without
    chunks: int
    ticks: int
    forwards: int
    seconds: float
    first_chunk_seconds: float
    noise_scales: tuple[float, ...] = ()  # per chunk, with ``keep``
    first_timesteps: tuple[int, ...] = ()


class _Chunks:
    """The run's per-chunk state: the input's checks, noise and motion as chunks enter, and the in-flight x_t."""

    def __init__(self, model: WanModel, cfg: V2VConfig, seed: int, chunks: int | None, noise: torch.Tensor | None):
        self.model, self.cfg, self.seed, self.chunks, self.noise = model, cfg, seed, chunks, noise
        self.x_t: dict[int, torch.Tensor] = {}
        self.times: dict[int, list[int]] = {}
        self.scales: dict[int, float] = {}
        self.cache: SDv2Cache | None = None
        self.shape: tuple[int, ...] | None = None  # chunk 0's latents [1, C, 2, h, w]
        self.last_pixel: torch.Tensor | None = None
        self.scale = cfg.noise_scale

    def _check(self, b: int, chunk: VideoChunk) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, pixels, mc = chunk.latents, chunk.pixels, self.model.cfg
        frames, video = (2, 5) if b == 0 else (1, 4)
        ph, pw = mc.patch_size[1:]
        if z.dim() != 5 or z.shape[0] != 1 or z.shape[1] != mc.in_dim or z.shape[2] != frames \
                or z.shape[3] < ph or z.shape[4] < pw or z.shape[3] % ph or z.shape[4] % pw \
                or (b and tuple(z.shape[3:]) != self.shape[3:]):
            size = "" if b == 0 else f" of chunk 0's size {list(self.shape[3:])}"
            raise ValueError(f"chunk {b}: latents must be [1, {mc.in_dim}, {frames}, h, w]{size} (h, w positive "
                             f"multiples of the patch {ph}x{pw}), got {list(z.shape)}")
        if b and (pixels is None) != (self.last_pixel is None):
            raise ValueError(f"chunk {b}: pixels must be given for every chunk or for none (the motion measure "
                             f"compares each chunk with the one before)")
        if pixels is not None and (pixels.dim() != 5 or pixels.shape[:3] != (1, 3, video)
                                   or (b and pixels.shape[3:] != self.last_pixel.shape[3:])):
            raise ValueError(f"chunk {b}: pixels must be [1, 3, {video}, H, W] (its video frames, the size of the "
                             f"chunks before), got {list(pixels.shape)}")
        return z, pixels

    def _eps(self, b: int) -> torch.Tensor:
        """Chunk b's input noise [1, C, f, h, w]: its frames of the run's initial noise."""
        lo, hi = (0, 2) if b == 0 else (b + 1, b + 2)
        model, shape = self.model, self.shape
        if self.noise is None and self.chunks is None:
            return block_noise(self.seed, b, (*shape[:2], hi - lo, *shape[3:]), model.device, model.dtype)
        if self.noise is None:
            self.noise = initial_noise(self.seed, (*shape[:2], self.chunks + 1, *shape[3:]), model.device, model.dtype)
        elif b == 0:
            if self.noise.shape[:2] != shape[:2] or self.noise.shape[3:] != shape[3:] or self.noise.shape[2] < 2:
                raise ValueError(f"the initial noise must be [1, {shape[1]}, chunks + 1, {shape[3]}, {shape[4]}], got "
                                 f"{list(self.noise.shape)}")
            self.noise = to_device(self.noise, model.device).to(model.dtype)
        return self.noise[:, :, lo:hi]

    def enter(self, b: int, chunk: VideoChunk) -> None:
        """Chunk b's noised input and timesteps (and, at chunk 0, the cache)."""
        z, pixels = self._check(b, chunk)
        if b == 0:
            self.shape = tuple(z.shape)
            mc, cfg = self.model.cfg, self.cfg
            tokens = (z.shape[3] // mc.patch_size[1]) * (z.shape[4] // mc.patch_size[2])
            self.cache = SDv2Cache(mc.num_layers, tokens, mc.num_heads, mc.head_dim, self.model.dtype,
                                   self.model.device, frames=cfg.cache_frames, sink=cfg.sink,
                                   threshold=cfg.adapt_sink_threshold, steps=len(cfg.steps))
            first = self.cfg.steps[0]
        else:
            d = 0.0 if pixels is None else motion(self.last_pixel, to_device(pixels, self.last_pixel.device))
            self.scale = next_noise_scale(self.cfg.noise_scale, self.scale, d)
            first = first_timestep(self.scale)
        if pixels is not None:
            self.last_pixel = pixels[:, :, -1:]
        s, dtype = self.scale, self.model.dtype
        self.x_t[b] = self._eps(b) * s + to_device(z, self.model.device).to(dtype) * (1 - s)
        self.times[b] = [first, *self.cfg.steps[1:]]
        self.scales[b] = s


def video_to_video(model: WanModel, prompts: PromptSchedule, cfg: V2VConfig, source: Iterable[VideoChunk], *,
                   seed: int = 0, chunks: int | None = None, noise: torch.Tensor | None = None,
                   on_chunk: Callable[[ChunkEvent], None] | None = None,
                   on_tick: Callable[[TickEvent], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, steer: Steer | None = None,
                   on_switch: Callable[[SwitchEvent], None] | None = None, keep: bool = True) -> V2VResult:
    """Restyle the chunks of ``source`` (see the module docstring for the rules).

    ``chunks``: the input's length in chunks where known (a file: :func:`~sampling.v2v_config.chunk_count`),
    None for a live or endless one; ``noise``: the initial noise [1, 16, chunks + 1, h, w] (its length sets
    ``chunks`` when that is None); ``prompts``: embeddings [L, text_dim] by chunk. ``on_chunk`` gets a
    :class:`ChunkEvent` per finished chunk, in order; ``on_tick`` a :class:`TickEvent` after every tick
    (``ticks`` 0 when the length is unknown); ``should_stop`` is asked before every tick: an input of unknown
    length then ends normally once a chunk is final, else :class:`Interrupted` is raised. ``keep``: hold every
    output for :attr:`V2VResult.latents` (leave it off for an endless input). Raises ValueError for bad
    settings, prompts or noise before any model work, and for a chunk of the wrong shape when it arrives."""
    cfg.validate()
    if noise is not None:
        if noise.dim() != 5 or noise.shape[2] < 2 or (chunks is not None and noise.shape[2] != chunks + 1):
            frames = "chunks + 1, at least 2" if chunks is None else chunks + 1
            raise ValueError(f"the initial noise must be [1, 16, T, h, w] (T = {frames} latent frames), got "
                             f"{list(noise.shape)}")
        chunks = noise.shape[2] - 1 if chunks is None else chunks
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise ValueError(f"the input must hold at least 1 chunk (5 video frames), got {chunks!r}")
    prompts.validate(chunks or 0, model.cfg.text_dim)
    schedule = CascadeSchedule(chunks or 0, len(cfg.steps), cfg.parallel, clean_pass=False)
    state, sigma = _Chunks(model, cfg, seed, chunks, noise), SigmaTable(cfg.shift)
    incoming = iter(source)
    ended = None  # chunks the source gave, once it has ended
    outputs, done, forwards, ticks, first_chunk = [], 0, 0, 0, None
    start = time.perf_counter()
    with torch.inference_mode():
        live = LivePrompts(model, prompts, schedule, False, steer, on_switch)
        for tick in schedule.iter_ticks():
            if should_stop is not None and should_stop():
                if chunks is None and done:
                    break
                raise Interrupted(f"stopped at tick {tick.index}" + ("" if chunks is None else f" of {len(schedule)}"))
            live.poll(tick.index)
            for b, stage in tick.pairs:
                if stage == 0 and ended is None:
                    item = next(incoming, None)
                    if item is None:
                        ended = b
                    else:
                        state.enter(b, item)
            if ended == 0:
                raise ValueError("the video input holds no chunk (it needs at least 5 frames)")
            pairs = [(b, stage) for b, stage in tick.pairs if ended is None or b < ended]
            if not pairs:
                break
            ticks += 1
            live.forget_before(pairs[0][0])
            velocity = {}
            for group in ([p for p in pairs if p[0] == 0], [p for p in pairs if p[0] != 0]):
                if not group:
                    continue
                positions = [rope_position(b, cfg.cache_frames, cfg.refresh_frames) for b, _ in group]
                t = torch.tensor([[float(state.times[b][s])] * state.x_t[b].shape[2] for b, s in group],
                                 device=model.device)
                v = model(torch.cat([state.x_t[b] for b, _ in group]), t, positions, [live.prompt(b) for b, _ in group],
                          state.cache.attention(positions))
                velocity.update({b: v[i:i + 1] for i, (b, _) in enumerate(group)})
                forwards += 1
            for b, stage in pairs:
                times, x = state.times[b], state.x_t[b]
                x0 = (x.double() - sigma.for_x0(times[stage]) * velocity[b].double()).to(x.dtype)
                if stage + 1 < len(times):
                    nxt = sigma.for_noise(times[stage + 1])
                    eps = step_noise(seed, b, stage, x0)
                    state.x_t[b] = ((1 - nxt) * x0.float() + nxt * eps.float()).to(x.dtype)
                    continue
                del state.x_t[b]
                done += 1
                scale, first = state.scales.pop(b), state.times.pop(b)[0]
                elapsed = time.perf_counter() - start
                first_chunk = elapsed if first_chunk is None else first_chunk
                if keep:
                    outputs.append((x0, scale, first))
                if on_chunk is not None:
                    on_chunk(ChunkEvent(b, x0, tick.index, elapsed, scale, first))
            if on_tick is not None:
                on_tick(TickEvent(tick.index, 0 if chunks is None else len(schedule), tuple(pairs), done,
                                  time.perf_counter() - start))
    seconds = time.perf_counter() - start
    latents = torch.cat([x for x, _, _ in outputs], 2) if outputs else None
    return V2VResult(latents, done, ticks, forwards, seconds, first_chunk or seconds,
                     tuple(s for _, s, _ in outputs), tuple(t for *_, t in outputs))
