"""Endless videos (blocks 0, until stopped): the same blocks as a run of known length given the same
noise, a bounded KV pool, latent window and prompt table over 200 blocks, and the refusals (tiny random
model of the real architecture, CPU, fp32, one thread)."""
import gc
import itertools

import pytest
import torch
from conftest import TINY, counted
from oracles import endless_block_noise

from cascade_core.sampling.latent_window import LatentWindow
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.sampling.schedule import CascadeSchedule

pytestmark = pytest.mark.usefixtures("one_thread")
W, H, SEED = 64, 32, 5
LATENT = (H // 8, W // 8)


def embeds(seed):
    return torch.randn(6, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


class StopAfter:
    """should_stop / on_block pair: stops before the first tick after ``blocks`` blocks are final, and
    keeps every final block's latents."""

    def __init__(self, blocks):
        self.blocks, self.finished = blocks, []

    def on_block(self, ev):
        self.finished.append((ev.block, ev.latents.clone()))

    def __call__(self):
        return len(self.finished) >= self.blocks


def their_noise(cfg, blocks, offset=0):
    """The initial noise of a run of ``blocks`` blocks drawn with the endless rule, block by block."""
    grid = cfg.grid
    return torch.cat([endless_block_noise(SEED, offset + b, (1, 16, grid.size(b), *LATENT))
                      for b in range(blocks)], 2)


def test_an_endless_schedule_lists_the_ticks_of_a_long_one_lazily():
    for steps, parallel, fold, first, clean in [(4, 1, False, None, True), (4, 1, True, None, True),
                                                (4, 3, False, None, True), (4, 5, False, None, True),
                                                (4, 2, False, 6, True), (5, 5, False, None, False), (3, 4, False, 1, True)]:
        endless = CascadeSchedule(0, steps, parallel, fold, first, clean)
        long = CascadeSchedule(400, steps, parallel, fold, first, clean)
        assert list(itertools.islice(endless.iter_ticks(), 300)) == long.ticks()[:300]
        assert endless.max_in_flight == long.max_in_flight
        entries = [long.entry(b) for b in range(400)]
        for tick in range(200):
            assert endless.next_entering(tick) == next(b for b, e in enumerate(entries) if e >= tick)
        with pytest.raises(TypeError):
            len(endless)


@pytest.mark.parametrize("parallel,window,sink,fpb,independent", [
    (1, 6, 2, 2, False), (3, 6, 2, 2, False), (5, 8, 0, 2, False), (2, 5, 1, 1, True)])
def test_an_endless_run_stopped_after_k_blocks_equals_a_longer_run_with_its_noise(
        model, prompt, parallel, window, sink, fpb, independent):
    cfg = CascadeConfig(frames_per_block=fpb, parallel=parallel, window=window, sink=sink,
                        independent_first_frame=independent)
    k = 7
    stop = StopAfter(k)
    endless = generate(model, PromptSchedule.single(prompt), cfg, blocks=0, width=W, height=H, seed=SEED,
                       should_stop=stop, on_block=stop.on_block)
    # blocks after the k-th, in flight beside them, make every tick the same forward (a forward of fewer
    # segments may round differently)
    longer = k + 2 * parallel + 2
    finite = generate(model, PromptSchedule.single(prompt), cfg, blocks=longer, width=W, height=H, seed=SEED,
                      noise=their_noise(cfg, longer))
    assert endless.blocks == len(stop.finished) == k  # blocks still in flight are dropped, not counted
    assert [b for b, _ in stop.finished] == list(range(k))
    for b, latents in stop.finished:
        grid = cfg.grid
        assert torch.equal(latents, finite.latents[:, :, grid.start(b):grid.end(b)]), b
    total = cfg.grid.total(k)
    assert endless.first_frame == total - window and endless.latents.shape[2] == window
    assert torch.equal(endless.latents, finite.latents[:, :, total - window:total])


def test_an_endless_run_steered_and_switched_with_recache_equals_the_schedule(model, prompt):
    """LongLive-style: a window, a re-cache at every switch, switches scheduled and steered."""
    cfg = CascadeConfig(frames_per_block=2, window=6, sink=2, switch_mode="recache")
    second, third = embeds(2), embeds(3)
    steered = iter([[], [], [(6, third)]])

    stop = StopAfter(9)
    endless, n_endless = counted(model, lambda: generate(
        model, PromptSchedule([(0, prompt), (3, second)]), cfg, blocks=0, width=W, height=H, seed=SEED,
        should_stop=stop, on_block=stop.on_block, steer=lambda: next(steered, [])))
    finite, n_finite = counted(model, lambda: generate(
        model, PromptSchedule([(0, prompt), (3, second), (6, third)]), cfg, blocks=9, width=W, height=H,
        seed=SEED, noise=their_noise(cfg, 9)))
    assert n_endless == n_finite - 1  # stopped before block 8's clean pass, which a last block needs no more
    assert torch.equal(torch.cat([x for _, x in stop.finished], 2), finite.latents)


def test_an_endless_krea_run_reencodes_from_a_bounded_window(model, prompt):
    """Krea Realtime (a KV recompute from K context frames) with K not a multiple of N: the re-encoder's
    first call decodes from frame 0, which the latent window must still hold."""
    from conftest import tiny_models

    from cascade_core.video.reencode import ContextReencoder

    vae_sd = tiny_models().vae_state_dict("tiny")
    cfg = CascadeConfig(steps=(1000, 500, 0), kv_recompute=4, frames_per_block=3)
    stop = StopAfter(6)
    endless = generate(model, PromptSchedule.single(prompt), cfg, blocks=0, width=W, height=H, seed=SEED,
                       should_stop=stop, on_block=stop.on_block, context_image=ContextReencoder.from_state_dict(vae_sd))
    finite = generate(model, PromptSchedule.single(prompt), cfg, blocks=6, width=W, height=H, seed=SEED,
                      noise=their_noise(cfg, 6), context_image=ContextReencoder.from_state_dict(vae_sd))
    assert torch.equal(torch.cat([x for _, x in stop.finished], 2), finite.latents)
    assert torch.equal(endless.latents, finite.latents[:, :, -7:])  # the window: K + N frames


def live_tensor_bytes():
    """Bytes of every tensor storage alive in this process (each storage once)."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("parallel,mode", [(1, "recache"), (4, "none")])
def test_memory_stays_flat_over_200_blocks_steered_every_5(model, prompt, parallel, mode):
    cfg = CascadeConfig(frames_per_block=1, steps=(1000, 500, 250), parallel=parallel, window=4, sink=1,
                        switch_mode=mode)
    samples = {}
    calls = itertools.count()
    texts = [embeds(s) for s in range(4)]

    def steer():  # a new prompt every 5 blocks' worth of ticks, for 200 blocks
        n = next(calls)
        return [(None, texts[n % 4])] if n % 20 == 0 else []

    def on_block(ev):
        if ev.block >= 20 and ev.block % 10 == 0:
            samples[ev.block] = live_tensor_bytes()

    stop = lambda: 200 in samples  # noqa: E731
    result = generate(model, PromptSchedule.single(prompt), cfg, blocks=0, width=W, height=H, seed=SEED,
                      should_stop=stop, on_block=on_block, steer=steer)
    assert result.blocks >= 200 and next(calls) >= 200
    early = max(v for b, v in samples.items() if b <= 100)
    assert max(v for b, v in samples.items() if b > 100) <= early, samples


def test_endless_runs_are_refused_where_they_are_not_defined(model, prompt):
    one = PromptSchedule.single(prompt)
    with pytest.raises(ValueError, match="endless video .* needs a local window"):
        generate(model, one, CascadeConfig(), blocks=0, width=W, height=H)
    with pytest.raises(ValueError, match="give no initial noise"):
        generate(model, one, CascadeConfig(window=6), blocks=0, width=W, height=H, noise=torch.zeros(1, 16, 3, *LATENT))
    with pytest.raises(ValueError, match="one device"):
        CascadeConfig(window=6).check_run(0, devices=2, endless=True)
    # a switch anywhere is inside an endless video
    stop = StopAfter(1)
    generate(model, PromptSchedule([(0, prompt), (500, embeds(1))]), CascadeConfig(window=6), blocks=0,
             width=W, height=H, should_stop=stop, on_block=stop.on_block)


def test_the_latent_window_keeps_the_last_frames_in_order():
    win = LatentWindow(4, 2, 1, 1, torch.float32, "cpu")
    frames = torch.arange(10.0).repeat(2, 1).reshape(1, 2, 10, 1, 1)
    win.write(0, frames[:, :, :3])
    assert torch.equal(win.read(0, 3), frames[:, :, :3])
    win.write(3, frames[:, :, 3:6])  # drops frames 0, 1
    assert (win.first, win.end) == (2, 6) and torch.equal(win.read(2, 6), frames[:, :, 2:6])
    win.write(6, frames[:, :, 6:10])  # a whole window at once
    assert torch.equal(win.read(6, 10), frames[:, :, 6:10])
    assert win.last(3)[0] == 7 and torch.equal(win.last(9)[1], frames[:, :, 6:10])
    with pytest.raises(RuntimeError, match="not held"):
        win.read(5, 7)
    with pytest.raises(RuntimeError, match="in order"):
        win.write(11, frames[:, :, :1])


@pytest.mark.parametrize("family,window", [("rolling-forcing", 7), ("reward-forcing", 4)])
def test_endless_runs_of_the_windowed_families_equal_a_longer_run(model, prompt, family, window):
    """Rolling Forcing's rolling window (P6, bidirectional) and Reward Forcing's EMA sink with slot RoPE
    positions, frame-wise with a small window so that 12 blocks evict many times."""
    from cascade_core.sampling.families import family_config

    cfg = family_config(family, frames_per_block=1, window=window, sink=1)
    k, longer = 12, 12 + 2 * cfg.parallel + 2
    stop = StopAfter(k)
    generate(model, PromptSchedule.single(prompt), cfg, blocks=0, width=W, height=H, seed=SEED, should_stop=stop,
             on_block=stop.on_block)
    finite = generate(model, PromptSchedule.single(prompt), cfg, blocks=longer, width=W, height=H, seed=SEED,
                      noise=their_noise(cfg, longer))
    assert torch.equal(torch.cat([x for _, x in stop.finished[:k]], 2), finite.latents[:, :, :k])
