"""What a sampler run hands on when Cancel stops it (nodes/outputs.py): a run of known length keeps the blocks
already final (their latents, their frames, an MP4 of them in ComfyUI's output folder), tells the widget where it
stopped, and lets the prompt end as a finished one does (stand-in comfy modules, tiny model, CPU). The oracle is
the same run left to finish: a block's latents do not depend on the blocks after it (block-causal), so the
stopped run's are the finished run's first blocks exactly."""
from __future__ import annotations

import os

import pytest
import torch
from test_nodes import NODES, H, Recorder, W, config, fast_state_events, mm, model, prompts, run  # noqa: F401
from test_nodes_endless import decoded_frames

from cascade_core.video.frames import video_frames

BLOCKS = 4
P1 = dict(parallel=1, attention="causal")  # one block in flight: blocks become final one by one


def run_cancelled_after(model, prompts, final_blocks: int):
    """Run BLOCKS blocks at P1 and press Cancel once, at the first state event with ``final_blocks`` blocks done.
    Returns (NodeOutput, Recorder)."""
    pressed = []

    def on_event(event, data):
        if event == "block_cascade.state" and data["done_blocks"] >= final_blocks and not pressed:
            pressed.append(data["tick"])
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    cls = NODES["BlockCascadeSampler"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "7"})
    with Recorder(on_event) as rec:
        out = cls.execute(model=model, config=config(**P1), width=W, height=H, blocks=BLOCKS, seed=3,
                          positive=prompts[0])
    assert pressed
    return out, rec


def test_cancel_keeps_the_final_blocks_their_frames_and_an_mp4_of_them(model, prompts):
    whole, whole_images = run("BlockCascadeSampler", model=model, config=config(**P1), width=W, height=H,
                              blocks=BLOCKS, seed=3, positive=prompts[0])
    out, rec = run_cancelled_after(model, prompts, 2)
    assert not mm.processing_interrupted()  # consumed: the nodes after the sampler run on what was made
    latent, images = out.args
    (_, done), = rec.events("done")
    assert done["stopped"] is True and "error" not in done and done["blocks"] == 2
    kept = latent["samples"].shape[2]
    assert kept == 2 * 3  # two chunk-wise blocks of 3 latent frames
    assert torch.equal(latent["samples"], whole["samples"][:, :, :kept])  # the finished run's first blocks
    assert images.shape[0] == video_frames(kept) == done["frames"]
    assert torch.equal(images, whole_images[:images.shape[0]])
    import folder_paths  # the stand-in's (test_nodes puts it first on the path)

    video = done["video"]
    assert out.ui == {"block_cascade_video": [video]}
    path = os.path.join(folder_paths.get_output_directory(), video["subfolder"], video["filename"])
    assert decoded_frames(path) == images.shape[0]  # finalised: every kept frame plays


def test_cancel_before_any_block_is_final_saves_nothing_and_interrupts(model, prompts):
    with pytest.raises(mm.InterruptProcessingException):
        run_cancelled_after(model, prompts, 0)
    assert not mm.processing_interrupted()


def test_after_a_stopped_run_comfyui_runs_the_node_again_rather_than_from_its_cache(model, prompts):
    """ComfyUI answers a node whose inputs and fingerprint are unchanged from its cache; the sampler's fingerprint
    changes when Cancel stops a run (its outputs are partial), not when a run finishes."""
    sampler = NODES["BlockCascadeSampler"]
    before = sampler.fingerprint_inputs()
    run("BlockCascadeSampler", model=model, config=config(**P1), width=W, height=H, blocks=BLOCKS, seed=3,
        positive=prompts[0])
    assert sampler.fingerprint_inputs() == before
    run_cancelled_after(model, prompts, 1)
    assert sampler.fingerprint_inputs() != before


def test_cancel_at_the_last_tick_hands_the_whole_video_on(model, prompts):
    """Cancel pressed as the run's last tick is done (too late to stop anything): the whole video is made, the
    interrupt is consumed (else ComfyUI would end the prompt before the next node and the run would be lost)."""
    whole, _ = run("BlockCascadeSampler", model=model, config=config(**P1), width=W, height=H, blocks=BLOCKS, seed=3,
                   positive=prompts[0])

    def on_event(event, data):
        if event == "block_cascade.state" and data["tick"] == data["ticks"] - 1:
            mm.interrupt_current_processing(True)

    with Recorder(on_event) as rec:
        latent, _ = run("BlockCascadeSampler", model=model, config=config(**P1), width=W, height=H, blocks=BLOCKS,
                        seed=3, positive=prompts[0])
    assert not mm.processing_interrupted()
    assert torch.equal(latent["samples"], whole["samples"]) and "error" not in rec.events("done")[0][1]
