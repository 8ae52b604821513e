"""Smooth prompt transitions (blend_blocks): a switch that blends the old and the new embeddings over N
blocks equals the same run with a hard switch at every one of those blocks to the blend this test
computes itself (zero-padded umt5 embeddings, weight (k + 1)/(N + 1) at the switch's k-th block, from what
the block before the switch took); N = 0 is bit-equal to the hard switch, scheduled or steered; bad N is
refused in one line before model work (tiny random model of the real architecture, CPU, fp32, one thread).
"""
import itertools

import pytest
import torch
from conftest import TINY, counted
from test_steer import Steerer, embeds

from cascade_core.sampling.blend import MAX_BLEND_BLOCKS
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

pytestmark = pytest.mark.usefixtures("one_thread")
W, H, BLOCKS, SEED = 64, 32, 6, 5
RUN = dict(blocks=BLOCKS, width=W, height=H, seed=SEED)
# the test's blend (float64) and the engine's torch.lerp (float32) round differently: 1e-7 of the embeddings
TOLERANCE = 1e-5


def pad(e: torch.Tensor) -> torch.Tensor:
    return torch.cat([e.double(), torch.zeros(TINY.text_len - e.shape[0], e.shape[1], dtype=torch.float64)])


def per_block(first: torch.Tensor, switches: list, blocks: int = BLOCKS) -> PromptSchedule:
    """The hard-switch schedule giving every block the embedding of the blend rule: ``switches`` are
    (block, embeddings, N); block s + k (k < N) takes pad(previous) + (k + 1)/(N + 1) * (pad(new) -
    pad(previous)), where previous is what block s - 1 took."""
    took = [first.double()]
    starts = {s: (e, n) for s, e, n in switches}
    for b in range(1, blocks):
        s = max([0] + [s for s in starts if s <= b])
        if not s:
            took.append(took[-1])
            continue
        e, n = starts[s]
        k = b - s
        before = took[s - 1]
        took.append(e.double() if k >= n else pad(before) + (k + 1) / (n + 1) * (pad(e) - pad(before)))
    entries = [(0, first)] + [(b, t.float()) for b, t in enumerate(took) if b and not torch.equal(t, took[b - 1])]
    return PromptSchedule(entries)


CASES = [(1, "none", 2, 2), (3, "none", 1, 3), (5, "none", 2, 1), (1, "recache", 2, 2), (4, "none", 3, 8)]


@pytest.mark.parametrize("parallel,mode,at,n", CASES)
def test_a_blended_switch_equals_hard_switches_to_the_tests_own_blends(model, prompt, parallel, mode, at, n):
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, switch_mode=mode)
    new = embeds(4, length=9)  # another length than the first prompt's: the blend pads both
    blended, n_blended = counted(model, lambda: generate(model, PromptSchedule([(0, prompt), (at, new)], {at: n}),
                                                         cfg, **RUN))
    expected = per_block(prompt, [(at, new, n)])
    assert len(expected.entries) == 1 + min(n + 1, BLOCKS - at)  # a blend that runs past the video is cut
    oracle, n_oracle = counted(model, lambda: generate(model, expected, cfg, **RUN))
    torch.testing.assert_close(blended.latents, oracle.latents, rtol=0, atol=TOLERANCE)
    hard = generate(model, PromptSchedule([(0, prompt), (at, new)]), cfg, **RUN)
    assert (hard.latents - blended.latents).abs().max() > 100 * TOLERANCE  # the blend is seen
    # a re-cache before every block whose conditioning changes: the switch's block and its blend's
    assert n_blended == blended.forwards == n_oracle == oracle.forwards


def test_a_switch_during_a_blend_blends_from_where_that_one_got_to(model, prompt):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    a, b = embeds(6), embeds(7, length=3)
    sched = PromptSchedule([(0, prompt), (1, a), (3, b)], {1: 4, 3: 1})  # a's blend is cut at block 3
    expected = per_block(prompt, [(1, a, 4), (3, b, 1)])
    torch.testing.assert_close(generate(model, sched, cfg, **RUN).latents, generate(model, expected, cfg, **RUN).latents,
                               rtol=0, atol=TOLERANCE)


def test_n_zero_is_bit_equal_to_the_hard_switch_scheduled_and_steered(model, prompt):
    cfg = CascadeConfig(frames_per_block=2, parallel=3)
    new = embeds(4)
    hard = generate(model, PromptSchedule([(0, prompt), (2, new)]), cfg, **RUN)
    zero = generate(model, PromptSchedule([(0, prompt), (2, new)], {2: 0}), cfg, **RUN)
    assert torch.equal(zero.latents, hard.latents)
    for items in ([(None, new)], [(None, new, 0)]):
        steer = Steerer(2, items)
        out = generate(model, PromptSchedule.single(prompt), cfg, steer=steer, on_switch=steer.on_switch, **RUN)
        [ev] = steer.events
        assert ev.blend_blocks == 0 and ev.block > 0
        assert torch.equal(out.latents, generate(model, PromptSchedule([(0, prompt), (ev.block, new)]), cfg,
                                                 **RUN).latents)


@pytest.mark.parametrize("parallel,mode", [(3, "none"), (1, "recache")])
def test_a_steered_blended_switch_equals_the_same_switch_scheduled(model, prompt, parallel, mode):
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, switch_mode=mode)
    a, b = embeds(6), embeds(7)
    # at tick 1: a for block 4 blending over 1 (held), b blending over 2 at the next block to enter
    steer = Steerer(1, [(4, a, 1), (None, b, 2)])
    steered, n_steered = counted(model, lambda: generate(model, PromptSchedule.single(prompt), cfg, steer=steer,
                                                         on_switch=steer.on_switch, **RUN))
    landed = {e.block: e.blend_blocks for e in steer.events}
    now = min(landed)
    assert landed == {now: 2, 4: 1} and now < 4
    sched = PromptSchedule([(0, prompt), (now, b), (4, a)], {now: 2, 4: 1})
    scheduled, n_scheduled = counted(model, lambda: generate(model, sched, cfg, **RUN))
    assert torch.equal(steered.latents, scheduled.latents)
    assert n_steered == n_scheduled


def test_a_blend_before_the_first_tick_is_dropped_there_is_nothing_to_blend_from(model, prompt):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    new = embeds(5)
    steer = Steerer(0, [(None, new, 3)])
    out = generate(model, PromptSchedule.single(prompt), cfg, steer=steer, on_switch=steer.on_switch, **RUN)
    assert [(e.block, e.blend_blocks) for e in steer.events] == [(0, 0)]
    assert torch.equal(out.latents, generate(model, PromptSchedule.single(new), cfg, **RUN).latents)


@pytest.mark.parametrize("blend,words", [
    ({2: -1}, "blend_blocks must be an int in 0..64"), ({2: MAX_BLEND_BLOCKS + 1}, "got 65"),
    ({2: 1.5}, "got 1.5"), ({2: True}, "got True"),
    ({0: 2}, "takes the first prompt: it has nothing to blend from"), ({3: 2}, "holds no prompt switch"),
])
def test_bad_blends_are_refused_in_one_line_before_model_work(model, prompt, blend, words):
    def no_model_work(*a, **k):
        raise AssertionError("the model ran")

    model.encode_prompt = no_model_work
    try:
        with pytest.raises(ValueError, match=words) as info:
            generate(model, PromptSchedule([(0, prompt), (2, embeds(4))], blend), CascadeConfig(frames_per_block=2),
                     **RUN)
        assert "\n" not in str(info.value)
    finally:
        del model.encode_prompt
    steer = Steerer(0, [(None, embeds(4), -2)])
    with pytest.raises(ValueError, match="steered prompt 0: blend_blocks must be an int in 0..64"):
        generate(model, PromptSchedule.single(prompt), CascadeConfig(frames_per_block=2), steer=steer, **RUN)


def test_an_endless_stream_blending_every_switch_keeps_its_prompt_tables_bounded(model, prompt):
    """The prompts, blends and blended K/V kept stay bounded by the blocks in flight and the switches
    pending, however long the stream runs."""
    cfg = CascadeConfig(frames_per_block=1, steps=(1000, 500), parallel=3, window=3, sink=1)
    calls, sizes, texts = itertools.count(), [], [embeds(s) for s in range(3)]
    tables = {}

    def steer():  # every 4th tick a new prompt blending over 5 blocks: blends are cut and overlap
        n = next(calls)
        return [(None, texts[n % 3], 5)] if n % 4 == 0 else []

    def on_block(ev):
        live = tables["live"]
        sizes.append(sum(map(len, (live._starts, live._text, live._embeds, live._blend, live._from, live._mixed))))

    from cascade_core.sampling import steer as steer_mod
    real = steer_mod.LivePrompts.__init__

    def keep(self, *a, **k):
        real(self, *a, **k)
        tables["live"] = self

    steer_mod.LivePrompts.__init__ = keep
    try:
        generate(model, PromptSchedule.single(prompt), cfg, blocks=0, width=W, height=H, seed=SEED, steer=steer,
                 on_block=on_block, should_stop=lambda: len(sizes) >= 60)
    finally:
        steer_mod.LivePrompts.__init__ = real
    assert max(sizes[30:]) <= max(sizes[:30]) <= 16, sizes


def test_a_process_that_asks_only_for_later_blocks_of_a_blend_gets_the_same_blend(model, prompt):
    """Several processes: one that computes none of a blend's first blocks still blends from what the
    block before the switch took, after the prompts before it are forgotten."""
    from cascade_core.sampling.schedule import CascadeSchedule
    from cascade_core.sampling.steer import LivePrompts

    a, b = embeds(6), embeds(7)
    sched = PromptSchedule([(0, prompt), (1, a), (3, b)], {1: 3, 3: 4})
    live = LivePrompts(model, sched, CascadeSchedule(8, 4, 1), recache=False)
    live.forget_before(4)  # blocks 0..3 entered elsewhere; block 1's prompt (what block 2 took) is gone
    expected = dict(per_block(prompt, [(1, a, 3), (3, b, 4)], blocks=8).entries)
    torch.testing.assert_close(live.embedding(5), expected[5].double().float(), rtol=0, atol=1e-6)
