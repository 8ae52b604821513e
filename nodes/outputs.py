"""What a sampler run hands on: LATENT and IMAGE for the nodes after it, and the MP4 it saved.

A run ends in one of three ways, and each hands on what it made:
- finished (a run of known length): every block's latents and frames;
- an endless run ended by Cancel (its normal end): the last window's latents and frames, and the MP4 its frames
  were written to as they streamed (:mod:`nodes.recording`);
- a run of known length stopped by Cancel: the latents and frames of the blocks already final (decoded before
  it ends), and an MP4 of those frames written into ComfyUI's output folder then.
Every MP4 plays at the frame rate of the run's latent space (:attr:`LatentSpace.fps`: Wan2.1 16, Wan2.2 24).
In both stopped cases ComfyUI's interrupt is consumed, so the prompt ends as a finished one does and the nodes
after the sampler run on what was made; the widget is told ``stopped`` with the MP4's name.
"""
from __future__ import annotations

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from cascade_core.common.latent_space import WAN21_LATENTS, LatentSpace

from . import recording

log = logging.getLogger("block_cascade")

SAVE_CHUNK = 16  # frames converted at a time when a stopped run's frames are saved (bounds the extra memory)
_stopped_runs = [0]  # runs ended by Cancel in this process (see stopped_runs)


def stopped_runs() -> int:
    """How many runs Cancel ended in this process: the sampler's ``fingerprint_inputs``, so that ComfyUI runs the
    node again after one instead of answering the same inputs with the stopped run's outputs from its cache."""
    return _stopped_runs[0]


def interrupted() -> bool:
    """Whether ComfyUI's Cancel (its interrupt flag) is up."""
    return bool(mm.processing_interrupted()) if hasattr(mm, "processing_interrupted") else False


def raise_interrupt() -> None:
    """End the prompt as interrupted: ComfyUI's own exception (its flag lowered)."""
    mm.throw_exception_if_processing_interrupted()  # lowers the flag and raises, when it is up
    raise mm.InterruptProcessingException()


def consume_interrupt() -> None:
    """Lower ComfyUI's interrupt flag: the prompt goes on past the sampler."""
    mm.interrupt_current_processing(False)


class Progress:
    """ComfyUI's progress bar of a run (``update_absolute``), which never ends the run itself: ComfyUI's progress
    hook raises its interrupt exception when Cancel is up (lowering the flag), which would end a run without
    keeping what it made. So no update is sent while Cancel is up, and if the hook raises anyway (Cancel pressed
    meanwhile) the flag is raised again: the run sees Cancel at its next tick and ends as a stopped run does."""

    def __init__(self, total: int, node_id: str | None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update_absolute(self, value: int, total: int) -> None:
        if interrupted():
            return
        try:
            self.bar.update_absolute(value, total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)


def latent_space(run) -> LatentSpace:
    """The run's latent space (its plan's: the model's; Wan2.1's for a run without a session), whose raw latents
    LATENT holds (core ComfyUI's layout of that VAE: [1, 16, T, H/8, W/8] Wan2.1, [1, 48, T, H/16, W/16] Wan2.2)."""
    plan = getattr(getattr(run, "session", None), "plan", None)
    return getattr(plan, "latent_space", WAN21_LATENTS)


def finished(run, result, reporter, before, context) -> io.NodeOutput:
    """LATENT (raw latents of the run's space, the given latents first) and IMAGE of a run that ended without an
    error; an endless run's last window and the recording of the whole stream."""
    endless = run.endless
    # Cancel ended the stream (its normal end), or came as a known-length run's last block was final (the whole
    # video is made): either way the outputs go on through the graph
    cancelled = interrupted()
    if cancelled:
        consume_interrupt()
    stopped = endless and cancelled
    _stopped_runs[0] += stopped
    raw = latent_space(run).to_raw(result.latents.float()).cpu()
    if before is not None and not endless:  # the given latents themselves, not a round trip
        raw = torch.cat([before.cpu(), raw], 2)
    reporter.finish()  # frames still being decoded
    images = reporter.images()
    if endless:  # LATENT is the last window (context frames in it included): IMAGE its frames
        shown_before = 0 if before is None else before.shape[2] - context.shape[2]  # given, not context
        n = raw.shape[2]
        images = images[-(4 * n - 3 if result.first_frame + shown_before == 0 else 4 * n):]
    # the run's wall time as the node saw it (a worker pool's own figure leaves out the rest)
    log.info("Block Cascade: %d blocks, %d frames in %.2f s (%d ticks, first block after %.2f s)",
             result.blocks, reporter.frame_count, reporter.elapsed(), result.ticks, result.first_block_seconds)
    reporter.done(stopped=stopped)
    if not endless:
        return io.NodeOutput({"samples": raw}, images)
    return io.NodeOutput({"samples": raw}, images, ui=reporter.recording.ui() if reporter.recording.count else None)


def stopped(run, final_latents: list[torch.Tensor], reporter, before) -> io.NodeOutput | None:
    """A run of known length stopped by Cancel: the blocks already final (``final_latents``, normalised [1, C, f,
    h, w] each, in block order) are decoded, their frames saved as an MP4 in ComfyUI's output folder, the widget
    told, the interrupt consumed; LATENT (the given latents first) and IMAGE of what was made, with the MP4 as the
    node's UI output. None when no block was final yet (nothing to hand on: the prompt stays interrupted)."""
    _stopped_runs[0] += 1
    reporter.finish()  # the final blocks' frames: decoded, sent, written into IMAGE
    log.info("Block Cascade: stopped by Cancel after %d of %d blocks", len(final_latents), reporter.blocks)
    if not final_latents:
        reporter.done(stopped=True)
        return None
    images = reporter.images()
    video = save_frames(images, latent_space(run).fps)
    reporter.done(stopped=True, video=video.file())
    raw = latent_space(run).to_raw(torch.cat(final_latents, 2).float()).cpu()
    if before is not None:
        raw = torch.cat([before.cpu(), raw], 2)
    consume_interrupt()
    return io.NodeOutput({"samples": raw}, images, ui=video.ui())


def save_frames(images: torch.Tensor, fps: int) -> recording.Recording:
    """Frames [F, H, W, 3] in 0..1 written to a finalised MP4 at the next free name in ComfyUI's output folder,
    playing at ``fps`` (the run's latent space's, :attr:`LatentSpace.fps`)."""
    video = recording.Recording(fps)
    try:
        for at in range(0, images.shape[0], SAVE_CHUNK):
            video.write_pixels((images[at:at + SAVE_CHUNK] * 255).round().to(torch.uint8), at)  # [n, H, W, 3]
    finally:
        video.close()
    return video
