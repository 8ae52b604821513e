"""Two decoders at once on the command line: ``generate --preview-vae FILE`` decodes every block a second time with
a fast decoder (taew2_1, LightTAE), on that decoder's own CUDA stream beside the ``--vae`` decoder's, into a live
MP4 (``--preview-out``; every frame its own fragment, flushed as written, so a player opening the file while the
run goes on finds every preview frame so far) while ``--vae`` writes the video; the summary tells each decoder's
time to its first frame.

Rules (checked before any model work, one line each): ``--preview-vae`` needs ``--vae`` (without it, give the fast
decoder as ``--vae``: its frames are then the video) and another file than it (the video's frames would be the
preview already); the file must hold a decoder :func:`video.frames.load_decoder` reads; ``--preview-out`` needs
``--preview-vae`` and another path than the video's. Both decoders' weights count in the run's one memory estimate
(:func:`preview_bytes`).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from ..common.latent_space import WAN21_LATENTS
from ..video.frames import FrameStream, FrameStreams, VideoWriter, load_decoder
from ..weights.safe_io import CheckpointError
from . import checks as cli_checks
from .checks import UsageError
from .outputs import vae_dtype, video_path


def preview_path(args) -> str | None:
    """The preview's MP4: --preview-out; else, with --preview-vae, beside the video (out/video.mp4 ->
    out/video.preview.mp4; out/preview.mp4 where only PNGs are written)."""
    if args.preview_out or not args.preview_vae:
        return args.preview_out
    video = video_path(args)
    return os.path.join("out", "preview.mp4") if video is None else os.path.splitext(video)[0] + ".preview.mp4"


def check_decoder(flag: str, path: str) -> None:
    """Refuse a file or folder that holds no decoder :func:`video.frames.load_decoder` reads, of any latent space
    (UsageError naming ``flag``, the file and what it holds; one of another space than the model's is refused when
    the run opens it, :func:`open_decoding`). Its tensor names and shapes are checked, no weight is copied."""
    try:
        load_decoder(path, torch.float32, "meta", latent_space=None)
    except CheckpointError as exc:
        raise UsageError(f"{flag} {exc}") from None


def check_preview(args) -> None:
    """The preview's options (UsageError, one line), before any model work."""
    if args.preview_out and not args.preview_vae:
        raise UsageError("--preview-out needs --preview-vae FILE (the preview decoder)")
    if not args.preview_vae:
        return
    if not args.vae:
        raise UsageError("--preview-vae is a second decoder beside --vae, which writes the video; without --vae, "
                         "give the preview decoder as --vae (its frames are then the video)")
    cli_checks.check_input("--preview-vae", args.preview_vae)
    if os.path.exists(args.vae) and os.path.samefile(args.vae, args.preview_vae):
        raise UsageError("--preview-vae is the --vae file: the video's frames are that preview already; leave "
                         "--preview-vae out")
    check_decoder("--preview-vae", args.preview_vae)
    path, video = preview_path(args), video_path(args)
    if video is not None and os.path.realpath(path) == os.path.realpath(video):
        raise UsageError(f"--preview-out {path} is the video's file; give the preview another")
    cli_checks.check_output_file("--preview-out", path, ".mp4")


def preview_bytes(args) -> int:
    """Bytes of the preview decoder's weights (the file's size; 0 without --preview-vae): the run's memory estimate
    counts them beside the --vae decoder's."""
    return cli_checks.input_bytes(args.preview_vae) if args.preview_vae else 0


class Decoding(FrameStreams):
    """The run's decoding as :mod:`cli.run` drives it (:class:`~video.frames.FrameStreams`'s push, poll, finish,
    close): the video's stream and, with --preview-vae, the preview's; :meth:`close` also closes the preview's MP4.
    It notes when each stream's first and last frames were written, for :meth:`timings`. The preview is a view, not
    a result: when writing it fails (a full disk, ...) one ``warning:`` line says so and the run and its video go
    on without it."""

    def __init__(self, video: FrameStream, preview: FrameStream | None = None,
                 preview_writer: VideoWriter | None = None):
        super().__init__(video, preview)
        self.created = time.perf_counter()  # the run starts right after (cli.run.run_generate)
        self.preview_writer = preview_writer
        self.written: dict[str, list[float]] = {"video": [], "preview": []}  # [first, last] perf_counter
        self.preview_failed: str | None = None  # why the preview stopped, if it did
        for name, stream in (("video", video), ("preview", preview)):
            if stream is not None:
                stream.on_frames = self._noted(name, stream.on_frames)

    def _noted(self, name: str, on_frames):
        def write(event) -> None:
            if name == "preview" and self.preview_failed:
                return
            try:
                on_frames(event)
            except Exception as exc:  # noqa: BLE001 - the preview's own failure; the video's is raised
                if name != "preview":
                    raise
                self._preview_stopped(exc)
                return
            now, times = time.perf_counter(), self.written[name]
            times[:] = [times[0] if times else now, now]
        return write

    def _preview_stopped(self, exc: BaseException) -> None:
        if self.preview_failed is None:
            self.preview_failed = f"{type(exc).__name__}: {exc}"
            self.drop_preview()
            print(f"warning: the preview stopped ({self.preview_failed}); the video goes on without it",
                  file=sys.stderr)

    def close(self) -> None:
        """Like :meth:`finish` without raising (a ``finally``), then the preview's MP4 finalised (a failure to
        finalise it is a ``warning:`` line: the video's writer is closed after this, whatever happened here)."""
        super().close()
        if self.preview_writer is not None:
            try:
                self.preview_writer.close()
            except Exception as exc:  # noqa: BLE001 - see above
                self._preview_stopped(exc)

    def timings(self, startup: float = 0.0) -> dict:
        """``video_first_frame_seconds``; with a preview also ``preview_out``, ``preview_frames``,
        ``preview_first_frame_seconds`` and ``preview_frames_per_second`` (its frames over the seconds to its last
        one): seconds from the run's start (after ``startup``, the workers' start-up) to the frames in the file."""
        since = lambda t: round(t - self.created - startup, 4)  # noqa: E731
        out = {}
        if self.written["video"]:
            out["video_first_frame_seconds"] = since(self.written["video"][0])
        if self.preview_writer is not None:
            times, count = self.written["preview"], self.preview_writer.count
            out.update(preview_out=self.preview_writer.path, preview_frames=count,
                       preview_first_frame_seconds=since(times[0]) if times else None,
                       preview_frames_per_second=round(count / since(times[1]), 2) if times and since(times[1]) > 0
                       else None)
            if self.preview_failed:
                out["preview_stopped"] = self.preview_failed
        return out


def open_decoding(args, video: FrameStream, device: torch.device, dtype: torch.dtype,
                  time_cache: str | None = None, latent_space=None) -> Decoding:
    """The run's :class:`Decoding`: ``video`` (the --vae decoder's stream) and, with --preview-vae, that decoder
    (in the video decoder's dtype, :func:`cli.outputs.vae_dtype`; a Wan decoder under the family's ``time_cache``
    rule) streaming into the live MP4 :func:`preview_path` at the space's frame rate; ``latent_space``: the run's
    (None: Wan2.1's)."""
    if not args.preview_vae:
        return Decoding(video)
    writer = VideoWriter(preview_path(args), fps=(latent_space or WAN21_LATENTS).fps, live=True)
    decoder = load_decoder(args.preview_vae, vae_dtype(device, dtype), device,
                           **({} if latent_space is None else {"latent_space": latent_space}))
    if time_cache is not None and hasattr(decoder, "time_cache"):
        decoder.time_cache = time_cache
    return Decoding(video, FrameStream(decoder, on_frames=writer.write, keep=False), writer)
