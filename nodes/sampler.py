"""Block Cascade Sampler: checks everything, then streams a video block by block."""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import traceback

import torch
from comfy_api.latest import io

from cascade_core.common.constants import GIB
from cascade_core.model import attention as attention_backends
from cascade_core.model.compiling import resolve_compile, use_disk_cache
from cascade_core.sampling.context import CONTINUATION, START_IMAGE, context_notes, context_of, prefix_config
from cascade_core.sampling.families import DEFAULT_FAMILY, check_family_model, default_family, get_family, model_words
from cascade_core.sampling.loop import Interrupted
from cascade_core.sampling.memory import blocks_to_swap, cheaper_settings, placement_words
from cascade_core.sampling.plan import SteeringRefused
from cascade_core.sampling.recompute import first_reencoding_block, why_a_vae
from cascade_core.session import RunSession

from . import checks, decoders, devices, outputs, recording, steer, stream
from .core_vae import context_reencoder, start_image_inputs, vae_bytes, vae_decoder, vae_weights
from .sockets import CATEGORY, ConfigType, DecoderType, EngineModelType, ScheduleType

log = logging.getLogger("block_cascade")


def effective_settings(family: str, cfg, assumed: str | None, switches: list[int], context: str = "",
                       notes: tuple[str, ...] = ()) -> str:
    """One line naming a run's family, every sampling setting it uses, the blocks where the prompt
    switches, the context before block 0 (``context``, e.g. "start image") and ``notes`` on settings
    that context changed (the widget and the log)."""
    steps = ",".join(map(str, cfg.steps))
    first = "" if cfg.first_block_steps is None else f", block 0 {','.join(map(str, cfg.first_block_steps))}"
    window = "window " + ("unlimited" if cfg.window is None else f"{cfg.window} (sink {cfg.sink})") \
        if not cfg.kv_recompute else f"KV cache rebuilt every block from {cfg.kv_recompute} context frames, no clean pass"
    window += f", EMA sink {cfg.sink_ema:g}" if cfg.sink_ema else ""
    window += f"; RoPE at {cfg.rope_positions}" if cfg.rope_positions != "absolute" else ""
    why = f" (assumed: {assumed})" if assumed else ""
    return (f"{family}{why}: {cfg.frames_per_block} latent frame(s) a block"
            f"{', block 0 one frame' if cfg.independent_first_frame else ''}; steps {steps}{first} "
            f"({'warped' if cfg.warp else 'raw'}, shift {cfg.shift:g}); context noise {cfg.context_noise:g}; "
            f"{window}; {_switches(cfg.switch_mode, switches)}; P{cfg.parallel} {cfg.attention}; "
            f"flashblock {cfg.flashblock}" + (f"; context: {context}" if context else "")
            + "".join(f"; note: {n}" for n in notes))


def _switches(mode: str, blocks: list[int]) -> str:
    if not blocks:
        return f"switch {mode}"
    at = ", ".join(map(str, blocks))
    extra = " (one extra forward each)" if mode == "recache" else " (no extra forward)"
    return f"switch {mode} at block{'s' if len(blocks) > 1 else ''} {at}{extra}"


class BlockCascadeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadeSampler",
            display_name="Block Cascade Sampler",
            category=CATEGORY,
            description="Streams video from a block-causal Wan2.1 model, several blocks denoising at once "
                        "(Block Cascading): from text, from a start image, or continuing a video (prefix). "
                        "Frames appear on the node as blocks finish.",
            inputs=[
                EngineModelType.Input("model"),
                ConfigType.Input("config"),
                io.Int.Input("width", default=832, min=checks.SIZE_MULTIPLE, max=checks.MAX_SIZE,
                             step=checks.SIZE_MULTIPLE),
                io.Int.Input("height", default=480, min=checks.SIZE_MULTIPLE, max=checks.MAX_SIZE,
                             step=checks.SIZE_MULTIPLE),
                io.Int.Input("blocks", display_name="length (blocks)", default=7, min=0,
                             max=checks.MAX_BLOCKS,
                             tooltip="Video length in blocks, block 0 included. Chunk-wise (3 latent frames a "
                                     "block): 12 video frames = 0.75 s at 16 fps each (the first gives 9), 7 "
                                     "blocks = 81 frames; frame-wise (1 latent frame): 4 video frames a block, "
                                     "21 blocks = 81 frames. 0 = endless: streams until Cancel, which ends it "
                                     "and keeps everything (needs a window: LongLive, Rolling/Reward Forcing, "
                                     "Krea, or a config window); the video is written to the output folder "
                                     "(block_cascade/stream_*.mp4) as it streams."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="One prompt (CLIPTextEncode with a wan CLIPLoader). Connect this "
                                              "or a schedule."),
                ScheduleType.Input("schedule", optional=True, tooltip="Prompts switching at blocks."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE (Wan2.1; Wan2.2 for a Wan2.2 model such as LongLive 2.0): "
                                     "frames are decoded block by block as they finish (decoder, "
                                     "when connected, decodes them instead). Without either (or a "
                                     "preview_decoder) the IMAGE output and the live view are a cheap latent-RGB "
                                     "preview (upscaled), not decoded video. Needed with start_image (it encodes the "
                                     "image), and by Krea Realtime (kv_recompute) from the third block on (it "
                                     "re-encodes a decoded frame into every block's context)."),
                io.Image.Input("start_image", optional=True,
                               tooltip="Image to video: the image (the batch's first) scaled to cover width x "
                                       "height and centre-cropped, encoded by the vae, is the video's first "
                                       "latent frame; the generated blocks follow it (LongLive 2.0: it is block 0's "
                                       "first latent frame, held in every step). Not with prefix."),
                io.Latent.Input("prefix", optional=True,
                                tooltip="Continue a video: a Block Cascade Sampler's LATENT of the same width "
                                        "and height. Its last context_frames latent frames are the context; "
                                        "the outputs hold the whole given video, then the new frames. Not with "
                                        "start_image."),
                io.Int.Input("context_frames", default=0, min=0, max=checks.MAX_LATENT_FRAMES, optional=True,
                             tooltip="With prefix: how many of its last latent frames the new blocks see. 0 = "
                                     "the config's window (every frame without a window)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Steer while it runs: a core CLIP (CLIPLoader, type wan) that encodes "
                                      "prompts sent while the node runs (POST /block_cascade/steer, the "
                                      "client's --steer); each switches at the next block to enter. One "
                                      "device only."),
                DecoderType.Input("decoder", optional=True,
                                  tooltip="Decodes the output frames (IMAGE) instead of the vae: LightVAE, the Wan2.1 "
                                          "VAE or a tiny decoder (Load Video Decoder). The vae still encodes (start "
                                          "image, Krea's re-encoded context frame)."),
                DecoderType.Input("preview_decoder", optional=True,
                                  tooltip="A fast decoder (taew2_1, LightTAE) for the live view, beside the decoder "
                                          "or vae that makes IMAGE, each on its own CUDA stream. Alone (no decoder, "
                                          "no vae) its frames are IMAGE too."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT",
                                 tooltip="Raw latents of the model's VAE (core VAEDecode takes them; Wan2.1 [1, 16, "
                                         "T, H/8, W/8], Wan2.2 [1, 48, T, H/16, W/16]): "
                                         "the start image's frame or the whole prefix first, then the new "
                                         "frames. Endless: the last window's frames (a prefix to continue)."),
                io.Image.Output(display_name="IMAGE",
                                tooltip="The frames of LATENT, all of them (decoded with the decoder, else the VAE, "
                                        "else the preview_decoder, else the latent-RGB preview). Endless: the "
                                        "last window's frames; the whole "
                                        "video is the MP4 in the output folder."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs) -> int:
        """ComfyUI runs the node again, not from its cache, once a run was stopped by Cancel (its outputs are
        what was made before Cancel, not what the inputs ask for)."""
        return outputs.stopped_runs()

    @classmethod
    def execute(cls, model, config, width, height, blocks, seed, positive=None, schedule=None,
                vae=None, start_image=None, prefix=None, context_frames=0, clip=None, decoder=None,
                preview_decoder=None) -> io.NodeOutput:
        run = check(model, config, width, height, blocks, positive, schedule, vae, start_image, prefix,
                    context_frames, clip, decoder, preview_decoder)  # every check, before anything touches a GPU
        make_room(run, model)  # the one memory estimate of the run's plan
        node_id = cls.hidden.unique_id if cls.hidden is not None and cls.hidden.unique_id is not None else ""
        return sample(run, model, vae, start_image, seed, clip, node_id)  # decoder, run, outputs, cleanup


@dataclasses.dataclass
class Checked:
    """What :func:`check` found, before any GPU work: the settings and the run's session (its plan), the
    devices (the first: where this process decodes), the prompts, the context before block 0 (``kind``;
    ``before``: raw latents the outputs start with, ``given`` the same normalised, ``context`` the engine's
    prefix), the VAE's weights and whether the run re-encodes frames, and the settings line."""
    cfg: object
    session: RunSession
    devices: list
    prompts: object
    kind: str | None
    before: torch.Tensor | None
    given: torch.Tensor | None
    context: torch.Tensor | None
    vae_sd: tuple | None
    reencodes: str | None
    settings_text: str
    attention_backend: str
    compiled: bool = False  # the layers run compiled (:func:`cascade_core.model.compiling.resolve_compile`)
    swap_blocks: int = -1  # the config's choice (-1: the memory estimate's)
    swapped: int = 0  # blocks streamed from host memory (:func:`make_room`)
    need: int = 0  # bytes the run needs besides the weights (:func:`make_room`)
    time_cache: str = "wan"  # the Wan decoder's window rule where the family's code decodes (Krea: "krea")
    decoder_files: decoders.Decoders = decoders.Decoders()  # the decoder / preview_decoder inputs, checked

    @property
    def endless(self) -> bool:
        return self.session.plan.schedule.endless


def check(model, config, width, height, blocks, positive, schedule, vae, start_image, prefix, context_frames,
          clip, decoder=None, preview_decoder=None) -> Checked:
    """Every check of a sampler run (ValueError naming the input at fault), before anything touches a GPU."""
    guess = getattr(model, "family", None)  # (family, why) read off its files, else a Wan2.2 5B DiT's own
    if guess is None and default_family(model.cfg.in_dim) != DEFAULT_FAMILY:
        guess = (default_family(model.cfg.in_dim), f"{model.label} is {model_words(model.cfg.in_dim)}")
    cfg, family, assumed = config.config_for(guess[0] if guess else None,
                                             schedule.switch_mode if schedule is not None else "auto")
    check_family_model(family, model.cfg.in_dim, model.experts, model.label)  # the CLI's one rule
    if family == "streamdiffusionv2":  # video-to-video: it needs a video in
        raise ValueError("family streamdiffusionv2 restyles a video: use the Block Cascade Video-to-Video node")
    space = model.cfg.latent_space  # the model's latents' channels and size (Wan2.1: 16, 8 px; Wan2.2: 48, 16 px)
    checks.video_size(width, height, space, model.cfg.patch_size)
    checks.blocks(blocks)
    run_devices = devices.check(config.devices)
    why = attention_backends.refusal(config.attention_backend, run_devices[0], model.dtype)
    if why is not None:
        raise ValueError(why)
    if positive is not None and schedule is not None:
        raise ValueError("connect either positive (one prompt) or schedule (Prompt Schedule), not both")
    if positive is None and schedule is None:
        raise ValueError("no prompt: connect positive (one prompt) or schedule (Prompt Schedule)")
    entries = [(0, checks.conditioning_embeds(positive, "positive"))] if positive is not None else list(schedule.entries)
    prompts = checks.schedule(entries, blocks, model.cfg.text_dim, schedule.blends if schedule is not None else ())
    kind = checks.context_kind(start_image, prefix, vae, width, height, context_frames, cfg)  # LongLive 2.0: held
    before = given = context = None  # raw latents before block 0, the same normalised, the engine's prefix
    notes, described = [], checks.HELD_WORDS if kind == checks.HELD_IMAGE else ""
    if kind in (START_IMAGE, CONTINUATION):
        cfg, notes = prefix_config(cfg, kind)
    if kind == START_IMAGE:
        checks.context_allowed(None, cfg, width, height, "start_image")
        described = "start image (1 latent frame)"
    elif kind == CONTINUATION:
        before = checks.prefix_latents(prefix, width, height, space, model.cfg.patch_size).float()
        given = space.to_normalized(before)  # raw_to_normalized for Wan2.1 latents
        # every frame (the outputs hold them), as the model's dtype will hold them
        checks.context_allowed(given, cfg, width, height, "prefix", model.dtype, space, model.cfg.patch_size)
        context = context_of(given, cfg, context_frames)
        described = f"the last {context.shape[2]} of the prefix's {before.shape[2]} latent frames"
        notes += context_notes(context_frames, context.shape[2])
    steer.check(clip)
    try:  # the run's one plan: every rule of its settings, once
        session = RunSession(cfg, blocks=blocks, width=width, height=height, devices=run_devices,
                             prefix_frames=1 if kind == START_IMAGE else 0 if context is None else context.shape[2],
                             switches=len(prompts.entries) - 1, steered=clip is not None,
                             patch=model.cfg.patch_size, keep_pool=True, latent_space=space)
    except SteeringRefused as exc:
        raise ValueError(f"clip: {exc}; or disconnect clip") from None
    model.check_run(cfg, session.pooled)  # a two-expert model (Wan2.2 A14B): what it does not run
    checks.held_image(kind, session)  # LongLive 2.0's start image: the engine's rules, one device
    reencodes = why_a_vae(blocks, cfg.frames_per_block, cfg.kv_recompute)
    if reencodes and vae is None:
        fewer = f", or use at most {first_reencoding_block(cfg.frames_per_block, cfg.kv_recompute)} blocks"
        raise ValueError(f"vae: {reencodes}: connect the Wan2.1 VAE (VAELoader) to the sampler's vae input"
                         f"{fewer if blocks else ''}")
    compiled, why_not = resolve_compile(getattr(config, "compile", "auto"), run_devices[0])
    if why_not:
        log.info("Block Cascade: %s", why_not)
    settings_text = effective_settings(family, cfg, guess[1] if assumed else None,
                                       [s for s, _ in prompts.entries[1:]], described, tuple(notes))
    settings_text += "; compiled" if compiled else "; not compiled"
    # which decoder makes IMAGE, which the live view; each of the model's latent space (one line naming both)
    files = checks.decoder_spaces(session, decoders.check(decoder, preview_decoder, vae))
    vae_sd = vae_weights(vae, space)  # checked (the model's space); kept where its Wan decoder decodes
    return Checked(cfg, session, run_devices, prompts, kind, before, given, context,
                   vae_sd if files.vae_decodes(reencodes) else None, reencodes,
                   settings_text, config.attention_backend, compiled, getattr(config, "swap_blocks", -1),
                   time_cache=get_family(family).time_cache, decoder_files=files)


def make_room(run: Checked, model) -> None:
    """ComfyUI asked to free what the run needs, then where the weights sit: resident, or as few blocks (of each
    expert of a pair: two KV pools counted) as fit streamed from host memory (``run.swapped``: swap_blocks, or the
    estimate's choice); refused in one line naming the cheapest setting that fits where even every block swapped
    cannot (a worker pool checks each GPU itself). ``run.need``: bytes besides the weights; the settings line too."""
    files = run.decoder_files  # every decoder's weights in the one estimate (a re-encoder's second decode too)
    vae = vae_bytes(run.vae_sd, bool(run.reencodes) and files.output is None) + files.bytes(run.devices[0])
    texts = run.prompts.text_sets(run.session.plan.schedule.max_in_flight)  # text K/V sets, blends' included
    device, weights, forced, experts = run.devices[0], model.weight_bytes(), run.swap_blocks, model.experts
    need, what = run.session.memory(model.cfg, model.dtype, texts, vae, experts)  # experts 2: a Wan2.2 A14B pair
    if run.session.pooled:
        if forced > 0:
            raise ValueError("swap_blocks: block swap runs on one device; set it to -1 or 0 with several devices")
        for d in run.devices:
            devices.make_room(d, need + weights)
        run.need = need
        return
    if forced > model.cfg.num_layers:
        raise ValueError(f"swap_blocks: the model has {model.cfg.num_layers} transformer blocks, got {forced}")
    devices.make_room(device, need + (0 if model.resident_on(device) else weights))
    resident = model.resident_on(device)  # after making room: ComfyUI may have unloaded them
    free = devices.free_bytes(device) + (weights if resident else 0) if device.type == "cuda" else None
    swapped = blocks_to_swap(free, need, weights, model.block_bytes(), model.cfg.num_layers, forced, experts)
    if swapped is None:
        cheaper = cheaper_settings(run.session.plan, model.cfg, model.dtype, texts, vae, free, weights,
                                   model.block_bytes(), model.weight_dtype().startswith(("fp8", "gguf")), experts)
        raise ValueError(f"not enough GPU memory on {device}: the run needs about {need / GIB:.2f} GiB ({what}) "
                         f"besides the weights ({weights / GIB:.2f} GiB), and {free / GIB:.2f} GiB are free even with "
                         f"every block swapped to CPU memory; " + (f"{cheaper} would fit" if cheaper else
                                                                   "use fewer blocks, a smaller size or another device"))
    run.need, run.swapped = need, swapped
    run.settings_text += "; " + placement_words(swapped, model.cfg.num_layers, model.weight_dtype(), experts) + (
        " (chosen: the model does not fit)" if swapped and forced < 0 else "")


def sample(run: Checked, model, vae, start_image, seed: int, clip, node_id: str) -> io.NodeOutput:
    """The decoder, the run streamed to the widget, the outputs; every reference to the run's device tensors
    dropped at the end, whatever happened (after a failure, also collected and the device's cache emptied)."""
    cfg, session, endless, device = run.cfg, run.session, run.endless, run.devices[0]
    plan = session.plan
    attention_backends.set_backend(run.attention_backend)
    progress = outputs.Progress(plan.schedule.blocks or 1, node_id or None)  # endless: see Reporter.on_block
    wan = decoder = preview = reporter = result = live = None
    before, given, context, extra = run.before, run.given, run.context, {}
    ended_well = False
    final_latents = []  # a run of known length: its final blocks' latents, handed on if Cancel stops it
    try:
        if run.kind in (START_IMAGE, checks.HELD_IMAGE):  # before the DiT: ComfyUI may unload the VAE for it then
            before, given, context, extra = start_image_inputs(vae, start_image, run.kind == checks.HELD_IMAGE, plan)
        # several devices: the weights stay on the CPU here; the pool holds the GPU copies
        wan = (model.acquire_for_pool() if session.pooled else model.acquire_swapped(device, run.swapped)
               if run.swapped else model.acquire(device, run.need))
        compiling = compile_layers(wan, run)
        decode_on = session.decode_device(device)  # several devices: the last one's
        decoder = (vae_decoder(run.vae_sd, plan.latent_space, decode_on, run.time_cache) if run.vae_sd is not None
                   else stream.preview_decoder(plan.latent_space))  # the video's and a re-encoded frame's (shared)
        if run.reencodes:
            extra["context_image"] = context_reencoder(vae, decoder)
        decoder, preview = decoders.for_run(run.decoder_files, decoder, decode_on, run.time_cache)  # IMAGE's, live view's
        lead = 0 if before is None else before.shape[2]
        clean_pass = not cfg.kv_recompute
        blocks = plan.schedule.blocks
        # endless: frames_total unknown, Cancel decodes every final block, the last window's frames kept
        reporter = stream.Reporter(node_id, blocks, 0 if endless else lead + cfg.grid.total(blocks),
                                   len(cfg.steps) + clean_pass, cfg.parallel, plan.width, plan.height, decoder,
                                   progress=progress,
                                   settings=run.settings_text, clean_pass=clean_pass,
                                   keep_frames=4 * cfg.attended_window if endless else None,  # 4 a latent frame
                                   recording=recording.Recording(plan.latent_space.fps) if endless else None,
                                   steerable=clip is not None, compiling=compiling,
                                   scheduled=tuple(b for b, _ in run.prompts.entries if b > 0), preview=preview)
        log.info("Block Cascade: %s", run.settings_text)
        reporter.start()
        if before is not None:
            reporter.show_context(given)
        live = steer.Running(node_id, blocks, clip, model.cfg.text_dim, reporter.switch)
        if clip is not None:
            extra.update(steer=live.steer, on_switch=live.on_switch)
        steer.register(live)
        def on_block(event):
            if not endless:
                final_latents.append(event.latents)  # no copy: the engine does not write a final block again
            reporter.on_block(event)

        result = session.run(wan, run.prompts, seed=seed, on_tick=reporter.on_tick, on_block=on_block,
                             should_stop=outputs.interrupted, prefix=context, include_prefix=endless, **extra)
        COMPILED_SHAPES.add(_compile_key(run))
        out = outputs.finished(run, result, reporter, before, context)
        ended_well = True
        return out
    except Interrupted as exc:
        traceback.clear_frames(exc.__traceback__)  # the engine's frames hold the KV cache
        if reporter is not None and not endless:  # Cancel keeps what was made
            out = outputs.stopped(run, final_latents, reporter, before)
            if out is not None:
                return out
        elif reporter is not None:
            reporter.done(error="interrupted")
        outputs.raise_interrupt()
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        if reporter is not None:
            reporter.failed(exc)
        raise
    finally:
        steer.unregister(live)
        # Drop every reference to device tensors of this run, then give cached blocks back.
        if wan is not None and wan.swap is not None:  # swapped: nothing of the model stays on the device
            wan.swap.detach()
        run.vae_sd = run.context = run.given = None
        final_latents.clear()
        del wan, decoder, preview, result, context, given, extra, live
        if reporter is not None:
            reporter.frames, reporter.decoding, reporter.video = [], None, None
        if not ended_well:  # an exception's frames may hold device tensors in cycles: collected, the cache given back
            gc.collect()
            devices.empty_cache()
        # a finished run's tensors are freed as their last reference goes; the caching allocator keeps their memory
        # for the next run (the memory estimate counts it as available) until ComfyUI empties it (it does between
        # prompts, and before it loads a model that needs it)


COMPILED_SHAPES: set[tuple] = set()  # (devices, width, height, frames a block) this process ran compiled


def _compile_key(run: Checked) -> tuple:
    return tuple(map(str, run.devices)), run.session.plan.width, run.session.plan.height, run.cfg.frames_per_block


def compile_layers(wan, run: Checked) -> bool:
    """Compile the model's layers as the run asks (torch's compile caches in ComfyUI's user folder, kept across
    restarts); whether this run compiles them for its shape for the first time in this process (the widget
    says "compiling")."""
    if run.compiled:
        import folder_paths

        use_disk_cache(os.path.join(folder_paths.get_user_directory(), "block_cascade", "compile_cache"))
    wan.compile_layers(run.compiled)
    return run.compiled and _compile_key(run) not in COMPILED_SHAPES
