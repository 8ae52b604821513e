"""Decoders from files core ComfyUI cannot load or not as a video decoder (LightVAE; LightTAE, taew2_1 and taew2_2,
which newer cores load as preview VAEs; the Wan2.1 and Wan2.2 VAEs too), and the
sampler's rules for which decoder writes its output and which feeds its live view.

The loader node checks a file (its tensor names and shapes, nothing copied) and hands on a :class:`DecoderFile`;
each run builds the decoder on its device from the file (:func:`cascade_core.video.frames.load_decoder`; the
operating system keeps the file cached) and drops it at the end, as the sampler does with the core VAE's weights.

Rules (:func:`check` at the sampler's entry, :func:`for_run` when it decodes):
- ``decoder`` decodes the output frames (IMAGE, the endless recording); the core ``vae`` still encodes (a start
  image, Krea Realtime's re-encoded context frame, which the vae's own Wan decoder decodes as the family's code
  does), but no longer decodes the output;
- ``preview_decoder`` decodes the live view (the widget, the MJPEG feed) on its own CUDA stream beside the output's
  decoder (``decoder``, else the vae's Wan decoder);
- ``preview_decoder`` alone (no ``decoder``, no ``vae``): its frames are the output too (one decode; better than the
  latent-RGB preview that is the output with no decoder at all);
- the same file as ``decoder`` and ``preview_decoder`` is refused (its frames are the live view already).
"""
from __future__ import annotations

import dataclasses
import os

import folder_paths
import torch
from comfy_api.latest import io

from cascade_core.common.constants import DTYPES
from cascade_core.common.latent_space import LatentSpace

from .sockets import CATEGORY, DecoderType

FOLDERS = ("vae", "vae_approx")  # ComfyUI's folders of VAEs and of tiny (approximate) decoders, looked up in order
DTYPE_CHOICES = ("auto", *DTYPES)


def decoder_files() -> list[str]:
    """The files of ComfyUI's ``vae`` and ``vae_approx`` folders (a name in both: the ``vae`` one)."""
    names = []
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return sorted(names)


def decoder_path(name: str) -> str:
    """The full path of a file :func:`decoder_files` lists (FileNotFoundError naming the folders otherwise)."""
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    raise FileNotFoundError(f"decoder_name: {name} is in none of ComfyUI's folders {', '.join(FOLDERS)}")


@dataclasses.dataclass(frozen=True)
class DecoderFile:
    """A decoder file the loader checked: its path, its name (the widget's), what it holds (the decoder's class),
    the dtype asked for ("auto" or a name of DTYPES), the number of its weights (for the memory estimate) and the
    latents it decodes (``latent_space``: Wan2.1's or Wan2.2's, which the sampler checks against the model's,
    :func:`nodes.checks.decoder_spaces`)."""
    path: str
    name: str
    kind: str
    dtype: str
    weights: int
    latent_space: LatentSpace | None = None

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype it runs in on ``device``: the one asked for; auto: ComfyUI's VAE precision there (its
        --fp16-vae / --bf16-vae / --fp32-vae flags, else bf16 or fp16 where the GPU does them well, else fp32)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        import comfy.model_management as mm

        if hasattr(mm, "vae_dtype"):
            return mm.vae_dtype(device, [torch.bfloat16, torch.float16, torch.float32])
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32

    def bytes(self, device: torch.device) -> int:
        """Bytes of its weights on ``device``."""
        return self.weights * torch.empty((), dtype=self.torch_dtype(device)).element_size()

    def build(self, device: torch.device):
        """The decoder on ``device`` (the file read again: weights copied there, no other copy kept; the sampler
        checked its latent space against the model's already)."""
        from cascade_core.video.frames import load_decoder

        return load_decoder(self.path, self.torch_dtype(device), device, latent_space=None)


class BlockCascadeDecoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadeDecoderLoader",
            display_name="Load Video Decoder (Block Cascade)",
            category=CATEGORY,
            description="A Wan latent decoder for the Block Cascade Sampler's decoder and preview_decoder "
                        "inputs, from models/vae or models/vae_approx: lightx2v's LightVAE (lightvaew2_1) and "
                        "LightTAE (lighttaew2_1, lighttaew2_2), madebyollin's taew2_1 and taew2_2, the "
                        "Wan2.1 VAE or the Wan2.2 VAE (its latent space must be the model's). Streamed block by "
                        "block with its causal cache on its own CUDA stream.",
            inputs=[
                io.Combo.Input("decoder_name", options=decoder_files(),
                               tooltip="The decoder file (models/vae, then models/vae_approx). Its tensor names and "
                                       "shapes are checked here; a file of anything else is refused, saying what "
                                       "it holds."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Precision it decodes in. auto: ComfyUI's VAE precision on the run's GPU "
                                       "(its --fp16-vae / --bf16-vae / --fp32-vae flags), fp32 on the CPU."),
            ],
            outputs=[DecoderType.Output(display_name="decoder")],
        )

    @classmethod
    def execute(cls, decoder_name, dtype="auto") -> io.NodeOutput:
        from cascade_core.video.frames import load_decoder

        path = decoder_path(decoder_name)
        # names and shapes checked, nothing allocated; a decoder of either latent space (the sampler checks it against
        # the model's: checks.decoder_spaces)
        checked = load_decoder(path, torch.float32, "meta", latent_space=None)
        weights = sum(t.numel() for t in checked.state_dict().values() if t.is_floating_point())
        return io.NodeOutput(DecoderFile(path, decoder_name, type(checked).__name__, dtype, weights,
                                         checked.latent_space))


@dataclasses.dataclass(frozen=True)
class Decoders:
    """The sampler's decoder inputs as checked: ``output`` (the ``decoder`` input, or a lone ``preview_decoder``,
    whose frames are then the output) and ``preview`` (a live view beside the output's decoder), each a
    :class:`DecoderFile` or None."""
    output: DecoderFile | None = None
    preview: DecoderFile | None = None

    def vae_decodes(self, reencodes) -> bool:
        """Whether the core VAE's Wan decoder is built: it decodes the output (no ``decoder`` input), or a re-encoded
        context frame (``reencodes``: Krea Realtime from its third block on)."""
        return self.output is None or bool(reencodes)

    def bytes(self, device: torch.device) -> int:
        """Bytes of their weights on ``device`` (the run's one memory estimate counts them with the VAE's)."""
        return sum(f.bytes(device) for f in (self.output, self.preview) if f is not None)


def check(decoder, preview_decoder, vae) -> Decoders:
    """The sampler's ``decoder`` and ``preview_decoder`` inputs by the rules of the module docstring (ValueError,
    one line naming the input), before any GPU work."""
    for name, value in (("decoder", decoder), ("preview_decoder", preview_decoder)):
        if value is not None and not isinstance(value, DecoderFile):
            raise ValueError(f"{name}: expected a Load Video Decoder (Block Cascade) output, "
                             f"got {type(value).__name__}")
    if decoder is not None and preview_decoder is not None and os.path.realpath(decoder.path) == \
            os.path.realpath(preview_decoder.path):
        raise ValueError(f"preview_decoder: {preview_decoder.name} is the decoder's file too, whose frames are the "
                         f"live view already; disconnect preview_decoder")
    if decoder is None and vae is None:  # a lone preview decoder: its frames are the output as well
        return Decoders(output=preview_decoder)
    return Decoders(output=decoder, preview=preview_decoder)


def for_run(files: Decoders, vae_decoder, device: torch.device, time_cache: str | None = None):
    """(output decoder, live-view decoder or None) of a run: ``files`` built on ``device``, the output's being
    ``vae_decoder`` (the core VAE's Wan decoder, or the latent-RGB preview without a VAE) where no ``decoder`` input
    is given. ``time_cache``: the family's rule for a Wan decoder (Krea's), on whichever of them is one."""
    output = vae_decoder if files.output is None else files.output.build(device)
    preview = None if files.preview is None else files.preview.build(device)
    for built in (output, preview) if files.output is not None else (preview,):
        if time_cache is not None and hasattr(built, "time_cache"):
            built.time_cache = time_cache
    return output, preview
