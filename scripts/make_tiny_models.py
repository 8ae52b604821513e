"""Write tiny test models into a ComfyUI models folder (random weights, for tests only).

    python scripts/make_tiny_models.py MODELS_DIR [--vae tiny|full|none]

Writes
  MODELS_DIR/diffusion_models/block_cascade_tiny_dit.safetensors
      a Wan2.1 T2V DiT with canonical (ComfyUI) parameter names: width 128 (one 128-wide head, so
      ComfyUI's own UNETLoader takes it too), 2 layers, text width 4096,
      so real umt5-xxl-shaped prompt embeddings fit;
  MODELS_DIR/prompt_embeds/block_cascade_tiny_{a,b}.safetensors
      two [16, 4096] prompt embeddings (what the Prompt Embeddings from File node reads);
  MODELS_DIR/vae/block_cascade_tiny_vae.safetensors (needs cascade_core.vae)
      --vae tiny: a Wan2.1 VAE decoder of small width (for cascade_core's decoder; ComfyUI's own
      VAELoader only builds the full-width Wan2.1 VAE, so it cannot load this one);
      --vae full: the decoder at Wan2.1's real width (96), random, stored in fp16 (about 0.15 GB),
      which ComfyUI's VAELoader loads (it warns that the encoder weights are missing).
Prints one JSON line with the files written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cascade_core.model import WanConfig, WanModel  # noqa: E402
from cascade_core.safe_io import save_safetensors  # noqa: E402

TINY_DIT = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096)
DIT_NAME = "block_cascade_tiny_dit.safetensors"
EMBEDS_NAMES = ("block_cascade_tiny_a.safetensors", "block_cascade_tiny_b.safetensors")
VAE_NAME = "block_cascade_tiny_vae.safetensors"
EMBED_TOKENS = 16


def tiny_dit_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    model = WanModel.random(TINY_DIT, seed=seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def tiny_embeds(seed: int, tokens: int = EMBED_TOKENS, width: int = 4096) -> torch.Tensor:
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def vae_state_dict(width: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Wan2.1 VAE decoder state dict (canonical names) from cascade_core.vae."""
    from cascade_core.vae import WanVAEDecoder

    torch.manual_seed(seed)
    sd = WanVAEDecoder(dim=96 if width == "full" else 8).state_dict()  # torch's default initialisation
    dtype = torch.float16 if width == "full" else torch.float32
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write(models_dir: str, vae_width: str = "tiny") -> dict[str, str]:
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
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models_dir", help="a ComfyUI models folder (e.g. ComfyUI/models)")
    p.add_argument("--vae", choices=("tiny", "full", "none"), default="tiny")
    args = p.parse_args(argv)
    print(json.dumps(write(args.models_dir, args.vae)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
