"""The Wan2.1 DiT's configuration, read off its weights' shapes (:meth:`WanConfig.from_state_dict`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..common.constants import LATENT_CHANNELS, TEXT_TOKENS

HEAD_DIM = 128  # every released Wan2.1 model (1.3B: 1536/12, 14B: 5120/40)


@dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = LATENT_CHANNELS
    out_dim: int = LATENT_CHANNELS
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = TEXT_TOKENS
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], num_heads: int | None = None) -> "WanConfig":
        """Read the configuration off Wan parameter shapes (canonical names, no prefix).

        The head count is not stored in the weights: Wan uses 128-wide heads, so it is dim // 128
        unless given (tiny test models may use other head widths).
        """
        w = sd["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
        dim, in_dim, patch = w.shape[0], w.shape[1], tuple(w.shape[2:])
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        heads = num_heads or max(1, dim // HEAD_DIM)
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"width {dim} does not split into {heads} heads of even size")
        return cls(
            dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            num_heads=heads,
            num_layers=layers,
            in_dim=in_dim,
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
            text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            patch_size=patch,
            qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
            cross_attn_norm="blocks.0.norm3.weight" in sd,
        )
