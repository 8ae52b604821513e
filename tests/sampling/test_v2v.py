"""StreamDiffusionV2's video-to-video on tiny random weights of the real architecture (CPU, fp32).

The oracle is a loop written here from SDv2's semantics (chenfengxu714/StreamDiffusionV2@c5a0f20, its
sequential path streamv2v/inference_wo_batch.py; ../shared/references/sdv2_semantics.md): its own chunking,
motion rule and noise scales over the whole pixel video, its own step list and nearest-sigma table, its own
noise (the documented draws of tests/oracles.py), and its own KV cache kept in tokens as the reference's
per-layer dicts and eviction queues are. Only the DiT's forward is shared.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from oracles import endless_block_noise, noise_after_step, starting_noise

from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.ticks import Interrupted
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import V2VConfig, VideoChunk, sdv2_steps, video_chunks

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame
TPF = 8
SEED = 11


def sdv2_video(latent_frames, seed=0):
    """Raw latents [1, 16, T, 4, 8] and pixels [1, 3, 1 + 4(T - 1) + 2, 32, 64] (two trailing frames that the
    chunking drops) whose motion grows frame by frame, so the noise scales take values inside (0.6, 0.7)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, latent_frames, H // 8, W // 8, generator=g)
    frames = 1 + 4 * (latent_frames - 1) + 2
    base = torch.rand(1, 3, 1, H, W, generator=g) * 2 - 1
    amplitude = torch.linspace(0.0, 0.2, frames).view(1, 1, frames, 1, 1)
    return latents, base + amplitude * torch.randn(1, 3, frames, H, W, generator=g)


class ReferenceCache:
    """SDv2's self-attention KV cache in tokens: per layer a dict of k, v [1, frames*TPF, heads, hd], global and
    local end indices, total steps and a countdown, and an eviction queue of token end positions; one write and
    attention per forward (the chunk's queries over the valid cache, no mask)."""

    def __init__(self, frames, sink, threshold, steps):
        size = frames * TPF
        self.size, self.sink_tokens, self.sink, self.threshold = size, sink * TPF, sink, threshold
        shape = (1, size, TINY.num_heads, TINY.head_dim)
        self.layers = [dict(k=torch.zeros(shape), v=torch.zeros(shape), global_end=0, local_end=0, total=steps,
                            countdown=steps) for _ in range(TINY.num_layers)]
        self.queues = [[] for _ in range(TINY.num_layers)]
        self.pushes = [0] * TINY.num_layers

    def forward_at(self, start_tokens):
        def attention(layer, q, k, v):
            c, queue = self.layers[layer], self.queues[layer]
            new = k.shape[1]
            end = start_tokens + new
            if self.sink_tokens and self.threshold > -1 and new <= TPF:
                sims = []
                for cached, fresh in ((c["k"], k), (c["v"], v)):
                    old = cached[0, :self.sink_tokens].reshape(self.sink, TPF, -1).mean(1)
                    sims.append(torch.cosine_similarity(old, fresh[0].reshape(1, TPF, -1).mean(1), dim=-1))
                avg = (sims[0] + sims[1]) / 2
                if avg.min() < self.threshold:
                    queue.insert(0, (int(avg.argmin()) + 1) * TPF)
                    self.pushes[layer] += 1
            if end > self.size or c["local_end"] >= self.size:
                c["local_end"] = self.size
                target = queue[0]
                if c["countdown"] > 1:
                    c["countdown"] -= 1
                else:
                    first = queue.pop(0)
                    if first > self.sink_tokens:
                        queue.append(first)
                    c["countdown"] = c["total"]
                lo, hi = target - new, target
            else:
                c["local_end"] = c["local_end"] + end - c["global_end"]
                rolling = end + new
                if self.sink_tokens < rolling <= self.size and (not queue or queue[-1] != rolling):
                    queue.append(rolling)
                lo, hi = c["local_end"] - new, c["local_end"]
            c["k"][:, lo:hi], c["v"][:, lo:hi] = k, v
            c["global_end"] = end
            seen = c["local_end"]
            tr = lambda x: x.transpose(1, 2)  # noqa: E731
            return tr(F.scaled_dot_product_attention(tr(q), tr(c["k"][:, :seen]), tr(c["v"][:, :seen])))
        return attention


def sdv2_sequential(model, prompts, latents, pixels, steps, noise_scale=0.7, frames=6, sink=3, threshold=0.2,
                    refresh=50, endless=False):
    """SDv2's sequential run of a video: chunk 0 (video frames 0..4, latent frames 0..1), then chunk k (4 frames,
    latent frame k + 1), trailing frames dropped. Returns (outputs [1, 16, chunks + 1, h, w], noise scales,
    first timesteps, the cache)."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = 8.0 * s / (1 + 7.0 * s)
    ts = table * 1000
    sigma_x0 = lambda t: float(table[(ts.double() - float(t)).abs().argmin()].double())  # noqa: E731
    sigma_noise = lambda t: table[(ts - torch.tensor(float(t))).abs().argmin()]  # noqa: E731
    chunks = (pixels.shape[2] - 1) // 4
    shape = (1, 16, chunks + 1, H // 8, W // 8)
    noise = None if endless else starting_noise(SEED, shape)
    cache = ReferenceCache(frames, sink, threshold, len(steps))
    text = {k: model.encode_prompt(e) for k, e in prompts.items()}
    step_list = list(steps)

    def denoise(chunk, x, start_frame):
        prompt = text[max(k for k in text if k <= chunk)]
        for i, t in enumerate(step_list):
            v = model(x, torch.full((1, x.shape[2]), float(t)), [start_frame], [prompt],
                      cache.forward_at(start_frame * TPF))
            x0 = (x.double() - sigma_x0(t) * v.double()).float()
            if i + 1 < len(step_list):
                sig = sigma_noise(step_list[i + 1])
                x = ((1 - sig) * x0 + sig * noise_after_step(SEED, chunk, i, x0.shape)).float()
        return x0

    def eps(chunk, lo, hi):
        return endless_block_noise(SEED, chunk, (1, 16, hi - lo, H // 8, W // 8)) if endless else noise[:, :, lo:hi]

    scale, outs, scales, firsts = noise_scale, [], [], []
    x = eps(0, 0, 2) * scale + latents[:, :, 0:2] * (1 - scale)
    outs.append(denoise(0, x, 0))
    scales.append(scale)
    firsts.append(step_list[0])
    current_end = 2
    for k in range(1, chunks):
        end_idx = 1 + 4 * (k + 1)
        diff = (pixels[:, :, end_idx - 4:end_idx] - pixels[:, :, end_idx - 5:end_idx - 1]) ** 2
        d = (torch.sqrt(diff.mean(dim=(0, 1, 3, 4))).max() / 0.2).clamp(0, 1)
        scale = (noise_scale - 0.1 * d.item()) * 0.9 + scale * 0.1
        step_list[0] = int(1000 * scale) - 100
        current_start, current_end = current_end, current_end + 1
        if current_start >= refresh:
            current_start, current_end = frames - 1, frames
        x = eps(k, k + 1, k + 2) * scale + latents[:, :, k + 1:k + 2] * (1 - scale)
        outs.append(denoise(k, x, current_start))
        scales.append(scale)
        firsts.append(step_list[0])
    return torch.cat(outs, 2), scales, firsts, cache


def engine(model, prompts, latents, pixels, cfg, endless=False, **kw):
    chunks = video_chunks(latents[:, :, :(pixels.shape[2] - 1) // 4 + 1], pixels)
    return video_to_video(model, PromptSchedule(sorted(prompts.items())), cfg, chunks, seed=SEED,
                          chunks=None if endless else (pixels.shape[2] - 1) // 4, **kw)


@pytest.mark.parametrize("steps, frames, sink, threshold, refresh", [
    (sdv2_steps(2), 6, 3, 0.2, 50),  # the 1.3B run
    (sdv2_steps(2), 6, 3, 0.2, 9),  # RoPE restarting within the video
    (sdv2_steps(4), 6, 3, 0.2, 11),  # --step 4
    (sdv2_steps(1), 6, 3, 0.2, 12),  # 14B's one step: every full-cache forward pops
    (sdv2_steps(2), 5, 2, -1, 50),  # the fast config: no adaptive sink
    (sdv2_steps(3), 6, 3, 0.9, 10),  # a high threshold: sink pushes between a chunk's forwards
])
def test_p1_equals_the_sequential_reference(model, prompt, steps, frames, sink, threshold, refresh):
    latents, pixels = sdv2_video(15)
    cfg = V2VConfig(steps=steps, cache_frames=frames, sink=sink, adapt_sink_threshold=threshold, refresh_frames=refresh)
    expected, scales, firsts, cache = sdv2_sequential(model, {0: prompt}, latents, pixels, steps, frames=frames,
                                                      sink=sink, threshold=threshold, refresh=refresh)
    res = engine(model, {0: prompt}, latents, pixels, cfg)
    assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()
    assert res.noise_scales == tuple(scales) and res.first_timesteps == tuple(firsts)
    assert res.forwards == res.ticks == len(steps) * 14 and res.chunks == 14
    assert 0.6 < min(scales[1:]) < max(scales[1:]) < 0.7  # the motion rule gave scales inside its range
    if threshold > -1:  # the case exercised the adaptive sink past its first, always-firing push
        assert max(cache.pushes) > 1


def test_an_endless_input_draws_each_chunks_noise_and_switches_prompts(model, prompt):
    """No length: each chunk's noise is its own block_noise draw; a prompt switch at chunk 4."""
    other = torch.randn(7, TINY.text_dim, generator=torch.Generator().manual_seed(9))
    latents, pixels = sdv2_video(9)
    expected, *_ = sdv2_sequential(model, {0: prompt, 4: other}, latents, pixels, sdv2_steps(2), endless=True)
    res = engine(model, {0: prompt, 4: other}, latents, pixels, V2VConfig(), endless=True)
    assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()


def test_the_cascade_at_two_steps_and_p2_is_p1_up_to_batching(model, prompt):
    """P = S = 2: chunk b's last step shares a forward with chunk b+1's first, the order of cache writes is
    P1's: only the float rounding of two chunks in one forward differs."""
    latents, pixels = sdv2_video(15)
    p1 = engine(model, {0: prompt}, latents, pixels, V2VConfig())
    p2 = engine(model, {0: prompt}, latents, pixels, V2VConfig(parallel=2))
    assert p2.forwards == 1 + 2 + 13 and p2.ticks == 15  # chunk 0 alone, then beside chunk 1; one a tick after
    assert torch.equal(p2.latents[:, :, :2], p1.latents[:, :, :2])
    assert (p2.latents - p1.latents).abs().max() <= 1e-5


@pytest.mark.parametrize("parallel", [2, 4])
def test_the_cascade_at_four_steps_deviates_within_its_bound(model, prompt, parallel):
    """S = 4: chunk b's first steps see chunk b-1 at a noisier step and the ring follows the ticks' order.
    Measured on these weights: max |P - P1| / max |P1| = 0.089 (P2) and 0.115 (P4); bound 0.2. Chunk 0 runs
    exactly as at P1 (it writes and attends before any newer chunk in every forward)."""
    latents, pixels = sdv2_video(15)
    cfg = V2VConfig(steps=sdv2_steps(4))
    p1 = engine(model, {0: prompt}, latents, pixels, cfg).latents
    pk = engine(model, {0: prompt}, latents, pixels, V2VConfig(steps=sdv2_steps(4), parallel=parallel)).latents
    assert torch.equal(pk[:, :, :2], p1[:, :, :2])
    deviation = ((pk - p1).abs().max() / p1.abs().max()).item()
    assert 1e-3 < deviation <= 0.2, deviation


def test_the_ring_keeps_each_chunks_first_forward_once_full():
    """The cache's countdown counts full-cache forwards from the filling chunk's 2nd, so at S = 2 each later
    chunk's first forward overwrites the previous chunk's second and pops: a full cache holds chunks' first
    forwards. Slots labelled 10 * chunk + forward, derived by hand from the rule (no adaptive sink)."""
    from cascade_core.model.sdv2_cache import SDv2Cache

    cache = SDv2Cache(1, 1, 1, 1, torch.float32, "cpu", frames=6, sink=3, threshold=-1, steps=2)
    for chunk in range(8):
        n, position = (2, 0) if chunk == 0 else (1, chunk + 1)
        for forward in (1, 2):
            seen = cache.write(0, position, torch.full((n, 1, 1), 10.0 * chunk + forward), torch.zeros(n, 1, 1))
    assert cache.k.flatten().tolist() == [2, 2, 12, 72, 61, 71] and seen == 6
    assert cache.layers[0].queue == [4, 5, 6]  # chunk 7 popped 6 at its first forward


def test_chunks_are_pulled_as_they_enter_and_reported_in_order(model, prompt):
    """A live source: chunk b is asked for when it enters (at P1 after chunk b-1 is final), never before."""
    latents, pixels = sdv2_video(6)
    log = []

    def source():
        for i, c in enumerate(video_chunks(latents, pixels[:, :, :21])):
            log.append(("pulled", i))
            yield c

    res = video_to_video(model, PromptSchedule.single(prompt), V2VConfig(), source(), seed=SEED,
                         on_chunk=lambda e: log.append(("done", e.block)), keep=False)
    assert log == [(w, i) for i in range(5) for w in ("pulled", "done")]
    assert res.latents is None and res.chunks == 5


def test_stopping_ends_an_endless_input_normally_and_interrupts_a_finite_one(model, prompt):
    latents, pixels = sdv2_video(6)
    asked = iter(range(100))
    stop = lambda: next(asked) >= 5  # noqa: E731
    res = engine(model, {0: prompt}, latents, pixels, V2VConfig(), endless=True, should_stop=stop)
    assert res.chunks == 2 and res.latents.shape[2] == 3
    with pytest.raises(Interrupted):
        engine(model, {0: prompt}, latents, pixels, V2VConfig(), should_stop=lambda: True)


@pytest.mark.parametrize("chunk, message", [
    (VideoChunk(torch.zeros(1, 16, 1, 4, 8)), "chunk 0: latents must be [1, 16, 2, h, w]"),
    (VideoChunk(torch.zeros(1, 16, 2, 3, 8)), "multiples of the patch"),
    (VideoChunk(torch.zeros(1, 16, 2, 4, 0)), "positive multiples of the patch 2x2"),  # no conv3d traceback
    (VideoChunk(torch.zeros(1, 16, 2, 0, 8)), "positive multiples of the patch 2x2"),
    (VideoChunk(torch.zeros(1, 16, 2, 4, 8), torch.zeros(1, 3, 4, 32, 64)), "pixels must be [1, 3, 5, H, W]"),
])
def test_a_bad_chunk_is_refused_in_one_line_before_any_forward(model, prompt, chunk, message):
    calls = []
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        video_to_video(model, PromptSchedule.single(prompt), V2VConfig(), iter([chunk]),
                       on_tick=lambda e: calls.append(e))
    assert not calls


@pytest.mark.parametrize("settings, message", [
    ({"parallel": 3}, "parallelism must lie in 1..2"),
    ({"steps": (500, 700)}, "decreasing"),
    ({"noise_scale": 0.0}, "noise scale"),
    ({"cache_frames": 3}, ">= 4 latent frames"),
    ({"sink": 6}, "sink must lie in 0..5"),
    ({"refresh_frames": 5}, "RoPE refresh"),
])
def test_bad_settings_are_refused_in_one_line(model, prompt, settings, message):
    with pytest.raises(ValueError, match=message):
        video_to_video(model, PromptSchedule.single(prompt), V2VConfig(**settings), iter(()))


def test_the_sigma_table_and_the_step_lists_are_sdv2s():
    from cascade_core.sampling.v2v_config import SigmaTable, rope_position

    table = SigmaTable(8.0)
    got = [table.for_x0(t) for t in (700, 600, 500, 400, 200)]
    assert got == pytest.approx([0.700232, 0.600190, 0.499719, 0.400260, 0.198347], abs=1e-6)
    assert [sdv2_steps(n) for n in (1, 2, 4)] == [(700,), (700, 500), (700, 500, 400, 200)]
    assert [rope_position(k, 6, 50) for k in (0, 1, 48, 49, 50, 93, 94)] == [0, 2, 49, 5, 6, 49, 5]


def test_the_motion_measure_compares_a_chunk_with_the_frame_before_it():
    """d = clamp(max_f RMS(x_f - x_{f-1}) / 0.2, 0, 1), the first frame against the previous chunk's last: a
    still chunk after a jump of 0.1 everywhere measures d = 0.5; twice the jump saturates."""
    from cascade_core.sampling.v2v_config import first_timestep, motion, next_noise_scale

    still = torch.full((1, 3, 4, 8, 8), 0.1)
    assert motion(torch.zeros(1, 3, 1, 8, 8), still) == pytest.approx(0.5)
    assert motion(torch.full((1, 3, 1, 8, 8), 0.1), still) == 0.0
    assert motion(torch.full((1, 3, 1, 8, 8), -0.3), still) == 1.0
    assert next_noise_scale(0.7, 0.7, 0.0) == pytest.approx(0.7) and first_timestep(0.7) == 600
    assert next_noise_scale(0.7, 0.7, 1.0) == pytest.approx(0.61) and first_timestep(0.61) == 510


def test_a_steered_switch_equals_the_same_switch_in_the_schedule(model, prompt):
    """A prompt sent while the run goes on lands at the next chunk to enter (asked for chunk 3 here), and gives
    what a schedule holding it at chunk 3 gives."""
    other = torch.randn(7, TINY.text_dim, generator=torch.Generator().manual_seed(9))
    latents, pixels = sdv2_video(7)
    scheduled = engine(model, {0: prompt, 3: other}, latents, pixels, V2VConfig(parallel=2)).latents
    sent = iter([[(3, other)]])
    landed = []
    steered = engine(model, {0: prompt}, latents, pixels, V2VConfig(parallel=2), steer=lambda: next(sent, []),
                     on_switch=landed.append).latents
    assert torch.equal(steered, scheduled) and [e.block for e in landed] == [3]


def test_frame_sources_become_chunks_of_5_then_4_frames_leftovers_dropped(model, prompt):
    """Frames one at a time (pixel_chunks) and n at a time (taken_chunks) give the chunks video_chunks cuts
    from the whole video, hence the same run; the 2 frames after the last whole chunk are dropped."""
    from cascade_core.sampling.v2v_config import pixel_chunks, taken_chunks

    latents, pixels = sdv2_video(5)  # 17 + 2 frames: 4 chunks
    encoded = []

    def encode(chunk_pixels):  # chunk k of a source: its latents of the whole video
        encoded.append(chunk_pixels.shape[2])
        k = (len(encoded) - 1) % 4
        return latents[:, :, 0:2] if k == 0 else latents[:, :, k + 1:k + 2]

    at = [0]

    def take(n):
        if at[0] + n > pixels.shape[2]:
            return None
        at[0] += n
        return pixels[:, :, at[0] - n:at[0]]

    runs = [video_to_video(model, PromptSchedule.single(prompt), V2VConfig(), source, seed=SEED).latents
            for source in (video_chunks(latents, pixels), pixel_chunks(iter(pixels[0].unbind(1)), encode),
                           taken_chunks(take, encode))]
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    assert encoded == [5, 4, 4, 4] * 2
