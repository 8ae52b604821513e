"""An endless sampler run (blocks 0) in the node: it streams until Cancel, which ends it and keeps
everything: the fragmented MP4 in ComfyUI's output folder (named in the done event and the node's UI
output), the last window's latents and frames as outputs, ComfyUI's interrupt flag consumed so the
graph goes on (stand-in comfy modules, tiny model, CPU)."""
from __future__ import annotations

import os

import av
import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
import pytest
from test_nodes import (  # noqa: F401
    NODES,
    H,
    Recorder,
    W,
    config,
    fast_state_events,
    model,
    prompts,
    stream_mod,  # (the stand-in comfy modules first; fast_state_events clears Cancel per test)
)

from cascade_core.video.frames import video_frames

WINDOW = 6  # latent frames


def decoded_frames(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def run_until_cancel(model, prompts, blocks_before_cancel: int, **kw):
    """Run the sampler endlessly; press Cancel once, when ``blocks_before_cancel`` frames events came
    (not again for frames sent while the run ends). Returns (NodeOutput, the Recorder)."""
    pressed = []

    def on_event(event, data):
        if event == "block_cascade.frames" and data["block"] + 1 >= blocks_before_cancel and not pressed:
            pressed.append(data["block"])
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    cls = NODES["BlockCascadeSampler"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "7"})
    with Recorder(on_event) as rec:
        out = cls.execute(model=model, config=config(parallel=1, attention="causal", window=WINDOW, sink=3),
                          width=W, height=H, blocks=0, seed=3, positive=prompts[0], **kw)
    return out, rec


def test_cancel_ends_an_endless_run_keeping_its_video_and_last_window(model, prompts):
    out, rec = run_until_cancel(model, prompts, 4)
    assert not mm.processing_interrupted()  # consumed: the rest of the graph runs on the outputs
    (_, start), = rec.events("start")
    assert start["blocks"] == 0 and start["frames_total"] == 0
    assert all(d["ticks"] == 0 for _, d in rec.events("state"))
    (_, done), = rec.events("done")
    assert done["stopped"] is True and "error" not in done
    blocks = done["blocks"]
    assert blocks >= 4 and [d["block"] for _, d in rec.events("frames")] == list(range(blocks))
    # the MP4: every final block's frames, in the output folder under the name the UI gets
    video = done["video"]
    assert out.ui == {"block_cascade_video": [video]} and video["type"] == "output"
    path = os.path.join(folder_paths.get_output_directory(), video["subfolder"], video["filename"])
    assert decoded_frames(path) == done["frames"] == video_frames(3 * blocks)
    # the outputs: the last window's latents and its frames
    latent, images = out.args
    assert latent["samples"].shape == (1, 16, WINDOW, H // 8, W // 8)
    assert images.shape == (4 * WINDOW, H, W, 3)


def test_each_endless_run_gets_a_file_of_its_own(model, prompts):
    first, rec1 = run_until_cancel(model, prompts, 1)
    second, rec2 = run_until_cancel(model, prompts, 1)
    names = [r.events("done")[0][1]["video"]["filename"] for r in (rec1, rec2)]
    assert names[0] != names[1] and all(n.startswith("stream_") and n.endswith(".mp4") for n in names)


def test_an_error_in_an_endless_run_still_finalises_its_video(model, prompts, monkeypatch):
    sent = []

    def failing_block(self, ev):
        sent.append(ev.block)
        if len(sent) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(self, ev)

    real = stream_mod.Reporter.on_block
    monkeypatch.setattr(stream_mod.Reporter, "on_block", failing_block)
    with pytest.raises(RuntimeError, match="simulated"):
        run_until_cancel(model, prompts, 100)
    mm.interrupt_current_processing(False)
    folder = os.path.join(folder_paths.get_output_directory(), "block_cascade")
    newest = max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getmtime)
    assert decoded_frames(newest) == video_frames(3 * 2)  # the two blocks before the failure, playable


def test_cancel_before_the_first_block_is_final_interrupts_as_any_cancel(model, prompts):
    """Nothing was made: the prompt is interrupted (ComfyUI's own exception), no empty outputs go on."""
    cls = NODES["BlockCascadeSampler"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "7"})
    mm.interrupt_current_processing(True)
    with Recorder() as rec, pytest.raises(mm.InterruptProcessingException):
        cls.execute(model=model, config=config(parallel=1, attention="causal", window=WINDOW, sink=3),
                    width=W, height=H, blocks=0, seed=3, positive=prompts[0])
    (_, done), = rec.events("done")
    assert done["error"] == "interrupted" and "video" not in done and not mm.processing_interrupted()


def test_an_endless_run_after_a_start_image_outputs_its_last_window_and_that_windows_frames(model, prompts):
    """The start image's frame is frame 0 of the video: in LATENT while the last window still holds it,
    IMAGE always the frames of LATENT (the first latent frame gives 1 video frame, every other 4)."""
    from test_nodes_context import EncodingVAE, images

    seen = set()
    for cancel_after in (1, 4):  # soon: the image and a block or so; later: the window only
        out, rec = run_until_cancel(model, prompts, cancel_after, start_image=images(0, H, W), vae=EncodingVAE())
        latent, image = out.args
        made = 1 + 3 * rec.events("done")[0][1]["blocks"]  # latent frames of the video: the image's, then blocks'
        frames = min(made, WINDOW)
        assert latent["samples"].shape[2] == frames, cancel_after
        assert image.shape[0] == (video_frames(frames) if made <= WINDOW else 4 * frames), cancel_after
        seen.add(made <= WINDOW)
    assert seen == {True, False}  # both cases ran


def test_the_widget_is_told_whether_the_run_can_be_steered(model, prompts):
    _, rec = run_until_cancel(model, prompts, 1)
    assert rec.events("start")[0][1]["steerable"] is False


def test_an_endless_run_after_a_longer_prefix_outputs_the_frames_of_its_window_only(model, prompts):
    """A prefix of 4 latent frames of which the last 2 are the context: the widget shows all 4 first, but
    LATENT (context and blocks in the last window) and IMAGE (their frames, 4 each: none is frame 0 of
    the video) leave the earlier given frames out."""
    from test_nodes_context import EncodingVAE, _latent

    out, rec = run_until_cancel(model, prompts, 1, prefix=_latent(frames=4), context_frames=2, vae=EncodingVAE())
    latent, image = out.args
    frames = min(2 + 3 * rec.events("done")[0][1]["blocks"], WINDOW)
    assert latent["samples"].shape[2] == frames and image.shape[0] == 4 * frames


def test_the_reporter_holds_only_the_latest_frames_it_is_asked_to_keep():
    """An endless run's frames for the outputs stay bounded: the last keep_frames of every frame sent,
    in order (a run of known length keeps all of them)."""
    import torch

    from cascade_core.sampling.loop import BlockEvent
    from cascade_core.video.frames import LatentRGBDecoder

    z = torch.randn(1, 16, 15, 2, 4, generator=torch.Generator().manual_seed(4))
    held = {}
    for keep in (None, 17):
        r = stream_mod.Reporter("3", 0, 0, 5, 1, 64, 32, LatentRGBDecoder(), send=lambda e, d: None,
                                keep_frames=keep)
        r.start()
        for b in range(5):
            r.on_block(BlockEvent(b, z[:, :, 3 * b:3 * b + 3], b, 0.0))
        r.finish()
        held[keep] = r.images()
        r.done()
    assert held[None].shape[0] == video_frames(15) and held[17].shape[0] == 17
    assert torch.equal(held[17], held[None][-17:])
