"""A context prefix (clean latent frames before block 0: a start image, or a video to continue).

The oracles are the loops of ``test_families`` (P1, the family's own order) and ``test_cascade_oracle``
(P>1, the documented tick rule), each of which writes the prefix frames' K/V itself by one forward at
t = context noise and positions 0..F-1, as a finished block of F frames would have them, then runs its
blocks at frame F: the engine's result after a prefix must equal a loop in which the prefix frames
are already-finished frames of the video.
"""
import pytest
import torch
from test_cascade import SEED as CASCADE_SEED
from test_cascade import cascade_oracle
from test_families import FOUR, SEED, H, W, embedding, family_loop

from cascade_core.distributed import WorkerPool
from cascade_core.sampling.context import CONTINUATION, prefix_config
from cascade_core.sampling.loop import CascadeConfig, Interrupted, PromptSchedule, generate

pytestmark = pytest.mark.usefixtures("one_thread")
P1_TOLERANCE = 1e-5  # the sink and the recent frames merged by log-sum-exp (see test_families)
CASCADE_TOLERANCE = 1e-4  # fused attention against one plain softmax, over steps and blocks (test_cascade_oracle)


def clean_latents(frames, seed=5):
    """Stand-in clean latents [1, 16, frames, H/8, W/8] (a VAE-encoded image or video in a real run)."""
    return torch.randn(1, 16, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def run(model, cfg, blocks, prefix, prompts=None, **kw):
    prompts = prompts or {0: embedding(1)}
    return generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=blocks, width=W, height=H,
                    seed=SEED, prefix=prefix, **kw)


class ForwardLog:
    """(frames, RoPE offsets) of every model forward while active."""

    def __init__(self, model):
        self.calls = []
        self.model = model

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(
            lambda _m, args: self.calls.append((args[0].shape[2], list(args[2]))))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


P1_CASES = {  # name: (prefix frames, frames per block, window, sink, context noise)
    "no window": (2, 3, None, 0, 0.0),
    "window, sink inside the prefix": (4, 3, 9, 3, 0.0),  # prefix frame 3 leaves the window at block 1
    "start image as the sink, context noise": (1, 3, 7, 1, 40.0),
    "frame-wise, sink longer than the prefix": (2, 1, 5, 3, 0.0),
    "a video longer than the window": (5, 1, 3, 1, 0.0),  # its one forward sees all 5 frames
}


@pytest.mark.parametrize("case", list(P1_CASES))
def test_p1_after_a_prefix_equals_the_family_loop(model, case):
    frames, fpb, window, sink, noise = P1_CASES[case]
    prefix = clean_latents(frames)
    blocks = 5
    expected, forwards = family_loop(model, {0: embedding(1)}, blocks, fpb, FOUR, True, 5.0, window=window,
                                     sink=sink, context_noise=noise, prefix=prefix)
    cfg = CascadeConfig(frames_per_block=fpb, window=window, sink=sink, context_noise=noise)
    res = run(model, cfg, blocks, prefix)
    assert res.latents.shape == expected.shape == (1, 16, frames + blocks * fpb, H // 8, W // 8)
    assert res.prefix_frames == frames and torch.equal(res.latents[:, :, :frames], prefix)
    if window is None:  # one run of keys, one attention call: bit-equal
        assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()
    else:
        assert (res.latents - expected).abs().max() <= P1_TOLERANCE
    assert res.forwards == forwards == -(-frames // fpb) + blocks * 5  # the prefix's blocks, then 4 steps + clean


@pytest.mark.parametrize("mode", ["none", "recache"])
def test_prompt_switches_after_a_prefix_equal_the_family_loop(model, mode):
    """A re-cache right after the prefix re-runs prefix frames (from the result's own latents); a later
    one runs past the sink, which the prefix holds."""
    prefix, prompts = clean_latents(4), {0: embedding(1), 1: embedding(2), 4: embedding(3)}
    expected, forwards = family_loop(model, prompts, 5, 3, FOUR, True, 5.0, window=9, sink=3,
                                     recache=mode == "recache", prefix=prefix)
    res = run(model, CascadeConfig(window=9, sink=3, switch_mode=mode), 5, prefix, prompts)
    assert (res.latents - expected).abs().max() <= P1_TOLERANCE
    assert res.forwards == forwards == 2 + 5 * 5 + (2 if mode == "recache" else 0)  # prefix blocks of 1 and 3


CASCADE_CASES = {  # name: (parallel, attention, flashblock, prefix frames, window, sink, first frame)
    "P3 causal reuse, window, sink in the prefix": (3, "causal", "reuse", 3, 6, 2, False),
    "P5 bidirectional, window, sink in the prefix": (5, "bidirectional", "off", 3, 6, 2, False),
    "P3 bidirectional, no window": (3, "bidirectional", "off", 2, None, 0, False),
    "P3 causal, first frame of its own after the image": (3, "causal", "off", 1, 5, 1, True),
    "P3 causal reuse, a video longer than the window": (3, "causal", "reuse", 7, 4, 1, False),
}


@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_cascade_after_a_prefix_equals_the_oracle(model, prompt, case):
    parallel, attention, flashblock, frames, window, sink, first_frame = CASCADE_CASES[case]
    prefix = clean_latents(frames)
    expected = cascade_oracle(model, prompt, parallel, attention, flashblock, window=window, sink=sink,
                              prefix=prefix, first_frame=first_frame, blocks=6)
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, attention=attention, flashblock=flashblock,
                        window=window, sink=sink, independent_first_frame=first_frame)
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=6, width=W, height=H, seed=CASCADE_SEED,
                   prefix=prefix)
    assert res.latents.shape == expected.shape
    assert (res.latents - expected).abs().max() <= CASCADE_TOLERANCE


def test_the_oracles_feel_the_prefix(model, prompt):
    """Another prefix (or none) moves both oracles far beyond the tolerance, so an engine that
    ignored the prefix's K/V could not pass."""
    one = cascade_oracle(model, prompt, 3, "causal", "off", window=6, sink=2, prefix=clean_latents(3, seed=1))
    two = cascade_oracle(model, prompt, 3, "causal", "off", window=6, sink=2, prefix=clean_latents(3, seed=2))
    assert (one[:, :, 3:] - two[:, :, 3:]).abs().max() > 100 * CASCADE_TOLERANCE
    with_prefix, _ = family_loop(model, {0: embedding(1)}, 3, 3, FOUR, True, 5.0, prefix=clean_latents(2))
    without, _ = family_loop(model, {0: embedding(1)}, 3, 3, FOUR, True, 5.0)
    assert (with_prefix[:, :, 2:] - without).abs().max() > 100 * P1_TOLERANCE


@pytest.mark.parametrize("parallel", [1, 3])
def test_the_prefix_is_written_once_before_block_0(model, parallel):
    """The prefix's frames go through the model once each, first, as blocks of the run's size (the
    remainder first) at their RoPE positions; every later forward starts at or after the prefix (no
    switches here); Result.forwards counts them."""
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, window=6, sink=2)
    plain = run(model, cfg, 4, None)
    with ForwardLog(model) as log:
        res = run(model, cfg, 4, clean_latents(5))
    assert log.calls[:3] == [(1, [0]), (2, [1]), (2, [3])]
    assert all(min(pos) >= 5 for _, pos in log.calls[3:])
    assert res.forwards == len(log.calls) == plain.forwards + 3


def test_the_prefix_left_out_and_block_events(model):
    prefix, cfg = clean_latents(2), CascadeConfig(frames_per_block=2, parallel=2)
    events = []
    kept = run(model, cfg, 3, prefix)
    left = run(model, cfg, 3, prefix, include_prefix=False, on_block=events.append)
    assert left.prefix_frames == 0 and torch.equal(left.latents, kept.latents[:, :, 2:])
    assert [e.block for e in events] == [0, 1, 2]
    for e in events:
        assert torch.equal(e.latents, left.latents[:, :, 2 * e.block:2 * e.block + 2])


GOOD = (1, 16, 2, H // 8, W // 8)
BAD_PREFIXES = {
    "channels": (torch.zeros(1, 4, 2, H // 8, W // 8), "clean latents \\[1, 16, F, 4, 8\\]"),
    "size": (torch.zeros(1, 16, 2, H // 8, 2 * W // 8), "clean latents \\[1, 16, F, 4, 8\\]"),
    "no frames": (torch.zeros(1, 16, 0, H // 8, W // 8), "F >= 1"),
    "4-D": (torch.zeros(16, 2, H // 8, W // 8), "clean latents"),
    "not a tensor": ([[0.0]], "got list"),
    "NaN": (torch.zeros(GOOD).index_fill_(2, torch.tensor([1]), float("nan")), "NaN or infinite"),
    "NaN in float8": (torch.full(GOOD, float("nan")).to(torch.float8_e4m3fn), "NaN or infinite"),
    "integers": (torch.zeros(GOOD, dtype=torch.int64), "real floating-point latents, got int64"),
    "complex": (torch.zeros(GOOD, dtype=torch.complex64), "real floating-point latents, got complex64"),
    "past the run's dtype": (torch.full(GOOD, 1e39, dtype=torch.float64), "overflow the run's float32"),
}
BAD_CONFIGS = {
    "rolling window": (CascadeConfig(window=9, sink=3, rolling_window=True), "rolling window"),
    "slot positions": (CascadeConfig(window=9, sink=3, rope_positions="slots"), "slot RoPE positions"),
    "EMA sink": (CascadeConfig(window=9, sink=3, sink_ema=0.5), "EMA sink"),
}


@pytest.mark.parametrize("case", list(BAD_PREFIXES) + list(BAD_CONFIGS))
def test_a_bad_prefix_is_refused_before_any_forward(model, case):
    prefix, cfg, message = (*BAD_PREFIXES[case][:1], CascadeConfig(), BAD_PREFIXES[case][1]) \
        if case in BAD_PREFIXES else (torch.zeros(GOOD), *BAD_CONFIGS[case])
    with ForwardLog(model) as log, pytest.raises(ValueError, match=message):
        run(model, cfg, 3, prefix)
    assert log.calls == []


def test_several_processes_after_a_prefix_equal_one(model):
    """Every rank gets the prefix from rank 0 and writes its K/V itself; P3 over two ranks with a window
    whose sink the prefix holds, and a prompt switch."""
    prefix, prompts = clean_latents(3), {0: embedding(1), 2: embedding(2)}
    cfg = CascadeConfig(frames_per_block=2, parallel=3, window=6, sink=2, flashblock="reuse")
    one = run(model, cfg, 5, prefix, prompts, block_offset=4)
    pool = WorkerPool(["cpu", "cpu"], threads=1, timeout=60)
    try:
        res = pool.generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=5, width=W, height=H,
                            seed=SEED, prefix=prefix, block_offset=4)
        left = pool.generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=5, width=W, height=H,
                             seed=SEED, prefix=prefix, include_prefix=False)
        with pytest.raises(Interrupted, match="stopped"):  # the ranks agree where, in the context or after
            pool.generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=5, width=W, height=H,
                          seed=SEED, prefix=prefix, should_stop=lambda: True)
        again = pool.generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=5, width=W, height=H,
                              seed=SEED, prefix=prefix, block_offset=4)
    finally:
        pool.close()
    assert res.prefix_frames == 3 and torch.equal(res.latents[:, :, :3], prefix)
    assert (res.latents - one.latents).abs().max() <= 1e-5
    assert res.forwards == one.forwards and torch.equal(again.latents, res.latents)
    assert left.prefix_frames == 0 and (left.latents - res.latents[:, :, 3:]).abs().max() > 1e-3  # offset 0


CHAIN_CASES = {  # name: (the long run's config, blocks of the first run)
    "no window": (CascadeConfig(frames_per_block=2), 2),
    "window and sink, the window full before the continuation": (CascadeConfig(frames_per_block=2, window=6, sink=2), 4),
    "independent first frame, block 0's own steps": (
        CascadeConfig(frames_per_block=2, independent_first_frame=True, steps=(1000, 500),
                      first_block_steps=(1000, 750, 500, 250), window=5, sink=1), 3),
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_a_continuation_equals_one_long_run(model, prompt, case):
    """The promise of the module docstring: a first run of N blocks, then a run after its whole video
    with the long run's remaining noise and block_offset N, gives the long run's latents (P1)."""
    cfg, n = CHAIN_CASES[case]
    m, schedule = 3, PromptSchedule.single(prompt)
    frames = cfg.grid.total(n + m)
    z = torch.randn(1, 16, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(21))
    long = generate(model, schedule, cfg, blocks=n + m, width=W, height=H, seed=SEED, noise=z)
    head = cfg.grid.total(n)
    first = generate(model, schedule, cfg, blocks=n, width=W, height=H, seed=SEED, noise=z[:, :, :head])
    then = prefix_config(cfg, CONTINUATION)[0]
    chain = generate(model, schedule, then, blocks=m, width=W, height=H, seed=SEED, noise=z[:, :, head:],
                     prefix=first.latents, block_offset=n)
    assert torch.equal(first.latents, long.latents[:, :, :head])
    assert chain.latents.shape == long.latents.shape
    assert (chain.latents - long.latents).abs().max() <= P1_TOLERANCE
    unnumbered = generate(model, schedule, then, blocks=m, width=W, height=H, seed=SEED, noise=z[:, :, head:],
                          prefix=first.latents)  # the re-noising noise of blocks 0.. instead of n..
    assert (unnumbered.latents - long.latents).abs().max() > 100 * P1_TOLERANCE


@pytest.mark.parametrize("offset", [-1, 1.5, True, "2", torch.tensor(3)])
def test_a_block_offset_that_is_no_int_from_0_is_refused(model, offset):
    with ForwardLog(model) as log, pytest.raises(ValueError, match="must be an int >= 0"):
        run(model, CascadeConfig(), 2, clean_latents(2), block_offset=offset)
    assert log.calls == []


def test_the_memory_estimate_counts_the_prefix_frames(model):
    """Without a window every prefix frame's K/V stays (2 x layers x tokens x dim x bytes per frame, plus
    its latents); with a window the K/V cache does not grow, the latents still do."""
    from cascade_core.sampling.memory import estimate_run_bytes
    from cascade_core.sampling.plan import plan_run
    c = model.cfg
    tpf = (H // 16) * (W // 16)

    def need(cfg, frames):
        return estimate_run_bytes(plan_run(cfg, blocks=4, width=W, height=H, prefix_frames=frames), c, torch.float32,
                                  1, 0)[0]

    per_frame_kv = 2 * c.num_layers * tpf * c.dim * 4
    grown = need(CascadeConfig(), 5) - need(CascadeConfig(), 0)
    assert grown >= 1.2 * 5 * per_frame_kv
    windowed = CascadeConfig(window=6, sink=2)
    assert 0 < need(windowed, 5) - need(windowed, 0) == pytest.approx(grown - 1.2 * 5 * per_frame_kv, abs=2)


def test_a_stop_is_heard_between_the_prefix_blocks(model):
    """Ctrl-C or Cancel while a long context is written: asked before each of its blocks."""
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) == 3

    with ForwardLog(model) as log, pytest.raises(Interrupted, match=r"writing the context \(its block 3 of 4\)"):
        run(model, CascadeConfig(frames_per_block=2), 2, clean_latents(8), should_stop=should_stop)
    assert len(log.calls) == 2
