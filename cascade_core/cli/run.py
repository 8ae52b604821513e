"""The command line's runs: ``generate`` (latents, optionally decoded as they finish) and ``decode``
(latents written by ``generate --latents-out`` into an MP4 and/or PNGs).

``generate`` is one :class:`~session.RunSession` in named steps: :func:`check` (every refusal, before model
work; the session plans the run), :func:`load` (memory, weights, prompts, prefix), the decoder
(:func:`cli.outputs.open_video`), :func:`make_video` (the run) and :func:`outputs`; the session's ``with``
block is the cleanup.
Ctrl-C during a run asks it to stop before the next tick (on every device); what was decoded so far
is finalised as a playable MP4, and :class:`Stopped` carries the one line to print (exit code 130).
A second Ctrl-C aborts at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import torch

from .. import distributed
from ..common.constants import DTYPES
from ..common.stop import StopRequest
from ..model import attention
from ..model.compiling import resolve_compile
from ..model.dit import WanModel
from ..sampling.config import CascadeConfig, PromptSchedule, is_scene_cut
from ..sampling.context import context_notes
from ..sampling.families import describe, get_family
from ..sampling.loop import BlockEvent, Interrupted, Result
from ..sampling.plan import check_noise
from ..sampling.recompute import why_a_vae
from ..session.run_session import TORCHRUN, RunSession
from ..video.reencode import ContextReencoder
from ..weights.safe_io import save_safetensors
from . import checks as cli_checks
from . import prefix as cli_prefix
from . import video_in as cli_video_in
from .checks import UsageError
from .inputs import (
    build_model,
    check_pair,
    check_text_arguments,
    decode_device_choice,
    load_weights,
    place_weights,
    prompt_embeddings,
    resolve_checkpoint,
    resolve_device,
    several_devices,
    single_tensor,
)
from .outputs import (
    DEFAULT_VIDEO,
    BlockProgress,
    check_outputs,
    kept,
    kept_latents,
    open_video,
    summary,
    vae_dtype,
    video_path,
)
from .preview import check_preview, open_decoding, preview_bytes


class Stopped(Exception):
    """The run was stopped by Ctrl-C; the message says where and what was kept (exit code 130)."""


@dataclasses.dataclass
class Checked:
    """What :func:`check` found: the settings and the session with its plan, the device (this rank's under
    torchrun), where the run goes (for the summary), the prompt switches, the prefix as read, and the
    ``note:``/``warning:`` lines to print once everything has passed."""
    cfg: CascadeConfig
    family: str
    assumed: str | None
    session: RunSession
    device: torch.device
    where: str
    dtype: torch.dtype
    switches: list
    prefix_in: cli_prefix.PrefixInput | None
    lines: list[str]
    prefix_notes: list[str]
    swapped: int = 0  # blocks streamed from host memory (:func:`load`)
    decode_device: torch.device | None = None  # where the decoders run (RunSession.decode_device)
    noise: torch.Tensor | None = None  # --noise as read and checked against the plan (None: drawn by the run)


@dataclasses.dataclass
class Loaded:
    """What :func:`load` read: the model and its label, the prompt schedule and its label, the initial noise
    (or None), the context prefix (or None) and the given latents before it (``head``)."""
    model: WanModel
    label: str
    prompts: PromptSchedule
    prompt_label: str | None
    noise: torch.Tensor | None
    prefix: torch.Tensor | None
    head: torch.Tensor | None
    image_latent: torch.Tensor | None = None  # LongLive 2.0's start image: block 0's frame 0 (cli.prefix)

    @property
    def lead(self) -> torch.Tensor | None:
        """The latents the output video starts with, before block 0 (the given head, then the context)."""
        if self.prefix is None:
            return None
        return self.prefix if self.head is None else torch.cat([self.head, self.prefix], 2)


def check(args) -> Checked:
    """Every check of ``generate`` before model work (UsageError, one line); the run's session and plan."""
    devices = several_devices(args)
    dtype = DTYPES[args.dtype]
    checkpoint_notes = resolve_checkpoint(args)  # a file of a pair's expert: the pair's folder
    cfg, family, assumed = cli_checks.sampling_config(args)
    if args.blocks < 0:
        raise UsageError(f"--blocks must be >= 1 (0: endless, until Ctrl-C), got {args.blocks}")
    if args.blocks == 0 and args.noise:
        raise UsageError("--noise gives the initial noise of a video of known length; an endless one (--blocks 0) "
                         "draws each block's as it enters: leave --noise out")
    switches = cli_checks.prompt_switches(args.switch, args.blocks)
    cfg, prefix_notes = cli_prefix.prefix_settings(args, cfg)  # (where a prefix is defined: checked there)
    if devices == TORCHRUN:  # every rank checks everything before it joins the group
        device = distributed.rank_device(int(os.environ.get("LOCAL_RANK", "0")))
        where = f"{os.environ.get('WORLD_SIZE', '?')} ranks (torchrun)"
    else:
        device = resolve_device(args.device) if devices is None else devices[0]
        where = str(device) if devices is None else ",".join(map(str, devices))
    try:  # the run's one plan: every rule of its settings, once
        session = RunSession(cfg, blocks=args.blocks, width=args.width, height=args.height,
                             devices=[device] if devices is None else devices,
                             ranks=int(os.environ.get("WORLD_SIZE", 2)) if devices == TORCHRUN else None,
                             switches=len(switches), latent_space=cli_checks.model_latent_space(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_text_arguments(args, sum(not is_file for _, _, is_file, _ in switches))
    cli_checks.check_settings(args, cfg)
    check_pair(args, cfg, session)  # a two-expert (Wan2.2 A14B) folder: what it does not run
    check_outputs(args)
    check_preview(args)
    cli_checks.check_decoder_spaces(args, session)  # a decoder of another latent space than the model's
    prefix_in = cli_prefix.read_prefix(args, cfg, session.plan)
    if prefix_in is not None:  # its frames are known once its file is read
        session.plan = session.plan.with_prefix(prefix_in.frames)
    noise = single_tensor(args.noise, "the initial noise") if args.noise else None  # small: read before the model
    try:
        check_noise(session.plan, noise)
    except ValueError as exc:
        raise UsageError(f"--noise {args.noise}: {exc}") from None
    lines = checkpoint_notes + cli_checks.length_warnings(cfg, args.blocks,
                                                         0 if prefix_in is None else prefix_in.frames)
    cli_checks.check_backend(args.attention_backend, device, dtype)
    cli_checks.check_weight_dtype(args, device)
    decode_on = session.decode_device(device, decode_device_choice(args))
    return Checked(cfg, family, assumed, session, device, where, dtype, switches, prefix_in, lines, prefix_notes,
                   decode_device=decode_on, noise=noise)


def load(args, run: Checked) -> Loaded:
    """Files read and checked, the memory refused where it cannot fit (one device; the worker pool checks each
    GPU for its own share), the prefix encoded before the DiT is built, the prompts embedded, the model built
    (fp8, compiled as asked)."""
    session, device, dtype, plan = run.session, run.device, run.dtype, run.session.plan
    weights = load_weights(args, dtype, pairs=True)  # checked (and kept on the CPU) before the text encoder runs
    if not session.pooled and session.devices != TORCHRUN:
        # the decoders' weights, where they share the DiT's device (--decode-device elsewhere: only a KV recompute's
        # re-encoder stays here, whose Wan decoder the video then shares); both decoders in the one estimate
        here = run.decode_device == device
        vae_bytes = cli_checks.input_bytes(args.vae) if args.vae and (here or plan.cfg.kv_recompute) else 0
        run.swapped = place_weights(args, run, weights, vae_bytes + (preview_bytes(args) if here else 0))
    prefix_in = run.prefix_in
    prefix, image = cli_prefix.prefix_and_image(prefix_in, plan, args.context_frames, args.vae, device,
                                                vae_dtype(device, dtype))
    texts = ([args.prompt] if args.prompt is not None else []) + [v for _, v, file, _ in run.switches if not file]
    encoded = prompt_embeddings(args, texts, device) if texts else []
    embeds = encoded.pop(0) if args.prompt is not None else None
    prompt_label = None if embeds is None else f"{len(embeds)} tokens"
    # several local devices: the weights stay on the CPU here and go to the workers once
    model, label = build_model(weights, torch.device("cpu") if session.pooled or run.swapped else device, dtype,
                               args.weight_dtype)
    del weights
    if run.swapped:
        model.swap_blocks(device, run.swapped)
    compiled, why_not = resolve_compile(args.compile, device)
    if why_not and device.type == "cuda":
        print(f"note: {why_not}", file=sys.stderr)
    elif compiled and not args.quiet:
        print("note: the layers compile during the first forwards (tens of seconds for a new video size; torch "
              "keeps them on disk for the next process)", file=sys.stderr)
    model.compile_layers(compiled)
    if args.embeds:
        embeds = single_tensor(args.embeds, "a [L, 4096] prompt embedding")
    elif embeds is None:
        embeds = torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(args.seed))
    noise = run.noise
    entries = [(0, embeds)] + [(b, single_tensor(v, "a [L, 4096] prompt embedding") if is_file else encoded.pop(0))
                               for b, v, is_file, _ in run.switches]
    head = None if prefix_in is None else prefix_in.head  # given latents before the context, output as they are
    prompts = PromptSchedule(entries, {b: n for b, *_, n in run.switches if n},  # LongLive 2.0's cuts: by the text
                             {b for b, v, is_file, _ in run.switches if not is_file and is_scene_cut(v)})
    return Loaded(model, label, prompts, prompt_label, noise, prefix, head, image)


def print_notes(args, run: Checked, loaded: Loaded) -> None:
    """The ``note:`` and ``warning:`` lines, said once every check has passed (a refusal stays one line)."""
    lines = list(run.prefix_notes)
    if run.prefix_in is not None and run.prefix_in.source != "image":
        lines += [f"note: {line}" for line in context_notes(args.context_frames, loaded.prefix.shape[2])]
    if run.assumed:
        lines.insert(0, f"note: family {run.family} assumed ({run.assumed}); --family sets another")
    for line in lines + run.lines:
        print(line, file=sys.stderr)


def make_video(args, run: Checked, loaded: Loaded, context_image, writer, frames) -> tuple[Result, float]:
    """The run itself, its finished blocks pushed to the decoder and the progress bar; (result, seconds the
    workers took to start). Raises :class:`Stopped` at Ctrl-C, saying what the finalised files hold."""
    cfg, endless, lead = run.cfg, args.blocks == 0, loaded.lead
    finished = []  # latents [1, 16, fpb, h, w] of the finished blocks, kept for a stopped run
    progress = None

    def on_block(event):
        if args.latents_out and not endless:  # an endless run writes its last window (Result.latents)
            finished.append(event.latents)  # no copy in the tick loop; written only if stopped
        # after Ctrl-C: no new decoding, what was decoded is kept; an endless run's every final block is
        if frames is not None and (endless or not stop()):
            frames.push(event)
        progress(event)

    start = time.perf_counter()
    with StopRequest() as stop:
        try:
            run.session.runner(run.device)  # a worker pool starts here (kept for the run)
            startup = time.perf_counter() - start
            progress = BlockProgress(args.blocks or None, not args.quiet)  # after the workers' start-up
            if frames is not None and lead is not None:  # the video starts with the frames before block 0,
                for at in range(0, lead.shape[2], cfg.frames_per_block):  # pushed a block's worth at a time
                    if stop():  # Ctrl-C while a long given video is decoded: what is decoded is kept
                        raise Interrupted("stopped while decoding the frames before block 0")
                    frames.push(BlockEvent(-1, lead[:, :, at:at + cfg.frames_per_block].to(run.dtype), 0, 0.0))
            result = run.session.run(loaded.model, loaded.prompts, device=run.device, seed=args.seed,
                                     noise=loaded.noise, on_block=on_block,
                                     on_tick=None if frames is None else frames.poll, should_stop=stop,
                                     prefix=loaded.prefix, include_prefix=True,
                                     **cli_prefix.given(context_image=context_image, image_latent=loaded.image_latent))
            if frames is not None:
                frames.finish()
        except Interrupted:
            if frames is not None:
                frames.finish()  # the blocks that finished are decoded and written
            done = 0 if progress is None else progress.done
            if progress is not None:
                progress.close()  # ends the bar's line before the message
            where = (f"stopped at block {min(done + 1, args.blocks)} of {args.blocks}" if args.blocks
                     else "stopped before the endless video's first block was final")
            raise Stopped(f"{where}; {kept(writer)}{kept_latents(args.latents_out, finished, lead)}") from None
        except KeyboardInterrupt as exc:  # a second Ctrl-C: say what the finalised files hold
            for done_with in (frames, writer):
                if done_with is not None:
                    done_with.close()
            raise KeyboardInterrupt(f"{exc}; {kept(writer)}") from None
        finally:
            if progress is not None:
                progress.close()
            if frames is not None:
                frames.close()  # its writer thread ends before the MP4 is closed
            if writer is not None:
                writer.close()
    return result, startup


def outputs(args, run: Checked, loaded: Loaded, result: Result, writer, seconds: float,
            startup: float | None, frames=None) -> dict:
    """The latents written (--latents-out) and the JSON summary of the run (``frames``: its
    :class:`~cli.preview.Decoding`, which tells when the first frames were written)."""
    endless, head, cfg = args.blocks == 0, loaded.head, run.cfg
    latents = result.latents if head is None or endless else torch.cat([head.to(result.latents), result.latents], 2)
    if args.latents_out:
        save_safetensors({"latents": latents}, os.path.realpath(args.latents_out))  # through a link
    out = summary(result, latents, args, loaded.model, loaded.label, run.where, cfg)
    out.update(family=run.family, family_assumed=run.assumed, settings=describe(cfg),
               prompt_switches=[b for b, *_ in run.switches])
    if any(n for *_, n in run.switches):
        out["prompt_blend_blocks"] = [n for *_, n in run.switches]
    if endless:  # ended by Ctrl-C, its normal end; the latents are its last window
        given_before = 0 if head is None else head.shape[2]  # the output video's frames before the context
        out.update(endless=True, stopped="Ctrl-C", latents_first_frame=given_before + result.first_frame,
                   generated_latent_frames=cfg.grid.total(result.blocks))
    if startup is not None:
        out["worker_startup_seconds"] = round(startup, 4)
    if writer is not None:
        out.update(video_frames=writer.count, video_out=writer.path, frames_dir=args.frames_dir,
                   end_to_end_seconds=round(seconds, 4), video_frames_per_second=round(writer.count / seconds, 2),
                   **frames.timings(startup or 0.0))
    if loaded.prompt_label:
        out["prompt"] = loaded.prompt_label
    prefix_in = run.prefix_in
    if prefix_in is not None:
        written = 0 if prefix_in.held else loaded.prefix.shape[2]  # the context's (an endless run's may be gone)
        given = written + (0 if prefix_in.head is None else prefix_in.head.shape[2])
        out.update(prefix_source=prefix_in.source, prefix_file=prefix_in.path, prefix_frames=written,
                   given_frames=given, **({"image_latent": "block 0's frame 0"} if prefix_in.held else {}))
    return out


@contextlib.contextmanager
def _refusal_reaches_every_rank(torchrun: bool):
    """Under torchrun only rank 0 reads the files: a failure there is passed on to the other ranks,
    which wait in generate_collective, so they end at once (quietly) instead of at the timeout."""
    try:
        yield
    except Exception as exc:
        if torchrun:
            distributed.refuse_collective(str(exc))
        raise


def run_generate(args) -> dict | None:
    """``generate``: every check first, then the run; the summary dict (None on torchrun ranks > 0).

    Raises UsageError/ValueError/CheckpointError (exit 2), WorkerError (exit 1), Stopped (exit 130)."""
    if cli_video_in.wanted(args):  # video-to-video (StreamDiffusionV2): a run of its own
        try:
            return cli_video_in.run_video_to_video(args)
        except cli_video_in.StoppedInput as exc:
            raise Stopped(str(exc)) from None
    if args.noise_scale is not None:
        raise UsageError("--noise-scale is the first chunk's share of noise of a video input: it needs --video-in")
    run = check(args)
    attention.set_backend(args.attention_backend)
    torchrun = run.session.devices == TORCHRUN
    if torchrun:
        distributed.init_from_env()
        if torch.distributed.get_rank() != 0:  # weights, prompt and noise come from rank 0
            distributed.generate_collective(None, None, None, device=run.device)
            return None
    with run.session:
        context_image = None  # a KV recompute's re-encoder (one device: the plan refuses several)
        time_cache = get_family(run.family).time_cache  # the Wan decoder's rule where the family's code decodes
        if why_a_vae(args.blocks, run.cfg.frames_per_block, run.cfg.kv_recompute):
            context_image = ContextReencoder.from_file(args.vae, dtype=vae_dtype(run.device, run.dtype),
                                                       device=run.device, time_cache=time_cache)
        with _refusal_reaches_every_rank(torchrun):
            loaded = load(args, run)
        print_notes(args, run, loaded)
        writer = frames = None
        if args.vae:
            shared = context_image is not None and run.decode_device == run.device  # the file read once
            writer, frames = open_video(args.vae, video_path(args), args.frames_dir, run.decode_device, run.dtype,
                                        context_image.decoder if shared else None, run.session.plan.latent_space)
            if hasattr(frames.stream.decoder, "time_cache"):  # the Wan decoder (taew2_1 has no such rule)
                frames.stream.decoder.time_cache = time_cache
        if frames is not None:  # with --preview-vae a second decoder beside it, into its live MP4
            frames = open_decoding(args, frames, run.decode_device, run.dtype, time_cache,
                                   run.session.plan.latent_space)
        start = time.perf_counter()
        result, startup = make_video(args, run, loaded, context_image, writer, frames)
        seconds = time.perf_counter() - start - startup
    return outputs(args, run, loaded, result, writer, seconds, startup if run.session.pooled else None, frames)


def run_decode(args) -> dict:
    """``decode``: latents [1, C, T, H/s, W/s] (DiT space, as ``generate --latents-out`` writes them; C, s: --vae's
    latent space's) through the streaming decoder into an MP4 and/or PNGs; the summary dict."""
    video_out = args.video_out or (None if args.frames_dir else DEFAULT_VIDEO)
    cli_checks.check_output_file("--video-out", video_out)
    cli_checks.check_output_folder("--frames-dir", args.frames_dir)
    device = resolve_device(args.device)
    latents, space = cli_prefix.latents_to_decode(args)  # in --vae's latent space
    start = time.perf_counter()
    writer, frames = open_video(args.vae, video_out, args.frames_dir, device, torch.float32, None, space)
    passes = range(0, latents.shape[2], args.frames_per_pass)
    progress = BlockProgress(len(passes), not args.quiet, unit="pass")
    with StopRequest() as stop:
        try:
            for i, at in enumerate(passes):
                if stop():
                    frames.finish()  # what was decoded is written before the count is told
                    progress.close()
                    raise Stopped(f"stopped at latent frame {at} of {latents.shape[2]}; {kept(writer)}")
                frames.push(BlockEvent(i, latents[:, :, at:at + args.frames_per_pass], 0, 0.0))
                frames.poll()
                progress(BlockEvent(i, None, 0, 0.0))  # passes handed to the decoder
            frames.finish()
        finally:
            progress.close()
            frames.close()
            writer.close()
    seconds = time.perf_counter() - start
    return {"latent_frames": latents.shape[2], "video_frames": writer.count, "video_out": video_out,
            "frames_dir": args.frames_dir, "seconds": round(seconds, 4)}
