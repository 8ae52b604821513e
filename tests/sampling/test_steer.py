"""Steering: prompt switches that arrive while a run goes on equal the same switches scheduled up front
(tiny random model of the real architecture, CPU, fp32, one thread)."""
import pytest
import torch
from conftest import TINY, counted

from cascade_core.sampling.loop import CascadeConfig, Partition, PromptSchedule, SwitchEvent, generate

W, H = 64, 32
BLOCKS = 5


def embeds(seed: int, length: int = 7) -> torch.Tensor:
    return torch.randn(length, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


class Steerer:
    """A steer callable: returns ``items`` at its ``at``-th call (0-based), nothing otherwise; records
    the SwitchEvents it is told about."""

    def __init__(self, at: int, items):
        self.at, self.items, self.calls, self.events = at, items, 0, []

    def __call__(self):
        self.calls += 1
        return list(self.items) if self.calls - 1 == self.at else []

    def on_switch(self, ev: SwitchEvent) -> None:
        self.events.append(ev)


def first_entry_at_or_after(cfg, tick: int) -> int:
    """The first block whose first step (stage 0) is in tick ``tick`` or later, read off a plain
    listing of the tick plan's pairs."""
    from cascade_core.sampling.schedule import CascadeSchedule

    plan = CascadeSchedule(BLOCKS, len(cfg.steps), cfg.parallel)
    return min(b for t in plan.ticks()[tick:] for b, s in t.pairs if s == 0)


CASES = [(1, "none", 3), (1, "none", 7), (3, "none", 4), (5, "none", 2), (5, "none", 4), (1, "recache", 6),
         (1, "recache", 11)]


@pytest.mark.parametrize("parallel,mode,tick", CASES)
def test_a_steered_switch_equals_the_same_switch_scheduled_at_its_block(model, prompt, one_thread, parallel, mode,
                                                                       tick):
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, switch_mode=mode)
    new = embeds(4)
    plain, n_plain = counted(model, lambda: generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS,
                                                     width=W, height=H, seed=2))
    steer = Steerer(tick, [(None, new)])
    steered, n_steered = counted(model, lambda: generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS,
                                                         width=W, height=H, seed=2, steer=steer,
                                                         on_switch=steer.on_switch))
    assert steer.calls == steered.ticks  # asked once before every tick
    [ev] = steer.events
    assert (ev.index, ev.requested, ev.dropped) == (0, None, "")
    assert ev.block == first_entry_at_or_after(cfg, tick) > 0
    scheduled, n_scheduled = counted(model, lambda: generate(
        model, PromptSchedule([(0, prompt), (ev.block, new)]), cfg, blocks=BLOCKS, width=W, height=H, seed=2))
    assert torch.equal(steered.latents, scheduled.latents)
    assert not torch.equal(steered.latents, plain.latents)
    extra = 1 if mode == "recache" else 0  # one re-cache forward per landed switch, none without
    assert n_steered == steered.forwards == n_scheduled == scheduled.forwards == n_plain + extra


@pytest.mark.parametrize("with_prefix", [False, True])
def test_a_switch_before_the_first_tick_replaces_the_first_prompt(model, prompt, one_thread, with_prefix):
    cfg = CascadeConfig(frames_per_block=2, parallel=3)
    prefix = torch.randn(1, 16, 2, H // 8, W // 8, generator=torch.Generator().manual_seed(8)) if with_prefix else None
    new = embeds(5)
    steer = Steerer(0, [(None, new)])
    steered = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=1,
                       prefix=prefix, steer=steer, on_switch=steer.on_switch)
    assert [(e.block, e.tick) for e in steer.events] == [(0, 0)]
    scheduled = generate(model, PromptSchedule.single(new), cfg, blocks=BLOCKS, width=W, height=H, seed=1,
                         prefix=prefix)
    assert torch.equal(steered.latents, scheduled.latents)


def test_a_switch_for_a_later_block_is_held_until_that_block_enters(model, prompt, one_thread):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    a, b = embeds(6), embeds(7)
    # at tick 1: a for block 4 (held), then b at once (lands at the next block to enter, before 4)
    steer = Steerer(1, [(4, a), (None, b)])
    steered = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=3,
                       steer=steer, on_switch=steer.on_switch)
    now = first_entry_at_or_after(cfg, 1)
    assert now < 4
    from cascade_core.sampling.schedule import CascadeSchedule
    entry4 = next(t.index for t in CascadeSchedule(BLOCKS, 4, 2).ticks() if (4, 0) in t.pairs)
    assert sorted((e.index, e.block, e.requested, e.tick) for e in steer.events) == \
        [(0, 4, 4, entry4), (1, now, None, next(t.index for t in CascadeSchedule(BLOCKS, 4, 2).ticks()
                                                 if (now, 0) in t.pairs))]
    scheduled = generate(model, PromptSchedule([(0, prompt), (now, b), (4, a)]), cfg, blocks=BLOCKS, width=W,
                         height=H, seed=3)
    assert torch.equal(steered.latents, scheduled.latents)


def test_switches_that_cannot_land_are_dropped_with_the_reason(model, prompt, one_thread):
    cfg = CascadeConfig(frames_per_block=2, parallel=5)
    plain = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=2)
    late = Steerer(plain.ticks - 1, [(None, embeds(4))])  # the last tick: every block has entered
    beyond = Steerer(2, [(BLOCKS, embeds(4))])
    for steer, why in ((late, "every block has entered"), (beyond, f"block {BLOCKS} is beyond the video")):
        out = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=2,
                       steer=steer, on_switch=steer.on_switch)
        [ev] = steer.events
        assert ev.block is None and why in ev.dropped
        assert torch.equal(out.latents, plain.latents)


def test_bad_steered_switches_and_several_processes_are_refused(model, prompt):
    cfg = CascadeConfig(frames_per_block=2)
    run = dict(blocks=BLOCKS, width=W, height=H, seed=2)
    with pytest.raises(ValueError, match="must be an int >= 0 or None"):
        generate(model, PromptSchedule.single(prompt), cfg, steer=Steerer(0, [(-1, embeds(4))]), **run)
    with pytest.raises(ValueError, match="steered prompt 0 has width 768"):
        generate(model, PromptSchedule.single(prompt), cfg, steer=Steerer(0, [(None, torch.zeros(3, 768))]), **run)

    class Elsewhere(Partition):
        def owns(self, block):
            return False

    def no_model_work(*a, **k):
        raise AssertionError("the model ran")

    model.encode_prompt = no_model_work
    try:
        with pytest.raises(ValueError, match="runs on one device for now"):
            generate(model, PromptSchedule.single(prompt), cfg, partition=Elsewhere(), steer=lambda: [], **run)
        with pytest.raises(ValueError, match="steering .* needs parallel 1"):
            generate(model, PromptSchedule.single(prompt), CascadeConfig(frames_per_block=2, parallel=3,
                                                                         switch_mode="recache"),
                     steer=lambda: [], **run)
    finally:
        del model.encode_prompt
