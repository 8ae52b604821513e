"""Write tiny test models into a ComfyUI models folder (random weights, for tests only).

    python scripts/make_tiny_models.py MODELS_DIR [--vae tiny|full|light|none]
        [--tiny-decoder none|taew2_1|lighttaew2_1] [--wan22]

Writes
  MODELS_DIR/diffusion_models/block_cascade_tiny_dit.safetensors
      a Wan2.1 T2V DiT with canonical (ComfyUI) parameter names: width 128 (one 128-wide head, so
      ComfyUI's own UNETLoader takes it too), 2 layers, text width 4096,
      so real umt5-xxl-shaped prompt embeddings fit;
  MODELS_DIR/prompt_embeds/block_cascade_tiny_{a,b}.safetensors
      two [16, 4096] prompt embeddings (what the Prompt Embeddings from File node reads);
  MODELS_DIR/vae/block_cascade_tiny_vae.safetensors (needs cascade_core.video.vae)
      a complete Wan2.1 VAE (encoder and decoder, Wan2.1's temporal layout, the key names of the
      released Wan2.1_VAE.pth / ComfyUI's wan_2.1_vae.safetensors), random:
      --vae tiny: base width 8 (for cascade_core's decoder; ComfyUI's own VAELoader only builds the
      full-width Wan2.1 VAE, so it cannot load this one);
      --vae full: Wan2.1's real width (96), stored in fp16 (about 0.25 GB), which ComfyUI's VAELoader loads;
      --vae light: LightVAE's layout (lightvaew2_1: every width a quarter of Wan2.1's, base 24), fp32;
  MODELS_DIR/vae_approx/block_cascade_tiny_{taew2_1,lighttaew2_1}.safetensors (--tiny-decoder, off by default)
      a complete TAEHV-layout tiny decoder (encoder and decoder, the key names of taew2_1 / lighttaew2_1),
      random, narrow; stored as released: taew2_1 in fp16, lighttaew2_1 in fp32.
With --wan22 also (Wan2.2 latents: 48 channels, 16 x 16 pixels a latent pixel, 24 fps)
  MODELS_DIR/diffusion_models/block_cascade_tiny_wan22_dit.safetensors
      a DiT of Wan2.2-TI2V-5B's layout (LongLive 2.0's: 48 latent channels in and out, canonical names),
      otherwise the tiny Wan2.1 DiT's widths (family longlive-2 assumed for it; or --family longlive-2-2step);
  MODELS_DIR/vae/block_cascade_tiny_wan22_vae.safetensors
      a complete Wan2.2 VAE (encoder and decoder, the diffusers layout of Wan2.2-TI2V-5B-Diffusers/vae in one
      file), random, base width 8: the decoder of --vae and Load Video Decoder, the encoder of --image.
Prints one JSON line with the files written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cascade_core.model.dit import WanConfig, WanModel  # noqa: E402
from cascade_core.weights.safe_io import save_safetensors  # noqa: E402

TINY_DIT = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096)
TINY_WAN22_DIT = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096, in_dim=48, out_dim=48)
DIT_NAME = "block_cascade_tiny_dit.safetensors"
WAN22_DIT_NAME = "block_cascade_tiny_wan22_dit.safetensors"
WAN22_VAE_NAME = "block_cascade_tiny_wan22_vae.safetensors"
WAN22_VAE_WIDTH = 8  # the encoder's and the decoder's base width (160 and 256 when released)
EMBEDS_NAMES = ("block_cascade_tiny_a.safetensors", "block_cascade_tiny_b.safetensors")
VAE_NAME = "block_cascade_tiny_vae.safetensors"
TINY_DECODER_NAME = "block_cascade_tiny_{kind}.safetensors"  # kind: taew2_1 or lighttaew2_1
EMBED_TOKENS = 16


def tiny_dit_state_dict(seed: int = 0, cfg: WanConfig = TINY_DIT) -> dict[str, torch.Tensor]:
    """A random DiT of ``cfg`` (default the tiny Wan2.1 one; :data:`TINY_WAN22_DIT` the Wan2.2 one), canonical
    names, every tensor contiguous."""
    model = WanModel.random(cfg, seed=seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def wan22_vae_state_dict(seed: int = 0, width: int = WAN22_VAE_WIDTH) -> dict[str, torch.Tensor]:
    """A random complete Wan2.2 VAE (encoder and decoder) of base width ``width``, fp32, in the diffusers layout
    (``AutoencoderKLWan`` in the pack's Wan2.2 configuration, :data:`cascade_core.video.vae_encode.WAN22_VAE_CONFIG`):
    what :func:`cascade_core.video.frames.load_decoder` decodes with and the image encoder reads."""
    from diffusers import AutoencoderKLWan

    from cascade_core.video.vae_encode import WAN22_VAE_CONFIG

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=width, decoder_base_dim=width, **WAN22_VAE_CONFIG)
    return {k: v.float().contiguous() for k, v in vae.state_dict().items()}


def tiny_embeds(seed: int, tokens: int = EMBED_TOKENS, width: int = 4096) -> torch.Tensor:
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def vae_encoder_shapes(dim: int, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Wan2.1 VAE's encoder half (``encoder.*`` and the quant conv ``conv1.*``),
    original names, for base width ``dim`` (96 when released) and ``z_dim`` latent channels.

    Encoder: conv1 (3 -> d), then levels of widths d, 2d, 4d, 4d, each two residual blocks and (but the
    last) a stride-2 spatial downsample, which for levels 1 and 2 also halves time (a (3,1,1) conv of
    stride 2); the middle (residual, attention, residual at 4d); the head 4d -> 2 * z_dim (mean and log
    variance); then ``conv1`` (1x1x1, 2 * z_dim).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, kernel: tuple[int, ...]) -> None:
        shapes[f"{name}.weight"] = (cout, cin, *kernel)
        shapes[f"{name}.bias"] = (cout,)

    def residual(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cin, cout, (3, 3, 3))
        shapes[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cin, cout, (1, 1, 1))

    conv("encoder.conv1", 3, dim, (3, 3, 3))
    widths = (dim, dim, 2 * dim, 4 * dim, 4 * dim)
    index = 0
    for level, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
        residual(f"encoder.downsamples.{index}", cin, cout)
        residual(f"encoder.downsamples.{index + 1}", cout, cout)
        index += 2
        if level < 3:
            conv(f"encoder.downsamples.{index}.resample.1", cout, cout, (3, 3))
            if level > 0:  # Wan2.1 halves time at the second and third downsample
                conv(f"encoder.downsamples.{index}.time_conv", cout, cout, (3, 1, 1))
            index += 1
    d4 = 4 * dim
    residual("encoder.middle.0", d4, d4)
    shapes["encoder.middle.1.norm.gamma"] = (d4, 1, 1)
    conv("encoder.middle.1.to_qkv", d4, 3 * d4, (1, 1))
    conv("encoder.middle.1.proj", d4, d4, (1, 1))
    residual("encoder.middle.2", d4, d4)
    shapes["encoder.head.0.gamma"] = (d4, 1, 1, 1)
    conv("encoder.head.2", d4, 2 * z_dim, (3, 3, 3))
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    return shapes


def vae_state_dict(width: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random complete Wan2.1 VAE state dict (canonical names): the decoder of cascade_core.video.vae with
    torch's default initialisation, and the encoder of :func:`vae_encoder_shapes` (weights
    ~ N(0, 1/fan_in), biases 0, norm gains 1). Base width 8 ("tiny", fp32), 96 ("full", fp16) or 24
    ("light": LightVAE's, fp32 as lightvaew2_1 is released)."""
    from cascade_core.video.vae import WanVAEDecoder

    dim = {"full": 96, "light": 24}.get(width, 8)
    torch.manual_seed(seed)
    sd = dict(WanVAEDecoder(dim=dim).state_dict())
    for name, shape in vae_encoder_shapes(dim).items():
        if name.endswith("gamma"):
            sd[name] = torch.ones(shape)
        elif len(shape) == 1:
            sd[name] = torch.zeros(shape)
        else:
            sd[name] = torch.randn(shape) * math.prod(shape[1:]) ** -0.5
    dtype = torch.float16 if width == "full" else torch.float32
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def taehv_encoder_shapes(width: int = 64, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the TAEHV encoder (``encoder.N.*``; taew2_1 and lighttaew2_1 keep it; width 64
    when released; lightx2v ``models/video_encoders/hf/tae.py:188-207``). Layers: 0 conv 3 -> w; 2, 7, 12
    time pools (a 1x1 conv of stride*w -> w, no bias; strides 2, 2, 1); 3, 8, 13 stride-2 3x3 convs (no
    bias); 4-6, 9-11, 14-16 memory blocks (convs 2w -> w, w -> w, w -> w); 17 conv w -> z_dim."""
    shapes: dict[str, tuple[int, ...]] = {"encoder.0.weight": (width, 3, 3, 3), "encoder.0.bias": (width,),
                                          "encoder.17.weight": (z_dim, width, 3, 3), "encoder.17.bias": (z_dim,)}
    for pool, stride in ((2, 2), (7, 2), (12, 1)):
        shapes[f"encoder.{pool}.conv.weight"] = (width, width * stride, 1, 1)
        shapes[f"encoder.{pool + 1}.weight"] = (width, width, 3, 3)
        for block in range(pool + 2, pool + 5):
            for i, cin in ((0, 2 * width), (2, width), (4, width)):
                shapes[f"encoder.{block}.conv.{i}.weight"] = (width, cin, 3, 3)
                shapes[f"encoder.{block}.conv.{i}.bias"] = (width,)
    return shapes


def tiny_decoder_state_dict(kind: str = "lighttaew2_1", width: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random complete TAEHV-layout state dict of ``kind`` "taew2_1" or "lighttaew2_1" (the same names and
    shapes): the decoder of cascade_core.video.taew with torch's default initialisation, the encoder of
    :func:`taehv_encoder_shapes` (weights ~ N(0, 1/fan_in), biases 0). Widths "tiny" (decoder 16, 8, 8, 8;
    encoder 8) or "full" (the released 256, 128, 64, 64 and 64). Stored as released: taew2_1 in fp16,
    lighttaew2_1 in fp32."""
    from cascade_core.video.taew import TAEW2_1_WIDTHS, TinyWanDecoder

    if kind not in ("taew2_1", "lighttaew2_1"):
        raise ValueError(f"kind {kind!r}: taew2_1 or lighttaew2_1")
    widths, encoder_width = (TAEW2_1_WIDTHS, 64) if width == "full" else ((16, 8, 8, 8), 8)
    torch.manual_seed(seed)
    sd = dict(TinyWanDecoder(widths).state_dict())
    for name, shape in taehv_encoder_shapes(encoder_width).items():
        sd[name] = torch.zeros(shape) if len(shape) == 1 else torch.randn(shape) * math.prod(shape[1:]) ** -0.5
    dtype = torch.float32 if kind == "lighttaew2_1" else torch.float16
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write(models_dir: str, vae_width: str = "tiny", tiny_decoder: str = "none", wan22: bool = False
          ) -> dict[str, str]:
    """Write the files of the module docstring under ``models_dir``; {what: path} of each file written."""
    written = {}
    dit = os.path.join(models_dir, "diffusion_models", DIT_NAME)
    save_safetensors(tiny_dit_state_dict(), dit)
    written["dit"] = dit
    for i, name in enumerate(EMBEDS_NAMES):
        path = os.path.join(models_dir, "prompt_embeds", name)
        save_safetensors({"embeds": tiny_embeds(100 + i)}, path)
        written[f"embeds_{i}"] = path
    if vae_width != "none":
        path = os.path.join(models_dir, "vae", VAE_NAME)
        save_safetensors(vae_state_dict(vae_width), path)
        written["vae"] = path
    if tiny_decoder != "none":
        path = os.path.join(models_dir, "vae_approx", TINY_DECODER_NAME.format(kind=tiny_decoder))
        save_safetensors(tiny_decoder_state_dict(tiny_decoder), path)
        written["tiny_decoder"] = path
    if wan22:
        path = os.path.join(models_dir, "diffusion_models", WAN22_DIT_NAME)
        save_safetensors(tiny_dit_state_dict(cfg=TINY_WAN22_DIT), path)
        written["wan22_dit"] = path
        path = os.path.join(models_dir, "vae", WAN22_VAE_NAME)
        save_safetensors(wan22_vae_state_dict(), path)
        written["wan22_vae"] = path
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models_dir", help="a ComfyUI models folder (e.g. ComfyUI/models)")
    p.add_argument("--vae", choices=("tiny", "full", "light", "none"), default="tiny",
                   help="the complete Wan2.1 VAE written: tiny (narrow, fast), full (the released widths, "
                        "random weights, about 250 MB), light (LightVAE's widths, about 32 MB) or none")
    p.add_argument("--tiny-decoder", choices=("none", "taew2_1", "lighttaew2_1"), default="none",
                   help="also write a narrow random tiny decoder of that kind into vae_approx/")
    p.add_argument("--wan22", action="store_true",
                   help="also write a tiny Wan2.2 DiT (48 latent channels, LongLive 2.0's layout) and a tiny "
                        "complete Wan2.2 VAE")
    args = p.parse_args(argv)
    print(json.dumps(write(args.models_dir, args.vae, args.tiny_decoder, args.wan22)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
