"""What the widget is told (nodes/stream.py), beyond the frames themselves: a scheduled prompt switch is told as
a steered one is (a switch event when its block enters, so the timeline marks it), the first generated block's
frames carry the engine's time to that block (the log's "first block after", the widget's "first frame"), and
ComfyUI's own progress moves for an endless run too (stand-in comfy modules, tiny model, CPU)."""
from __future__ import annotations

import logging
import re

from test_nodes import (  # noqa: F401
    BLOCKS,
    H,
    Recorder,
    W,
    config,
    fast_state_events,
    mm,
    model,
    prompts,
    run,
)


def test_a_scheduled_switch_is_told_when_its_block_enters(model, prompts):
    (s0,) = run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=0)
    (s1,) = run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=2, previous=s0)
    with Recorder() as rec:
        run("BlockCascadeSampler", model=model, config=config(parallel=2, attention="causal"), width=W, height=H,
            blocks=BLOCKS, seed=1, schedule=s1)
    order = [(e, d) for e, d, _ in rec.server.sent if e in ("block_cascade.switch", "block_cascade.state")]
    switches = [d for e, d in order if e == "block_cascade.switch"]
    assert [(d["block"], d["text"]) for d in switches] == [(2, "scheduled prompt 2")]  # told once, block 0 not
    told = next(i for i, (e, _) in enumerate(order) if e == "block_cascade.switch")
    entered = next(i for i, (e, d) in enumerate(order) if e == "block_cascade.state" and any(b == 2 for b, _ in d["pairs"]))
    assert told < entered  # told at the tick block 2 enters, before that tick's state


def test_the_first_generated_blocks_frames_carry_the_logs_first_block_time(model, prompts, caplog):
    with caplog.at_level(logging.INFO, logger="block_cascade"), Recorder() as rec:
        run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=1,
            positive=prompts[0])
    frames = rec.events("frames")
    logged = float(re.search(r"first block after ([\d.]+) s", caplog.text).group(1))
    assert "first_block_s" in frames[0][1] and all("first_block_s" not in d for _, d in frames[1:])
    assert round(frames[0][1]["first_block_s"], 2) == logged


def test_comfyuis_progress_counts_an_endless_runs_blocks(model, prompts):

    seen = []

    def on_event(event, data):
        if event == "block_cascade.frames" and data["block"] >= 2:
            mm.interrupt_current_processing(True)

    with Recorder(on_event) as rec:
        run("BlockCascadeSampler", model=model, config=config(parallel=1, attention="causal", window=6, sink=3),
            width=W, height=H, blocks=0, seed=3, positive=prompts[0])
        seen = list(rec.progress)
    assert len(seen) >= 3
    assert all(value == done and total == done + 1 for done, (value, total, *_) in enumerate(seen, 1))
