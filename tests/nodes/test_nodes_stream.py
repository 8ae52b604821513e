"""What the widget is told (nodes/stream.py), beyond the frames themselves: a scheduled prompt switch is told as
a steered one is (a switch event when its block enters, so the timeline marks it), the first generated block's
frames carry the engine's time to that block (the log's "first block after", the widget's "first frame"), and
ComfyUI's own progress moves for an endless run too, and the video plays at its latent space's frame rate (Wan2.1 16
fps, Wan2.2 24: the widget's META, the recording, a stopped run's MP4) (stand-in comfy modules, tiny model, CPU)."""
from __future__ import annotations

import logging
import os
import re
import sys

import av
import pytest
import torch
from test_nodes import (  # noqa: F401
    BLOCKS,
    PKG,
    H,
    Recorder,
    W,
    config,
    fast_state_events,
    mm,
    model,
    prompts,
    run,
    stream_mod,
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


@pytest.mark.parametrize("space", ["Wan2.1", "Wan2.2"])
def test_the_video_plays_at_its_latent_spaces_frame_rate(space):
    """META's fps (the widget's and the MJPEG feed's pace), a recording made at the latent space's rate and a stopped
    run's MP4 play at the rate of the run's latent space: what its decoder decodes (the no-VAE preview's included)."""
    import folder_paths  # the stand-in's (test_nodes puts it first)

    from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS
    from cascade_core.sampling.loop import BlockEvent

    recording = sys.modules[f"{PKG}.nodes.recording"]
    outputs = sys.modules[f"{PKG}.nodes.outputs"]
    latents, fps = {"Wan2.1": (WAN21_LATENTS, 16), "Wan2.2": (WAN22_LATENTS, 24)}[space]
    sent = []
    r = stream_mod.Reporter("3", 2, 6, 5, 1, 64, 32, stream_mod.preview_decoder(latents),
                            send=lambda e, d: sent.append((e, d)), recording=recording.Recording(latents.fps))
    r.start()
    z = torch.randn(1, latents.channels, 6, 32 // latents.spatial, 64 // latents.spatial)
    for b in range(2):
        r.on_block(BlockEvent(b, z[:, :, 3 * b:3 * b + 3], b, 0.0))
    r.finish()
    saved = outputs.save_frames(r.images(), r.fps)  # what a run of known length stopped by Cancel writes
    r.done()
    assert {d["fps"] for e, d in sent if e != "block_cascade.done"} == {fps}
    out = folder_paths.get_output_directory()
    for video in (r.recording.file(), saved.file()):
        with av.open(os.path.join(out, video["subfolder"], video["filename"])) as container:
            assert container.streams.video[0].average_rate == fps
