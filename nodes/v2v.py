"""Block Cascade Video-to-Video: StreamDiffusionV2's video-to-video (the engine: cascade_core.sampling.v2v) on a
video (core VIDEO or an IMAGE batch), the browser's webcam or an MJPEG stream, streamed to the node's widget as
the chunks finish. Every check here (:func:`check`), before any model work; the run: :mod:`nodes.v2v_run`.
"""
from __future__ import annotations

import dataclasses
import math
import uuid

import torch
from comfy_api.latest import io

from cascade_core.common.constants import LATENT_CHANNELS
from cascade_core.sampling.v2v_config import NOISE_SCALE_MIN, SDV2_STEPS, V2VConfig, chunk_count, sdv2_steps
from cascade_core.video.live_sources import WEBCAM
from cascade_core.video.sources import check_image_batch

from . import checks, devices, steer, v2v_run
from .core_vae import vae_weights
from .sockets import CATEGORY, EngineModelType, ScheduleType

NODE_ID = "BlockCascadeVideoToVideo"
DISPLAY_NAME = "Block Cascade Video-to-Video"
LIVE_CHOICES = ("none", WEBCAM, "mjpeg")
MAX_CHUNKS = 1_000_000  # max_chunks' bound (a chunk is 4 frames: about 69 hours at 16 fps)
FIRST_CHUNK_FRAMES = 5  # video frames of chunk 0 (StreamDiffusionV2's first chunk; 4 a chunk after it)
NOISE_SCALE_STEP = 0.01
# the widget's lowest: the settings' own lowest (V2VConfig.validate checks it) rounded up to the widget's step
NOISE_SCALE_LOWEST = math.ceil(round(NOISE_SCALE_MIN / NOISE_SCALE_STEP, 6)) * NOISE_SCALE_STEP


class BlockCascadeVideoToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description="Restyles a video as StreamDiffusionV2 does (a StreamDiffusionV2 checkpoint): a video, an "
                        "IMAGE batch, the browser's webcam (the button on this node, while it runs) or an MJPEG "
                        "stream in, every 4 frames encoded, noised by the motion and denoised in 1-4 steps while "
                        "the next come in; frames appear on the node as chunks finish.",
            inputs=[
                EngineModelType.Input("model", tooltip="A StreamDiffusionV2 checkpoint (Load Causal Video Model), "
                                                       "e.g. wan_causal_dmd_v2v/model.pt."),
                io.Vae.Input("vae", tooltip="The Wan2.1 VAE (VAELoader, wan_2.1_vae.safetensors): it encodes the input "
                                            "chunk by chunk (one causal stream) and decodes the restyled frames."),
                io.Int.Input("width", default=832, min=checks.SIZE_MULTIPLE, max=checks.MAX_SIZE,
                             step=checks.SIZE_MULTIPLE, tooltip="Every input frame is resized to width x height "
                                                                "(stretched, as StreamDiffusionV2 reads videos)."),
                io.Int.Input("height", default=480, min=checks.SIZE_MULTIPLE, max=checks.MAX_SIZE,
                             step=checks.SIZE_MULTIPLE),
                io.Int.Input("steps", default=2, min=1, max=len(SDV2_STEPS),
                             tooltip="Denoising steps: the first N of 700, 500, 400, 200 (StreamDiffusionV2: 2 for "
                                     "1.3B, 1 for 14B). A later chunk starts at its own motion-adapted timestep."),
                io.Float.Input("noise_scale", default=0.7, min=NOISE_SCALE_LOWEST, max=1.0, step=NOISE_SCALE_STEP,
                               tooltip="How much of the first chunk is noise (more: further from the input); later "
                                       "chunks adapt it to the motion, down to 0.1 below it (so at least "
                                       f"{NOISE_SCALE_LOWEST:g}: a later chunk starts at timestep 1000 s - 100)."),
                io.Int.Input("parallel", default=1, min=1, max=len(SDV2_STEPS),
                             tooltip="Chunks denoised at once (Block Cascading), 1..steps: 1 is StreamDiffusionV2's "
                                     "own order, and so is 2 at 2 steps."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Combo.Input("live", options=list(LIVE_CHOICES), default="none",
                               tooltip="A live input instead of image/video: webcam (press the webcam button on "
                                       "this node once it runs) or mjpeg (the url). Runs until Cancel (or "
                                       "max_chunks), keeping the newest frames when the input is faster than the "
                                       "model; the whole stream is saved as an MP4."),
                io.String.Input("url", default="", tooltip="With live mjpeg: the http(s) URL of an MJPEG stream "
                                                           "(multipart/x-mixed-replace)."),
                io.Int.Input("max_chunks", default=0, min=0, max=MAX_CHUNKS,
                             tooltip="Chunks to make at most (5 frames, then 4 each); 0 = the whole input (a live "
                                     "one: until Cancel)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The style prompt (CLIPTextEncode with a wan CLIPLoader). Connect this "
                                              "or a schedule."),
                ScheduleType.Input("schedule", optional=True, tooltip="Prompts switching at chunks."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Steer while it runs: a core CLIP (type wan) that encodes prompts typed in "
                                      "the node's steer box (or POST /block_cascade/steer); each lands at the next "
                                      "chunk to enter."),
                io.Image.Input("image", optional=True, tooltip="The input frames as an IMAGE batch (at least 5)."),
                io.Video.Input("video", optional=True, tooltip="The input video (core Load Video; at least 5 "
                                                               "frames)."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE",
                                tooltip="The restyled frames: 5 for the first chunk, 4 for each after it (a live "
                                        "run: the latest chunks'; the whole stream is the MP4)."),
                io.Latent.Output(display_name="LATENT",
                                 tooltip="Their raw Wan2.1 latents [1, 16, chunks + 1, H/8, W/8] (core VAEDecode "
                                         "takes them)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, live="none", **inputs):
        """A live input runs again every time it is queued (what it reads is new); another runs again after a
        run that Cancel stopped (its outputs are what was made before Cancel)."""
        return uuid.uuid4().hex if live != "none" else v2v_run.stopped_runs()

    @classmethod
    def execute(cls, model, vae, width, height, steps, noise_scale, parallel, seed, live="none", url="",
                max_chunks=0, positive=None, schedule=None, clip=None, image=None, video=None) -> io.NodeOutput:
        run = check(model, vae, width, height, steps, noise_scale, parallel, live, url, max_chunks, positive,
                    schedule, clip, image, video)  # every check, before anything touches a GPU
        node_id = cls.hidden.unique_id if cls.hidden is not None and cls.hidden.unique_id is not None else ""
        return v2v_run.restyle(run, model, seed, clip, node_id)


@dataclasses.dataclass
class Checked:
    """What :func:`check` found: the settings, the device, the prompts, the input (``given``: an IMAGE batch
    [N, H, W, 3] in 0..1 (a VIDEO's frames too), "webcam" or an MJPEG URL; ``live``: the live kind or None;
    ``chunks``: the chunks to make, None for a live input until Cancel), the VAE's weights and the settings
    line. The output plays at 16 fps (StreamDiffusionV2's --fps default) whatever the input's rate."""
    cfg: V2VConfig
    device: torch.device
    prompts: object
    given: object
    live: str | None
    chunks: int | None
    width: int
    height: int
    vae_sd: tuple
    settings_text: str


def source_of(live, url, image, video):
    """(given, live kind or None, frames known or None) of the node's source inputs: exactly one of image, video,
    live. ValueError (one line) for none, several or a bad one."""
    if live not in LIVE_CHOICES:
        raise ValueError(f"live must be one of {', '.join(LIVE_CHOICES)}, got {live!r}")
    named = [n for n, on in (("image", image is not None), ("video", video is not None),
                             (f"live {live}", live != "none")) if on]
    if not named:
        raise ValueError("no video input: connect image (an IMAGE batch) or video (Load Video), or set live to "
                         "webcam or mjpeg")
    if len(named) > 1:
        raise ValueError(f"one video input at a time: {' and '.join(named)} are given; keep one")
    if live == WEBCAM:
        return WEBCAM, WEBCAM, None
    if live == "mjpeg":
        text = (url or "").strip()
        if not text.lower().startswith(("http://", "https://")) or len(text) < len("http://x"):
            raise ValueError(f"url: live mjpeg reads an http:// or https:// MJPEG stream URL, got {url!r}")
        return text, "mjpeg", None
    if video is not None:
        get = getattr(video, "get_components", None)
        if not callable(get):
            raise ValueError(f"video: expected a core VIDEO (Load Video), got {type(video).__name__}")
        image, what = getattr(get(), "images", None), "video"  # decoded once, here: the frames are the run's input
    else:
        what = "image"
    frames = check_image_batch(image, what)
    if frames.shape[0] < FIRST_CHUNK_FRAMES:
        raise ValueError(f"{what}: {frames.shape[0]} frames; the first chunk takes {FIRST_CHUNK_FRAMES} (then 4 "
                         f"a chunk)")
    return frames, None, int(frames.shape[0])


def check(model, vae, width, height, steps, noise_scale, parallel, live, url, max_chunks, positive, schedule, clip,
          image, video) -> Checked:
    """Every check of a video-to-video run (ValueError naming the input at fault), before any model work."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not callable(getattr(model, "acquire", None)):
        raise ValueError(f"model: expected a Block Cascade model (Load Causal Video Model), got "
                         f"{type(model).__name__}")
    if cfg.in_dim != LATENT_CHANNELS:
        raise ValueError(f"model: StreamDiffusionV2's video-to-video runs Wan2.1 models ({LATENT_CHANNELS} latent "
                         f"channels); this one takes {cfg.in_dim}")
    checks.video_size(width, height)
    checks.int_range("max_chunks", max_chunks, 0, MAX_CHUNKS, " (0 = the whole input; a live one until Cancel)")
    settings = V2VConfig(steps=sdv2_steps(steps), noise_scale=float(noise_scale), parallel=parallel)
    settings.validate()
    given, kind, frames = source_of(live, url, image, video)
    chunks = chunk_count(frames) if frames is not None else None
    if max_chunks:
        chunks = max_chunks if chunks is None else min(chunks, max_chunks)
    if positive is not None and schedule is not None:
        raise ValueError("connect either positive (one prompt) or schedule (Prompt Schedule), not both")
    if positive is None and schedule is None:
        raise ValueError("no prompt: connect positive (one prompt) or schedule (Prompt Schedule)")
    entries = ([(0, checks.conditioning_embeds(positive, "positive"))] if positive is not None
               else list(schedule.entries))
    prompts = checks.schedule(entries, chunks or 0, cfg.text_dim, schedule.blends if schedule is not None else ())
    steer.check(clip)
    if vae is None:
        raise ValueError("vae: connect the Wan2.1 VAE (VAELoader): it encodes the input frames and decodes the "
                         "restyled ones")
    vae_sd = vae_weights(vae)
    (device,) = devices.check("auto")
    what = {WEBCAM: "the webcam", "mjpeg": f"MJPEG {given}"}.get(kind, f"{frames} frames")
    length = f"{chunks} chunks" if chunks is not None else "until Cancel"
    settings_text = (f"streamdiffusionv2 video-to-video: steps {','.join(map(str, settings.steps))} (raw, shift "
                     f"{settings.shift:g}); noise scale {settings.noise_scale:g}, adapted to the motion after chunk 0; "
                     f"KV cache {settings.cache_frames} frames, sink {settings.sink}; P{settings.parallel}; input "
                     f"{what} at {width}x{height}, {length}")
    return Checked(settings, device, prompts, given, kind, chunks, int(width), int(height), vae_sd, settings_text)
