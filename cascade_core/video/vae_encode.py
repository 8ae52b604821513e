"""Pixels into the DiT's latents: the Wan2.1 VAE encoder (diffusers' ``AutoencoderKLWan``), and the
start image or video frames it encodes.

Guarantees:
- The encoder is read from the same files as the decoder of :mod:`video.vae` (the original Wan / ComfyUI
  layout as ``.safetensors`` or a ``.pt`` read with ``weights_only``, a diffusers folder or file, a
  common key prefix), through :func:`weights.safe_io.read_weights`; nothing in them runs. Original names
  are converted by diffusers' own ``convert_wan_vae_to_diffusers``; the model is sized from the
  weights and loaded strictly. A file that is not a complete 16-channel Wan2.1 VAE raises
  :class:`CheckpointError` naming the file (a decoder-only file: the encoder half is missing).
- :func:`encode` returns normalised (DiT-space) latents: the latent distribution's mode (its mean),
  then :func:`video.latents.raw_to_normalized`. Video frame 0 gives latent frame 0, every 4 later frames one more.
- The Wan2.2 VAE (48 channels, 16 x 16 pixels a latent pixel; ``Wan2.2_VAE.pth``, ComfyUI's
  ``wan2.2_vae.safetensors``, the diffusers ``Wan2.2-TI2V-5B-Diffusers/vae``) is read by the same
  :func:`load_encoder`, which tells the space by the quant convolution's channels (:func:`stored_encoder_space`):
  diffusers' ``AutoencoderKLWan`` in the Wan2.2 configuration (:data:`WAN22_VAE_CONFIG`), its encoder half only
  (the decoder half is :mod:`video.vae22`'s); original names mapped by :func:`weights.vae_names.wan22_encoder_name`.
  :func:`encode` normalises with the space of the model it is given (:func:`encoder_latent_space`): Wan2.2's mean and
  std (:data:`common.latent_space.WAN22_LATENTS`) for it.
- Images and video frames are scaled to cover width x height keeping their aspect ratio, then
  centre-cropped (Pillow's ``ImageOps.fit``; core ComfyUI's ``common_upscale(..., "center")`` rule);
  RGB, alpha dropped; pixels on the [-1, 1] scale. 16-bit and 32-bit images are scaled to 8 bits,
  not clipped (:func:`load_image`).
- :class:`StreamEncoder` encodes a video chunk by chunk as it arrives (video-to-video), each chunk as one
  whole-video encode would, giving the raw mean (no normalisation).
"""
from __future__ import annotations

import collections
import os
import warnings

import numpy as np
import torch

from ..common.constants import FRAMES_PER_LATENT, LATENT_CHANNELS
from ..common.latent_space import WAN22_LATENTS, LatentSpace, check_decoder_space, latent_space_of
from ..common.messages import first_line
from ..weights.safe_io import CheckpointError, read_weights
from ..weights.vae_names import (
    DIFFUSERS_ANCHOR,
    DIFFUSERS_ENCODER_ANCHOR,
    DIFFUSERS_ENCODER_PARTS,
    DIFFUSERS_PARTS,
    ENCODER_ANCHOR,
    ENCODER_PARTS,
    check_weight_names,
    component_weights,
    decoder_kind,
    wan22_encoder_name,
)
from .vae import WanVAEDecoder

ORIGINAL_DECODER_PARTS = ("decoder.", "conv2.")


def video_frames_for(latent_frames: int) -> int:
    """Video frames that encode into ``latent_frames`` latent frames: 1 + 4(K - 1)."""
    return 1 + FRAMES_PER_LATENT * (latent_frames - 1)


def _complete_weights(sd, source: str) -> dict[str, torch.Tensor]:
    """Every tensor of a complete Wan2.1 VAE in ``sd`` under diffusers' names (prefix removed)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = component_weights(sd, ENCODER_ANCHOR, ENCODER_PARTS + ORIGINAL_DECODER_PARTS, source)
    if original is not None:
        return convert_wan_vae_to_diffusers(original)
    weights = component_weights(sd, DIFFUSERS_ENCODER_ANCHOR, DIFFUSERS_ENCODER_PARTS + DIFFUSERS_PARTS, source)
    if weights is not None and weights[DIFFUSERS_ENCODER_ANCHOR].dim() == 5 and DIFFUSERS_ANCHOR in weights:
        return weights
    raise CheckpointError(source, "holds only the decoder half of the Wan2.1 VAE; the encoder half "
                                  f"({ENCODER_ANCHOR.split('.')[0]}.*) that encodes images and videos is missing: "
                                  "use the complete VAE (wan_2.1_vae.safetensors, Wan2.1_VAE.pth or the "
                                  "diffusers vae/ folder)")


def load_encoder(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", latent_space: LatentSpace | None = None):
    """diffusers' ``AutoencoderKLWan`` (eval, no gradients, ``dtype`` on ``device``) with the weights of
    the complete Wan2.1 VAE, or the Wan2.2 VAE's encoder half, in ``path`` (a file or a diffusers folder, see
    :func:`weights.safe_io.read_weights`); see :func:`encoder_from_state_dict`."""
    path = os.fspath(path)
    return encoder_from_state_dict(read_weights(path)[0], dtype=dtype, device=device, source=path,
                                   latent_space=latent_space)


def encoder_from_state_dict(sd, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                            source: str = "state dict", latent_space: LatentSpace | None = None):
    """diffusers' ``AutoencoderKLWan`` (eval, no gradients, ``dtype`` on ``device``) with the weights of
    the complete Wan2.1 VAE in ``sd`` (any layout :func:`load_encoder` reads), its base width read from
    them; the weights are copied. A Wan2.2 VAE (48 channels, :func:`stored_encoder_space`) gives its encoder
    (:func:`wan22_encoder_from_state_dict`). ``latent_space``: the run's, when given (a VAE of another space
    is refused naming both, ValueError). Raises :class:`CheckpointError` naming ``source`` when ``sd`` is not a
    16-channel Wan2.1 VAE (what it looks like instead, or the missing/unexpected keys) or lacks the
    encoder half."""
    from diffusers import AutoencoderKLWan

    space = stored_encoder_space(sd, source)
    if latent_space is not None and space is not None:
        check_decoder_space(latent_space, space, source)
    if space is WAN22_LATENTS:
        return wan22_encoder_from_state_dict(sd, dtype=dtype, device=device, source=source)
    dim = WanVAEDecoder.from_state_dict(sd, device="meta", source=source).dim  # a Wan2.1 VAE, or why not
    weights = _complete_weights(sd, source)
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=dim)
    check_weight_names(model.state_dict(), weights, source, "VAE")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Frames [1, 3, T, H, W] on the [-1, 1] scale, T = 1 + 4k, H and W multiples of s -> normalised
    latents [1, C, 1 + (T - 1) // 4, H/s, W/s] float32 on ``vae``'s device (a :func:`load_encoder`
    model; C, s: its space's, :func:`encoder_latent_space`: Wan2.1 16 and 8, Wan2.2 48 and 16). Raises ValueError
    for another shape."""
    space = encoder_latent_space(vae)
    shape, s = list(pixels.shape), space.spatial
    if len(shape) != 5 or shape[:2] != [1, 3] or shape[3] % s or shape[4] % s:
        raise ValueError(f"pixels must be [1, 3, T, H, W] with H and W multiples of {s}, got {shape}")
    if shape[2] < 1 or (shape[2] - 1) % FRAMES_PER_LATENT:
        raise ValueError(f"the VAE encodes 1 + 4k frames (1, 5, 9, ...), got {shape[2]}")
    param = next(vae.parameters())
    with torch.inference_mode():
        raw = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return space.to_normalized(raw.float())  # Wan2.1: video.latents.raw_to_normalized


# ---- the Wan2.2 VAE's encoder --------------------------------------------------------------------------------

# diffusers' AutoencoderKLWan configuration of the Wan2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json;
# diffusers scripts/convert_wan_to_diffusers.py ``vae22_diffusers_config``): 48 latent channels, the encoder's input
# the 3 colours patchified 2 x 2 (12 channels, Wan2.2 wan/modules/vae2_2.py:280-297, 525), residual down levels,
# temporal downsampling in levels 1 and 2; ``base_dim`` (160 released) is read from the weights.
WAN22_VAE_CONFIG = dict(z_dim=WAN22_LATENTS.channels, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                        scale_factor_spatial=WAN22_LATENTS.spatial, scale_factor_temporal=WAN22_LATENTS.temporal,
                        temperal_downsample=[False, True, True], latents_mean=list(WAN22_LATENTS.mean),
                        latents_std=list(WAN22_LATENTS.std))
_QUANT = {ENCODER_ANCHOR: "conv1.weight", DIFFUSERS_ENCODER_ANCHOR: "quant_conv.weight"}  # [2C, 2C, 1, 1, 1]


def stored_encoder_space(sd, source: str = "state dict") -> LatentSpace | None:
    """The latent space of the VAE whose encoder half is in ``sd`` (either layout, any common prefix), told by its
    quant convolution ([2C, 2C, 1, 1, 1]: C = 16 Wan2.1, 48 Wan2.2); None when ``sd`` holds no encoder half or one of
    another channel count (the Wan2.1 loader then says what is wrong). Raises :class:`CheckpointError` naming
    ``source`` for the Wan2.2 VAE's decoder half alone (the encoder that encodes images is missing)."""
    for anchor, parts in ((ENCODER_ANCHOR, ENCODER_PARTS), (DIFFUSERS_ENCODER_ANCHOR, DIFFUSERS_ENCODER_PARTS)):
        weights = component_weights(sd, anchor, parts, source)
        quant = None if weights is None else weights.get(_QUANT[anchor])
        if quant is not None and quant.dim() == 5:
            try:
                return latent_space_of(quant.shape[0] // 2, source)
            except ValueError:
                return None
    if decoder_kind(sd, source) == "wan2.2_vae":
        raise CheckpointError(source, "holds only the decoder half of the Wan2.2 VAE; the encoder half (encoder.*) "
                                      "that encodes images and videos is missing: use the complete VAE "
                                      "(Wan2.2_VAE.pth, wan2.2_vae.safetensors or the diffusers vae/ folder)")
    return None


def _wan22_encoder_weights(sd, source: str) -> dict[str, torch.Tensor]:
    """The Wan2.2 VAE's encoder half and quant convolution in ``sd`` under diffusers' names (prefix removed)."""
    original = component_weights(sd, ENCODER_ANCHOR, ENCODER_PARTS, source)
    if original is not None:
        return {wan22_encoder_name(k): v for k, v in original.items()}
    weights = component_weights(sd, DIFFUSERS_ENCODER_ANCHOR, DIFFUSERS_ENCODER_PARTS, source)
    if weights is None:
        raise CheckpointError(source, "holds no encoder half of the Wan2.2 VAE (encoder.*)")
    return weights


def wan22_encoder_from_state_dict(sd, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                                  source: str = "state dict"):
    """diffusers' ``AutoencoderKLWan`` in the Wan2.2 configuration (:data:`WAN22_VAE_CONFIG`; eval, no gradients,
    ``dtype`` on ``device``) with the encoder half of the Wan2.2 VAE in ``sd`` (original or diffusers names, any
    common prefix), its base width read from ``encoder.conv1`` ([dim, 12, 3, 3, 3]), loaded strictly; the weights are
    copied. The decoder half is left out (``decoder`` and ``post_quant_conv`` are None: :mod:`video.vae22` decodes),
    which saves its 555M parameters at the released widths. Raises :class:`CheckpointError` naming ``source`` for
    missing, unexpected or mis-shaped encoder keys."""
    from diffusers import AutoencoderKLWan

    weights = _wan22_encoder_weights(sd, source)
    first = weights.get(DIFFUSERS_ENCODER_ANCHOR)
    if first is None or first.dim() != 5:
        raise CheckpointError(source, f"the Wan2.2 VAE's first encoder convolution ({ENCODER_ANCHOR}) is missing or "
                                      f"not 5-D")
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=first.shape[0], **WAN22_VAE_CONFIG)
    model.decoder = model.post_quant_conv = None  # the encoder half only
    check_weight_names(model.state_dict(), weights, source, "Wan2.2 VAE encoder")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def encoder_latent_space(vae) -> LatentSpace:
    """The latent space a :func:`load_encoder` model encodes into, by its ``config.z_dim`` (diffusers' latent
    channels: 16 Wan2.1, 48 Wan2.2; 16 when it has none). Raises ValueError for another count."""
    return latent_space_of(int(getattr(getattr(vae, "config", None), "z_dim", LATENT_CHANNELS)), "the VAE encoder")


class StreamEncoder:
    """The Wan2.1 VAE encoder (a :func:`load_encoder` / :func:`encoder_from_state_dict` model, diffusers'
    ``AutoencoderKLWan``) fed chunk by chunk: the first call takes 5 frames (encoded as frame 0, then 1..4),
    later calls 4 at a time (more: each 4 in turn), the causal convolutions' feature cache kept between calls,
    so the chunks encode exactly as one whole-video encode would. Pixels [1, 3, n, H, W] on the [-1, 1] scale
    (any dtype and device: moved to the encoder's) -> the raw latent mean [1, 16, 2 or n/4, H/8, W/8] float32,
    no latent normalisation (StreamDiffusionV2's ``stream_encode(..., scale=None)``,
    chenfengxu714/StreamDiffusionV2 wan_base/modules/vae.py:546-583; its video-to-video feeds that to the DiT).
    A new StreamEncoder starts a new stream (the cache is cleared at its first call)."""

    def __init__(self, vae):
        self.vae, self.started = vae, False

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        param = next(vae.parameters())
        x = pixels.to(param.device, param.dtype)
        with torch.inference_mode():
            if not self.started:
                vae.clear_cache()
                parts, self.started = [x[:, :, :1], x[:, :, 1:]], True
            else:
                parts = [x[:, :, i:i + FRAMES_PER_LATENT] for i in range(0, x.shape[2], FRAMES_PER_LATENT)]
            out = []
            for part in parts:
                vae._enc_conv_idx = [0]
                out.append(vae.encoder(part, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
            return vae.quant_conv(torch.cat(out, 2)).chunk(2, dim=1)[0].float()


def eight_bit(image):
    """A Pillow image with integer ("I;16*", "I": 0..65535) or float ("F": 0..1) grey levels -> mode "L"
    on the 0..255 scale (rounded, clipped); any other image unchanged."""
    from PIL import Image

    if image.mode == "F":
        scale = 255.0
    elif image.mode == "I" or image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        return image
    levels = np.asarray(image).astype(np.float32) * scale
    return Image.fromarray(np.clip(np.nan_to_num(levels).round(), 0, 255).astype(np.uint8))


def _fitted(image, width: int, height: int) -> np.ndarray:
    """A Pillow image -> uint8 [height, width, 3]: RGB (alpha dropped; see :func:`eight_bit`), covering
    the size, centre-cropped."""
    from PIL import Image, ImageOps

    rgb = eight_bit(image).convert("RGB")
    return np.asarray(ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5)))


def _to_pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames [H, W, 3] -> [1, 3, T, H, W] float32 on the [-1, 1] scale."""
    video = torch.from_numpy(np.stack(frames)).float() / 127.5 - 1.0  # [T, H, W, 3]
    return video.permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """A still image (PNG, JPEG, ...; EXIF orientation applied) -> [1, 3, 1, height, width] on the
    [-1, 1] scale. 16-bit and 32-bit integer grey levels (modes "I;16", "I") are read on the 16-bit
    scale 0..65535 and float ones ("F") on 0..1, then scaled to 8 bits. An image of more pixels than
    Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels by default,
    over 5 times a 4096 x 4096 frame) is refused from its header, before any pixel is decoded, and without
    Pillow's warning. Raises :class:`CheckpointError` naming the file when it is missing, unreadable
    or too large."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    limit = Image.MAX_IMAGE_PIXELS
    why = f"Pillow's decompression-bomb limit is {limit} pixels; scale it down"
    try:
        with warnings.catch_warnings():  # past the limit it is refused below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if limit is not None and image.width * image.height > limit:
                raise CheckpointError(path, f"too large: {image.width} x {image.height} pixels ({why})")
            frame = _fitted(ImageOps.exif_transpose(image), width, height)
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses it without giving the size
        raise CheckpointError(path, f"too large: more than {2 * limit} pixels ({why})") from None
    except CheckpointError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable image ({first_line(exc)})") from None
    return _to_pixels([frame])


def load_video(path: str, width: int, height: int, latent_frames: int | None = None) -> torch.Tensor:
    """The last 1 + 4(K - 1) frames of a video file (MP4, WebM, ...; K = ``latent_frames``, or the
    largest such count the file holds when it is shorter; every 1 + 4k of its last frames when None)
    -> [1, 3, 1 + 4(K - 1), height, width] on the [-1, 1] scale, each frame scaled and cropped as
    :func:`load_image`. Raises :class:`CheckpointError` naming the file when it is missing, unreadable
    or holds no video frames, ValueError for ``latent_frames`` < 1."""
    import av

    if latent_frames is not None and latent_frames < 1:
        raise ValueError(f"latent frames must be >= 1, got {latent_frames}")
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    keep = collections.deque(maxlen=None if latent_frames is None else video_frames_for(latent_frames))
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as exc:
        raise CheckpointError(path, f"not a readable video ({first_line(exc)})") from None
    with container:
        if not container.streams.video:
            raise CheckpointError(path, "holds no video stream")
        try:
            for frame in container.decode(video=0):
                keep.append(_fitted(frame.to_image(), width, height))
        except (av.FFmpegError, OSError) as exc:
            raise CheckpointError(path, f"not a readable video ({first_line(exc)})") from None
    if not keep:
        raise CheckpointError(path, "holds no video frames")
    count = video_frames_for(1 + (len(keep) - 1) // FRAMES_PER_LATENT)
    return _to_pixels(list(keep)[len(keep) - count:])
