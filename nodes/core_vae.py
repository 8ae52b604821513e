"""A core ComfyUI ``VAE`` as the sampler uses it: its weights checked to be the VAE of the run's latent space (the
Wan2.1 VAE, or the Wan2.2 VAE for a Wan2.2 model such as LongLive 2.0) for the streaming decoder, images encoded by
it (a start image, Krea Realtime's re-encoded context frames), its bytes.

A core VAE tells its latent space by ``latent_channels`` (ComfyUI's ``comfy.sd.VAE``: 16 for the Wan2.1 VAE, 48 for
the Wan2.2 VAE, which ComfyUI loads with its original names: ``comfy/sd.py``, the ``decoder.upsamples.0.upsamples.0``
test), read duck-typed (16 when it has none); its ``encode`` gives the raw latents (the distribution's mean).
"""
from __future__ import annotations

import warnings

import torch

from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS, LatentSpace, latent_space_of
from cascade_core.video.latents import raw_to_normalized


def vae_space(vae) -> LatentSpace:
    """The latent space of a core VAE, by its ``latent_channels`` (16 when it has none). Raises ValueError naming the
    channels for a VAE of neither Wan space (an image VAE, ...)."""
    channels = getattr(vae, "latent_channels", WAN21_LATENTS.channels)
    try:
        return latent_space_of(int(channels), "vae: this VAE")
    except (TypeError, ValueError):
        raise ValueError(f"vae: this VAE has {channels} latent channels; Block Cascade needs the Wan2.1 VAE "
                         f"(16 channels, e.g. wan_2.1_vae.safetensors) or, for a Wan2.2 model, the Wan2.2 VAE "
                         f"(48 channels, wan2.2_vae.safetensors)") from None


def _decoder_class(space: LatentSpace):
    from cascade_core.video.vae import WanVAEDecoder
    from cascade_core.video.vae22 import Wan22VAEDecoder

    return Wan22VAEDecoder if space == WAN22_LATENTS else WanVAEDecoder


def vae_weights(vae, latent_space: LatentSpace = WAN21_LATENTS):
    """(state dict, dtype) of a core VAE that holds the VAE of ``latent_space`` (the run's: the Wan2.1 VAE by
    default); checked without allocating anything. Raises ValueError, one line: a VAE of the other space names both
    (:func:`common.latent_space.check_decoder_space`), one that is not the VAE says why."""
    if vae is None:
        return None
    from cascade_core.common.latent_space import check_decoder_space

    get_sd = getattr(vae, "get_sd", None)
    if get_sd is None:
        raise ValueError(f"vae: expected a core VAE (VAELoader), got {type(vae).__name__}")
    space = vae_space(vae)
    check_decoder_space(latent_space, space, f"vae: this VAE ({space.channels} latent channels)")
    sd = get_sd()
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    try:
        with warnings.catch_warnings():  # loading into meta tensors checks names and shapes, copies nothing
            warnings.simplefilter("ignore")
            _decoder_class(space).from_state_dict(sd, dtype=dtype, device="meta", source="vae")
    except Exception as exc:  # noqa: BLE001 - any mismatch means: not that VAE
        reason = getattr(exc, "reason", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        which = ("use wan2.2_vae.safetensors" if space == WAN22_LATENTS else
                 "use wan_2.1_vae.safetensors; LightVAE, LightTAE and taew2_1 go through Load Video Decoder (Block "
                 "Cascade) to the decoder inputs")
        raise ValueError(f"vae: not a usable {space.name} VAE: {reason} ({which})") from None
    return sd, dtype


def vae_decoder(weights, latent_space: LatentSpace, device: torch.device, time_cache: str = "wan"):
    """The streaming decoder of a core VAE's weights (:func:`vae_weights`, checked for ``latent_space``) on
    ``device``: the Wan2.1 VAE's (its window rule ``time_cache``, shared with a re-encoded frame's decode) or the
    Wan2.2 VAE's (:class:`cascade_core.video.vae22.Wan22VAEDecoder`)."""
    sd, dtype = weights
    decoder = _decoder_class(latent_space).from_state_dict(sd, dtype=dtype, device=device, source="vae")
    if hasattr(decoder, "time_cache"):  # the Wan2.1 decoder's window rule (Krea's where the family's code decodes)
        decoder.time_cache = time_cache
    return decoder


def encode_image(vae, pixels: torch.Tensor, what: str, latent_space: LatentSpace = WAN21_LATENTS) -> torch.Tensor:
    """Raw latents [1, C, 1, H/s, W/s] (float32, CPU; C, s: ``latent_space``'s, Wan2.1 16 and 8) of one image
    [1, H, W, 3] in 0..1, encoded by the core ``vae`` (the latent distribution's mean). Raises ValueError (naming
    ``what``) when the VAE gives another shape."""
    raw = vae.encode(pixels)
    s = latent_space.spatial
    want = [1, latent_space.channels, 1, pixels.shape[1] // s, pixels.shape[2] // s]
    if not torch.is_tensor(raw) or list(raw.shape) != want:
        got = list(raw.shape) if torch.is_tensor(raw) else type(raw).__name__
        raise ValueError(f"vae: encoding {what} gave {got}, expected {want} (a {latent_space.name} VAE)")
    return raw.float().cpu()


def encode_start_image(vae, image: torch.Tensor, width: int, height: int,
                       latent_space: LatentSpace = WAN21_LATENTS) -> torch.Tensor:
    """The raw latents [1, C, 1, height/s, width/s] (float32, CPU) of a start image: the batch's first
    image [H, W, C] of ``image`` [B, H, W, C] in 0..1, scaled to cover width x height and centre-cropped
    (core ``common_upscale``, bilinear), its first three channels encoded by :func:`encode_image`."""
    import comfy.utils

    pixels = comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    return encode_image(vae, pixels[:, :, :, :3], "the start image", latent_space)


def start_image_inputs(vae, image: torch.Tensor, held: bool, plan) -> tuple:
    """(before, given, context, extra) of a run that starts with ``image`` (the sampler's ``start_image``), encoded
    by the core ``vae`` in the ``plan``'s latent space: a context prefix of one latent frame (``before``: raw,
    ``given`` = ``context``: normalised; ``extra`` empty), or, ``held`` (LongLive 2.0), block 0's frame 0:
    ``extra`` = {"image_latent": normalised [1, C, 1, h, w]} (:func:`cascade_core.sampling.loop.generate`), the rest
    None (the outputs hold no frame before block 0)."""
    space = plan.latent_space
    raw = encode_start_image(vae, image, plan.width, plan.height, space)
    if held:
        return None, None, None, {"image_latent": space.to_normalized(raw)}
    given = space.to_normalized(raw)
    return raw, given, given, {}


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
