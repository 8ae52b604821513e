"""A core ComfyUI ``VAE`` as the sampler uses it: its weights checked to be the Wan2.1 VAE (for the streaming
decoder), images encoded by it (a start image, Krea Realtime's re-encoded context frames), its bytes."""
from __future__ import annotations

import warnings

import torch

from cascade_core.video.latents import raw_to_normalized


def vae_weights(vae):
    """(state dict, dtype) of a core VAE that holds the Wan2.1 VAE; checked without allocating anything."""
    if vae is None:
        return None
    from cascade_core.video.vae import WanVAEDecoder

    get_sd = getattr(vae, "get_sd", None)
    if get_sd is None:
        raise ValueError(f"vae: expected a core VAE (VAELoader), got {type(vae).__name__}")
    channels = getattr(vae, "latent_channels", 16)
    if channels != 16:
        raise ValueError(f"vae: this VAE has {channels} latent channels; Block Cascade needs the Wan2.1 VAE "
                         f"(16 channels, e.g. wan_2.1_vae.safetensors)")
    sd = get_sd()
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    try:
        with warnings.catch_warnings():  # loading into meta tensors checks names and shapes, copies nothing
            warnings.simplefilter("ignore")
            WanVAEDecoder.from_state_dict(sd, dtype=dtype, device="meta", source="vae")
    except Exception as exc:  # noqa: BLE001 - any mismatch means: not a Wan2.1 VAE
        reason = getattr(exc, "reason", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ValueError(f"vae: not a usable Wan2.1 VAE: {reason} (use wan_2.1_vae.safetensors; LightVAE, LightTAE "
                         f"and taew2_1 go through Load Video Decoder (Block Cascade) to the decoder inputs)") from None
    return sd, dtype


def encode_image(vae, pixels: torch.Tensor, what: str) -> torch.Tensor:
    """Raw latents [1, 16, 1, H/8, W/8] (float32, CPU) of one image [1, H, W, 3] in 0..1, encoded by the
    core ``vae`` (the latent distribution's mean). Raises ValueError (naming ``what``) when the VAE
    gives another shape."""
    raw = vae.encode(pixels)
    want = [1, 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8]
    if not torch.is_tensor(raw) or list(raw.shape) != want:
        got = list(raw.shape) if torch.is_tensor(raw) else type(raw).__name__
        raise ValueError(f"vae: encoding {what} gave {got}, expected {want} (a Wan2.1 VAE)")
    return raw.float().cpu()


def encode_start_image(vae, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The raw latents [1, 16, 1, height/8, width/8] (float32, CPU) of a start image: the batch's first
    image [H, W, C] of ``image`` [B, H, W, C] in 0..1, scaled to cover width x height and centre-cropped
    (core ``common_upscale``, bilinear), its first three channels encoded by :func:`encode_image`."""
    import comfy.utils

    pixels = comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    return encode_image(vae, pixels[:, :, :, :3], "the start image")


def context_reencoder(vae, decoder):
    """Krea Realtime's context re-encoder (:class:`cascade_core.video.reencode.ContextReencoder`) from a core
    ``vae``: frames decoded by ``decoder``, the run's Wan2.1 decoder (its weights shared; the re-encoder
    keeps its own causal state and stream), encoded by the core VAE itself (ComfyUI's own encoder, as
    for a start image)."""
    from cascade_core.video.reencode import ContextReencoder

    def encode(frame: torch.Tensor) -> torch.Tensor:  # [1, 3, 1, H, W] in -1..1 -> normalised [1, 16, 1, h, w]
        pixels = (frame[:, :, 0].movedim(1, -1).float() + 1) / 2  # [1, H, W, 3] in 0..1
        return raw_to_normalized(encode_image(vae, pixels, "a frame of the context"))

    return ContextReencoder(decoder, encode)


def vae_bytes(weights, reencodes: bool) -> int:
    """Bytes of the decoder's weights, counted twice for a context re-encoder (a second decode beside
    the frames', sharing the weights; it encodes with the core VAE, which ComfyUI places)."""
    if weights is None:
        return 0
    sd, dtype = weights
    elem = torch.empty((), dtype=dtype).element_size()
    decoder = sum(t.numel() for k, t in sd.items() if k.startswith(("decoder.", "conv2.")))
    return decoder * elem * (2 if reencodes else 1)
