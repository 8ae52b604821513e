"""The run of Block Cascade Video-to-Video (its checks: :mod:`nodes.v2v`): the source opened and registered for
the webcam route (:func:`nodes.live_input.run_source`), the VAE's streaming encoder and decoder, the model, the
engine (:func:`cascade_core.sampling.v2v.video_to_video`) streaming every chunk to the widget through the
sampler's :class:`nodes.stream.Reporter` (start, state, frames, done; steering as in the sampler), and the outputs.

How a run ends, and what it hands on (IMAGE: the restyled frames, 5 for chunk 0 and 4 a chunk after it; LATENT:
their raw Wan2.1 latents, ``normalized_to_raw`` of the engine's output, which StreamDiffusionV2 decodes as
normalised latents, wan_wrapper.py:143-151):
- the input ended (or max_chunks were made): every chunk; so too when a live input broke off (a lost
  connection, no data in time) after its first chunk came in: the chunks made are kept, the reason logged in one
  line (before that, the run fails with it);
- Cancel: the chunks already final (their frames decoded first), the interrupt consumed so the nodes after it
  run; nothing final yet: the prompt ends as interrupted;
- a live input (webcam, MJPEG) runs until Cancel (or max_chunks): its frames are recorded to an MP4 in
  ComfyUI's output folder as they come (:mod:`nodes.recording`), the outputs hold the latest KEEP_CHUNKS chunks.
The widget is told ``stopped`` (and the MP4) after Cancel, as for the sampler.
"""
from __future__ import annotations

import collections
import gc
import logging
import traceback
import uuid

import torch
from comfy_api.latest import io

from cascade_core.common.messages import first_line
from cascade_core.model import attention as attention_backends
from cascade_core.sampling.loop import Interrupted
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import taken_chunks
from cascade_core.video.frame_source import InputBrokeOff, to_pixels
from cascade_core.video.latents import normalized_to_raw

from . import devices, live_input, outputs, recording, steer, stream

log = logging.getLogger("block_cascade")

KEEP_CHUNKS = 64  # a live run's outputs: its latest chunks (256 frames, 16 s at 16 fps); the MP4 holds them all
VAE_BYTES_PER_PIXEL = 4 * 96 * 4 * 2  # the Wan2.1 VAE's activations per pixel of a frame (a rough bound: float32,
# 96 channels at full size, 4 frames of causal cache and input, two of them alive at once)
_stopped = [0]  # runs ended by Cancel in this process (the node's fingerprint)


def stopped_runs() -> int:
    """How many of this node's runs Cancel ended in this process (see BlockCascadeVideoToVideo.fingerprint_inputs)."""
    return _stopped[0]


def run_bytes(model_cfg, dtype: torch.dtype, width: int, height: int, parallel: int, cache_frames: int,
              vae_sd: tuple) -> int:
    """Bytes a run needs besides the DiT's weights (an estimate for ComfyUI's model management, which frees that
    much first): the KV cache (K and V of ``cache_frames`` latent frames per layer), one layer's activations of a
    forward of max(2, parallel) latent frames, the VAE's encoder and decoder weights (float32 at most) and their
    activations at the frame size."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = (height // 16) * (width // 16)  # one latent frame's tokens: 8 px a latent pixel, patch 2 x 2
    cache = 2 * model_cfg.num_layers * cache_frames * tokens * model_cfg.dim * elem
    forward = max(2, parallel) * tokens * (model_cfg.ffn_dim + 8 * model_cfg.dim) * elem
    weights = sum(t.numel() for t in vae_sd[0].values()) * 4
    return cache + forward + weights + VAE_BYTES_PER_PIXEL * width * height


def _chunks(source, encoder, dtype: torch.dtype):
    """The engine's chunks from ``source``'s frames (to_pixels in the run's dtype, encoded chunk by chunk); Cancel
    while frames are awaited ends the run as a stop (Interrupted), not as the end of the input. A live input that
    broke off (:class:`InputBrokeOff`) ends the input once a chunk came in (logged), else it goes through."""
    came = [0]  # chunks taken from the source

    def take(n: int):
        try:
            frames = source.take(n, should_stop=outputs.interrupted)
        except InputBrokeOff as exc:
            if not came[0]:
                raise
            log.warning("Block Cascade: the input ended after %d chunks: %s", came[0], first_line(exc))
            return None
        if frames is not None:
            came[0] += 1
        if frames is None and outputs.interrupted():
            raise Interrupted("stopped while waiting for input frames")
        return None if frames is None else to_pixels(frames, dtype)

    return taken_chunks(take, encoder)


def restyle(run, model, seed: int, clip, node_id: str) -> io.NodeOutput:
    """Run a checked video-to-video (:func:`nodes.v2v.check`) streamed to the widget; its outputs (see the module
    docstring). Every reference to the run's device tensors is dropped at the end, whatever happened."""
    from cascade_core.video.vae import WanVAEDecoder
    from cascade_core.video.vae_encode import StreamEncoder, encoder_from_state_dict

    device, cfg, live = run.device, run.cfg, run.live is not None
    attention_backends.set_backend("auto")
    progress = outputs.Progress(run.chunks or 1, node_id or None)
    reporter = wan = encoder = decoder = steering = None
    kept = collections.deque(maxlen=KEEP_CHUNKS if live else None)  # final chunks' latents, in order
    first_kept = [True]  # whether chunk 0 is still among them (its 5 frames)
    ended_well = False
    run_id = uuid.uuid4().hex[:12]  # the widget events' run: the webcam route takes frames for it from now on
    try:
        with live_input.run_source(node_id, run_id, run.given, run.width, run.height) as source:
            sd, vae_dtype = run.vae_sd
            coder_dtype = torch.float32 if device.type == "cpu" else vae_dtype
            need = run_bytes(model.cfg, model.dtype, run.width, run.height, cfg.parallel, cfg.cache_frames, run.vae_sd)
            devices.make_room(device, need + (0 if model.resident_on(device) else model.weight_bytes()))
            encoder = StreamEncoder(encoder_from_state_dict(sd, dtype=coder_dtype, device=device, source="vae"))
            decoder = WanVAEDecoder.from_state_dict(sd, dtype=coder_dtype, device=device, source="vae")
            wan = model.acquire(device, need)
            reporter = stream.Reporter(
                node_id, run.chunks or 0, 0 if run.chunks is None else run.chunks + 1, len(cfg.steps), cfg.parallel,
                run.width, run.height, decoder, progress=progress, settings=run.settings_text, clean_pass=False,
                keep_frames=4 * KEEP_CHUNKS + 1 if live else None,
                recording=recording.Recording(stream.fps_of(decoder)) if live else None, steerable=clip is not None,
                scheduled=tuple(b for b, _ in run.prompts.entries if b > 0), live_input=run.live, run=run_id)
            log.info("Block Cascade: %s", run.settings_text)
            steering = steer.Running(node_id, run.chunks or 0, clip, model.cfg.text_dim, reporter.switch)
            steer.register(steering)  # before the start event: a prompt steered as the widget shows the run lands
            reporter.start()
            extra = {"steer": steering.steer, "on_switch": steering.on_switch} if clip is not None else {}

            def on_chunk(event):
                if live and len(kept) == kept.maxlen:
                    first_kept[0] = False
                kept.append(event.latents)  # no copy: the engine does not write a final chunk again
                reporter.on_block(event)

            result = video_to_video(wan, run.prompts, cfg, _chunks(source, encoder, wan.dtype), seed=seed,
                                    chunks=run.chunks, on_chunk=on_chunk, on_tick=reporter.on_tick,
                                    should_stop=outputs.interrupted, keep=False, **extra)
            log.info("Block Cascade: %d chunks, %d frames in %.2f s (%d ticks, first chunk after %.2f s)",
                     result.chunks, reporter.frame_count, reporter.elapsed(), result.ticks, result.first_chunk_seconds)
            stopped = outputs.interrupted()  # Cancel ended a live input (its normal end) or came with the last chunk
            out = _outputs(kept, first_kept[0], reporter, stopped)
            ended_well = True
            return out
    except Interrupted as exc:
        traceback.clear_frames(exc.__traceback__)  # the engine's frames hold the KV cache
        if reporter is not None:
            out = _outputs(kept, first_kept[0], reporter, True)
            if out is not None:
                return out
        outputs.raise_interrupt()
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        if reporter is not None:
            reporter.failed(exc)
        raise
    finally:
        steer.unregister(steering)
        kept.clear()
        del wan, encoder, decoder, steering
        if reporter is not None:
            reporter.frames, reporter.decoding, reporter.video = [], None, None
        if not ended_well:
            gc.collect()
            devices.empty_cache()


def _outputs(kept, with_first: bool, reporter, stopped: bool) -> io.NodeOutput | None:
    """IMAGE and LATENT of the chunks in ``kept`` (normalised [1, 16, f, h, w] each; ``with_first``: chunk 0 is
    among them) once their frames are decoded; the widget told ``done`` (``stopped`` after Cancel, with the MP4:
    a live run's recording, else the frames so far saved now). None when Cancel came before any chunk was final
    (the widget is told; nothing to hand on)."""
    if stopped:
        _stopped[0] += 1
        outputs.consume_interrupt()
    reporter.finish()  # the final chunks' frames: decoded, sent, kept
    if not kept:
        reporter.done(stopped=stopped)
        return None
    frames = 4 * len(kept) + (1 if with_first else 0)
    images = reporter.images()[-frames:]
    raw = normalized_to_raw(torch.cat(list(kept), 2).float()).cpu()
    saved, ui = None, None
    if reporter.recording is not None:  # a live run: its recording (closed and named by done)
        ui = reporter.recording
    elif stopped:
        saved = outputs.save_frames(images, reporter.fps)
        ui = saved
    reporter.done(stopped=stopped, video=None if saved is None else saved.file())
    return io.NodeOutput(images, {"samples": raw}, ui=ui.ui() if ui is not None and ui.count else None)
