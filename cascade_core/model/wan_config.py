"""The Wan DiT's configuration, read off its weights' shapes (:meth:`WanConfig.from_state_dict`): Wan2.1 T2V
(1.3B, 14B: 16 latent channels) and Wan2.2 TI2V-5B (dim 3072, ffn 14336, 24 heads x 128, 30 layers, 48 latent
channels in and out: Wan-Video/Wan2.2 ``wan/configs/wan_ti2v_5B.py``), one architecture with these numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..common.constants import LATENT_CHANNELS, TEXT_TOKENS
from ..common.latent_space import LatentSpace, latent_space_of

HEAD_DIM = 128  # every released Wan model (1.3B: 1536/12, 14B: 5120/40, Wan2.2 5B: 3072/24)


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

    @property
    def latent_space(self) -> LatentSpace:
        """The VAE latent space this DiT works in, told by its channels: 16 in and out -> Wan2.1's, 48 -> Wan2.2's
        (:func:`common.latent_space.latent_space_of`). Raises ValueError naming the channels for any other count,
        or for output channels that differ from the input's (an image-to-video or control DiT's)."""
        if self.out_dim != self.in_dim:
            raise ValueError(f"the model takes {self.in_dim} latent channels and makes {self.out_dim}; a text-to-video "
                             f"DiT makes the channels it takes")
        return latent_space_of(self.in_dim)

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
