"""The numbers every part of the engine shares, each written once.

The Wan2.1 latent space (the VAE of Wan2.1, read by every block-causal family the pack runs): 16
channels; a latent pixel is 8 x 8 video pixels; a latent frame after the first is 4 video frames.
The text context: umt5-xxl embeddings of at most 512 tokens, padded with zeros to 512 (the reference's
``text_len``)."""
from __future__ import annotations

import torch

LATENT_CHANNELS = 16
PIXELS_PER_LATENT = 8  # video pixels per latent pixel, in height and in width (the VAE's spatial factor)
FRAMES_PER_LATENT = 4  # video frames per latent frame after the first (the VAE's temporal factor)
TEXT_TOKENS = 512  # prompt tokens the DiT attends to (shorter prompts are padded with zeros)
GIB = 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # names of the compute dtypes
