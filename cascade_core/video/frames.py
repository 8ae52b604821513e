"""Frames out while the DiT goes on.

:class:`FrameStream` takes each finished block from the sampler (``on_block``), queues its decode on
the VAE's own CUDA stream (so it overlaps the next ticks' DiT work) followed by a copy into pinned
host memory and an event, and hands the frames out in block order on its own writer thread, which
waits for each block's event and runs ``on_frames`` (the PNG/MP4/JPEG encoding):

    frames = FrameStream(decoder, on_frames=show)
    result = generate(..., on_block=frames.push, on_tick=frames.poll)
    video = frames.finish()

Guarantees: the caller's thread never waits for the GPU in ``push``/``poll`` (no ``.cpu()``, no
blocking copy, no synchronisation); frames of block b are handed out after those of block b-1, each
exactly once, on the writer thread; the frame indices are those of one decode of the whole video
(1 + 4(n-1) frames for the first block of n latent frames, 4n after). An exception raised on the
writer thread (by ``on_frames`` too) is raised again by the next ``push``, ``poll`` or ``finish``;
after it no more frames are handed out. ``finish`` hands out every queued block and ends the thread;
``close`` does the same without raising (cleanup on an error path). On the CPU a block is decoded at
once in ``push``; only ``on_frames`` runs on the writer thread.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..common.transfer import to_host_async
from ..sampling.loop import BlockEvent
from .latents import WAN21_LATENTS, LatentSpace

log = logging.getLogger("block_cascade")


def video_frames(latent_frames: int) -> int:
    """Wan's VAE: the first latent frame gives 1 video frame, each later one 4."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


@dataclass(frozen=True)
class FramesEvent:
    block: int
    first_frame: int  # index in the video of frames[:, :, 0]
    frames: torch.Tensor  # [1, 3, F, H, W] float32 in [-1, 1], in host memory (pinned after a GPU decode)
    seconds: float  # since the stream was created, when the frames were handed out


class FrameStream:
    """See the module docstring. ``keep``: also collect every frame for :meth:`finish` to return."""

    def __init__(self, decoder, on_frames: Callable[[FramesEvent], None] | None = None, keep: bool = True,
                 frames_per_pass: int | None = None, should_stop: Callable[[], bool] | None = None):
        # by default the decoder's pass (``decoder.pass_frames``), else a whole block per pass: faster than one
        # latent frame per pass on an H100 at 832x480 (bench --vae times both), for a few GB more activation
        # memory. With ``should_stop`` on the CPU, where a decode holds the caller, one latent frame per pass, and
        # a stop is looked for between passes (raising cascade_core.sampling.loop.Interrupted).
        if frames_per_pass is None:
            frames_per_pass = decoder.pass_frames
        if should_stop is not None and frames_per_pass is None and torch.device(decoder.device).type == "cpu":
            frames_per_pass = 1
        self.stream = decoder.stream(frames_per_pass, should_stop)
        self.on_frames, self.keep = on_frames, keep
        self.kept: list[torch.Tensor] = []
        self.next_frame = 0
        self.start = time.perf_counter()
        self._queue: queue.Queue = queue.Queue()  # (block, DecodeHandle) in block order; None ends the thread
        self._thread: threading.Thread | None = None  # started by the first push, ended by finish/close
        self._error: BaseException | None = None  # raised on the writer thread, raised again here

    def push(self, event: BlockEvent) -> None:
        """Queue the decode of a finished block (blocks arrive in order); never waits for the GPU.

        Raises what the writer thread raised for an earlier block, and on the CPU what the decode
        raises (:class:`cascade_core.sampling.loop.Interrupted` when ``should_stop`` says so).
        """
        self._raise()
        handle = self.stream.decode_async(event.latents, to_host=True)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="block-cascade-frames", daemon=True)
            self._thread.start()
        self._queue.put((event.block, handle))

    def poll(self, _event=None, wait: bool = False) -> None:
        """Raise what the writer thread raised, if anything (an ``on_tick`` callback); with ``wait``,
        first wait until the frames of every block pushed so far are handed out."""
        if wait and self._thread is not None:
            self._queue.join()
        self._raise()

    def finish(self) -> torch.Tensor | None:
        """Hand out the frames of every pushed block and end the writer thread; with ``keep``, all
        frames [1, 3, F, H, W] in host memory (else None). Raises what the writer thread raised."""
        self._end_thread()
        self._raise()
        return torch.cat(self.kept, 2) if self.keep and self.kept else None

    def close(self) -> None:
        """Like :meth:`finish`, but logs the writer thread's exception instead of raising it (for a
        ``finally`` while another exception is on its way)."""
        self._end_thread()
        if self._error is not None:
            log.warning("Block Cascade: handing out frames failed: %s: %s", type(self._error).__name__, self._error)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _end_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _write(self) -> None:
        """The writer thread: in block order, wait for a block's frames, then hand them out."""
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._hand_out(*item)
            except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _hand_out(self, block: int, handle) -> None:
        frames = handle.result()  # waits for the decode and the copy to the host (this thread only)
        if self.keep:
            self.kept.append(frames)
        if self.on_frames is not None:
            self.on_frames(FramesEvent(block, self.next_frame, frames, time.perf_counter() - self.start))
        self.next_frame += frames.shape[2]


class FrameStreams:
    """A run's decoding streams, the live view's first: the output's :class:`FrameStream` and, optionally, a preview
    decoder's, which gets every block first (its decode is queued first, on its own CUDA stream). :meth:`drop`
    takes the preview out of a run whose preview failed (the output goes on); every other method goes to each
    stream still in use, in that order."""

    def __init__(self, output: FrameStream, preview: FrameStream | None = None):
        self.output, self.preview = output, preview
        self._dropped = False

    def drop_preview(self) -> None:
        """Stop pushing to and polling the preview's stream (it is still finished and closed)."""
        self._dropped = True

    def active(self) -> list[FrameStream]:
        """The streams blocks go to: the preview's (unless dropped), then the output's."""
        return [s for s in (None if self._dropped else self.preview, self.output) if s is not None]

    def all(self) -> list[FrameStream]:
        return [s for s in (self.preview, self.output) if s is not None]

    def push(self, event: BlockEvent) -> None:
        """Queue the block's decode on every active stream; never waits for the GPU."""
        for stream in self.active():
            stream.push(event)

    def poll(self, _event=None, wait: bool = False) -> None:
        """Raise what a writer thread raised (see :meth:`FrameStream.poll`)."""
        for stream in self.active():
            stream.poll(wait=wait)

    def finish(self) -> None:
        """Every pushed block's frames handed out, on every stream; raises what a writer thread raised."""
        for stream in self.all():
            stream.finish()

    def close(self) -> None:
        """Like :meth:`finish` without raising (a ``finally``)."""
        for stream in self.all():
            stream.close()


def load_decoder(path: str, dtype: torch.dtype, device: torch.device | str, kind: str | None = None,
                 latent_space=WAN21_LATENTS):
    """Any decoder file of Wan latents -> its streaming decoder, told by names and shapes
    (:func:`weights.vae_names.decoder_kind`): the Wan2.1 VAE (file or diffusers folder) and LightVAE
    (``lightvaew2_1``, a narrower Wan2.1 VAE) -> :class:`video.vae.WanVAEDecoder`; taew2_1 ->
    :class:`video.taew.TinyWanDecoder`; LightTAE (``lighttaew2_1``) -> :class:`video.taew.LightTAEDecoder`;
    the Wan2.2 VAE (file or diffusers folder) -> :class:`video.vae22.Wan22VAEDecoder`; taew2_2 ->
    :class:`video.taew.TinyWan22Decoder`; lighttaew2_2 -> :class:`video.taew.LightTAE22Decoder`.

    Each takes normalised latents [B, C, T, h, w] of its ``latent_space`` and gives frames [B, 3, F, s*h, s*w] in
    [-1, 1] (Wan2.1: C = 16, s = 8; Wan2.2: C = 48, s = 16). ``latent_space`` is the run's (a
    :class:`video.latents.LatentSpace`; default Wan2.1's): a decoder of another space is refused in one line
    naming both; None takes any. ``kind`` (a tiny decoder's kind) overrides which tiny decoder a TAEHV-layout
    file is (taew2_1 and lighttaew2_1 share names and shapes; without it, the file's name, then its dtype,
    decide). ``device="meta"`` only checks the file. Raises :class:`CheckpointError` naming the file: one
    line saying what it looks like when it is none of them, else what is missing or mis-shaped. Weights are
    read without running pickled code (:func:`weights.safe_io.read_weights`).
    """
    from ..weights.safe_io import CheckpointError, read_weights
    from ..weights.vae_names import DECODER_KINDS, decoder_kind, describe
    from .taew import LightTAE22Decoder, LightTAEDecoder, TinyWan22Decoder, TinyWanDecoder
    from .vae import WanVAEDecoder
    from .vae22 import Wan22VAEDecoder

    tiny = {"taew2_1": TinyWanDecoder, "lighttaew2_1": LightTAEDecoder, "taew2_2": TinyWan22Decoder,
            "lighttaew2_2": LightTAE22Decoder}
    classes = {**tiny, "wan2.1_vae": WanVAEDecoder, "lightvaew2_1": WanVAEDecoder, "wan2.2_vae": Wan22VAEDecoder}
    if kind is not None and kind not in tiny:
        raise ValueError(f"kind {kind!r}: one of {', '.join(tiny)} (a tiny decoder file), or None")
    sd = read_weights(path)[0]
    found = decoder_kind(sd, path)
    if found is None:
        space = "Wan" if latent_space is None else latent_space.name
        names = [DECODER_KINDS[k].split(" (")[0] for k in DECODER_KINDS
                 if latent_space is None or classes[k].latent_space.name == latent_space.name]
        raise CheckpointError(path, f"not a decoder of {space} latents ({', '.join(names[:-1])} or {names[-1]}): "
                                    f"it looks like {describe(sd)}")
    if kind is not None and found not in tiny:
        raise CheckpointError(path, f"holds {DECODER_KINDS[found]}, not a tiny decoder ({kind} was asked for)")
    cls = classes[kind or found]
    if latent_space is not None and cls.latent_space.name != latent_space.name:
        raise CheckpointError(path, f"holds {DECODER_KINDS[kind or found]}, a decoder of {cls.latent_space.name} "
                                    f"latents ({cls.latent_space.channels} channels); this run's latents are "
                                    f"{latent_space.name}'s ({latent_space.channels} channels)")
    return cls.from_state_dict(sd, dtype=dtype, device=device, source=path)


class LatentRGBDecoder:
    """A decoder-shaped cheap preview of ``latent_space``'s latents: a linear map of the latent channels to RGB,
    upscaled ``spatial`` times (the latent space's pixels a latent pixel: 8 for Wan2.1, 16 for Wan2.2).

    ``factors`` [C, 3] and ``bias`` [3] map normalised (DiT-space) latents to RGB in [-1, 1]
    (ComfyUI's latent formats carry such tables for their sampler previews, in that space), computed where the
    latents are (on a GPU a few small kernels, then a copy to the host). Same streaming interface and frame counts as
    the real decoders (first latent frame -> 1 frame, later ones -> 4 by repetition), so FrameStream
    takes it unchanged; without factors it shows the channel mean in grey.
    """

    pass_frames = None  # FrameStream's pass: a whole block (see LatentVideoDecoder)

    def __init__(self, factors=None, bias=None, device: torch.device | str = "cpu",
                 latent_space: LatentSpace = WAN21_LATENTS):
        self.latent_space = latent_space  # the latents it previews (their video's frame rate)
        self.spatial = latent_space.spatial
        self.factors = None if factors is None else torch.as_tensor(factors, dtype=torch.float32)
        self.bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        self.device = torch.device(device)

    def stream(self, frames_per_pass=None, should_stop=None) -> "LatentRGBDecoder._Stream":
        """A new video (a preview decode is instant: nothing to stop)."""
        return LatentRGBDecoder._Stream(self)

    def rgb(self, z: torch.Tensor, first_block: bool) -> torch.Tensor:
        """Normalised latents [1, C, T, h, w] -> frames [1, 3, F, s h, s w] in [-1, 1] (s: ``spatial``), computed
        where ``z`` is."""
        z = z[0].float()  # [C, T, h, w]
        if self.factors is not None and self.factors.shape[0] == z.shape[0]:
            rgb = torch.einsum("cthw,cr->trhw", z, self.factors.to(z.device))
            rgb = rgb if self.bias is None else rgb + self.bias.to(z.device).view(1, 3, 1, 1)
        else:
            rgb = z.mean(0, keepdim=True).transpose(0, 1).expand(-1, 3, -1, -1) * 0.5
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.spatial, mode="bilinear", align_corners=False)
        repeats = torch.full((rgb.shape[0],), 4, dtype=torch.long, device=rgb.device)
        repeats[0] = 1 if first_block else 4
        count = rgb.shape[0] * 4 - (3 if first_block else 0)  # given: no wait for the GPU to count them
        frames = rgb.repeat_interleave(repeats, dim=0, output_size=count)  # [F, 3, H, W]
        return frames.permute(1, 0, 2, 3).unsqueeze(0).clamp(-1, 1)

    class _Stream:
        def __init__(self, decoder: "LatentRGBDecoder"):
            self.decoder, self.started = decoder, False

        def decode_async(self, z: torch.Tensor, to_host: bool = False) -> "_Later":
            """Queue the preview of the next block (the StreamingDecode interface), computed where ``z`` is: on
            a GPU, queued on its current stream (a few small kernels) and, with ``to_host``, copied to pinned host
            memory without waiting; ``result()`` waits for that copy."""
            first, self.started = not self.started, True
            if z.is_cuda:
                frames = self.decoder.rgb(z, first)
                if not to_host:
                    return _Later(lambda: frames, None)
                host, copied = to_host_async(frames)
                return _Later(lambda: host, copied)
            device = torch.device("cpu") if to_host else self.decoder.device
            return _Later(lambda: self.decoder.rgb(z, first).to(device), None)


class _Later:
    """Frames computed on the host once a copy to it is done (the DecodeHandle interface):
    ``ready()`` polls the copy; ``result()`` waits for it (this thread only) and computes them once."""

    def __init__(self, compute: Callable[[], torch.Tensor], copied: "torch.cuda.Event | None"):
        self.compute, self.copied, self.frames = compute, copied, None

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()

    def result(self) -> torch.Tensor:
        if self.frames is None:
            if self.copied is not None:
                self.copied.synchronize()
            self.frames = self.compute()
        return self.frames


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 on the CPU."""
    return ((frames[0].permute(1, 2, 3, 0).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


class VideoWriter:
    """An H.264 MP4 written frame by frame (PyAV), and optionally each frame as a PNG in a folder.

    The MP4 is fragmented (an empty ``moov`` first, then a ``moof``/``mdat`` fragment per keyframe, one
    every KEYFRAME_SECONDS, each flushed to the file as it is written): a file cut off at any moment
    (the process killed, the disk full) plays up to its last whole fragment, and :meth:`close` only
    adds the frames still in the encoder. Browsers, ffmpeg and the usual players play such files.
    ``live``: each frame leaves the encoder at once (x264's zerolatency: no lookahead, no B-frames) in a fragment
    of its own, so a player opening the file while it grows finds every frame written so far (a live preview;
    slightly larger files)."""

    KEYFRAME_SECONDS = 2

    def __init__(self, path: str | None, fps: int = 16, frames_dir: str | None = None, live: bool = False):
        self.path, self.fps, self.frames_dir, self.live = path, fps, frames_dir, live
        self.container = self.video = None
        self.count = 0
        if frames_dir:
            os.makedirs(frames_dir, exist_ok=True)

    def write(self, event: FramesEvent) -> None:
        self.write_pixels(to_uint8_frames(event.frames), event.first_frame)

    def write_pixels(self, pixels: torch.Tensor, first_frame: int) -> None:
        """Frames [F, H, W, 3] uint8 on the CPU, the first being the video's frame ``first_frame``."""
        if self.path and self.container is None:
            self._open(pixels.shape[2], pixels.shape[1])
        for i, frame in enumerate(pixels.numpy()):
            if self.container is not None:
                for packet in self.video.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self.container.mux(packet)
            if self.frames_dir:
                from PIL import Image  # Pillow comes with ComfyUI and with PyAV's usual installs
                Image.fromarray(frame).save(os.path.join(self.frames_dir, f"{first_frame + i:05d}.png"))
        self.count += len(pixels)

    def _open(self, width: int, height: int) -> None:
        try:
            import av
        except ImportError:
            raise RuntimeError("writing MP4 needs PyAV: pip install av") from None
        self._av = av
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fragments = "frag_every_frame" if self.live else "frag_keyframe"
        container = av.open(self.path, mode="w", format="mp4", options={  # MP4 whatever the name says
            "movflags": f"{fragments}+empty_moov+default_base_moof", "flush_packets": "1"})
        try:
            video = container.add_stream("libx264", rate=self.fps, options={"tune": "zerolatency"} if self.live else None)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.codec_context.gop_size = self.KEYFRAME_SECONDS * self.fps
        except BaseException:
            container.close()  # nothing half-open left for close()
            raise
        self.container, self.video = container, video

    def close(self) -> None:
        if self.container is not None:
            for packet in self.video.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None
