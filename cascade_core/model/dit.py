"""The Wan2.1 text-to-video DiT, shaped for block-causal generation.

Guarantees:
- Parameter names are the original Wan / ComfyUI ones (``patch_embedding``, ``text_embedding.{0,2}``,
  ``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,
  norm_k}``, ``blocks.N.{norm3,ffn.{0,2},modulation}``, ``head.{head,modulation}``), so any Wan2.1 T2V
  state dict loads with no renaming and with ``assign=True`` shares the caller's tensors.
- The configuration (width, heads, layers, FFN width, channels, patch) is read from the weights
  (:meth:`WanConfig.from_state_dict`); nothing here knows a token count, a head count or a depth.
- One forward runs several *segments* (latent blocks) at once, each with its own per-frame timestep
  (through the adaLN modulation), its own RoPE frame offset and its own prompt. Self-attention is
  delegated to a context object (:class:`SelfAttentionContext`), so the same weights serve the KV pool
  of the sampler and the full-sequence masked forward used as the test oracle.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common.transfer import to_device
from .attention import attend
from .block_swap import BlockSwap
from .compiling import compiled_regions
from .fp8 import FP8_DTYPES, prepare_weights, use_stored_layers
from .wan_config import WanConfig


class SelfAttentionContext(Protocol):
    """Where a layer's self-attention keys come from.

    ``q, k, v``: [n, L, heads, head_dim] for n segments of L tokens (RoPE applied to q and k).
    Returns the attention output [n, L, heads, head_dim].
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32 (weight name ``weight``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """q/k/v/o projections with RMS q/k norms; the self- and cross-attention of a Wan block."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))  # [..., dim] -> [..., heads, head_dim]

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of an embedded prompt [1, text_len, dim] -> 2 x [1, heads, text_len, hd]."""
        k = self.split_heads(self.norm_k(self.k(context))).transpose(1, 2)
        v = self.split_heads(self.v(context)).transpose(1, 2)
        return k, v


class Modulation(NamedTuple):
    """A layer's six adaLN modulation tensors, each [n, gf, 1, dim] (one per frame group of a segment), in
    the order of the ``modulation`` parameter's rows: shift, scale and gate of the self-attention's input
    and output, then of the FFN's (diffusers' ``transformer_wan.py`` calls them shift_msa, scale_msa,
    gate_msa, c_shift_msa, c_scale_msa, c_gate_msa)."""

    attn_shift: torch.Tensor
    attn_scale: torch.Tensor
    attn_gate: torch.Tensor
    ffn_shift: torch.Tensor
    ffn_scale: torch.Tensor
    ffn_gate: torch.Tensor


class Block(nn.Module):
    """One DiT layer: modulated self-attention, cross-attention to the prompt, modulated FFN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.cross_attn = Attention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        self.eps = cfg.eps

    def modulations(self, e6: torch.Tensor) -> Modulation:
        """The six adaLN tensors of the timestep embedding e6 [n, gf, 6, dim]."""
        return Modulation(*(self.modulation.unsqueeze(1) + e6).unsqueeze(3).unbind(2))

    def self_attention_inputs(self, h: torch.Tensor, e6: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [n, L, dim] -> q, k, v [n, L, heads, hd] (modulated LayerNorm, RMS q/k norms, RoPE)."""
        m = self.modulations(e6)
        a = self.self_attn
        y = (per_frame(F.layer_norm(h, h.shape[-1:], eps=self.eps), e6) * (1 + m.attn_scale) + m.attn_shift).flatten(1, 2)
        q = apply_rope(a.split_heads(a.norm_q(a.q(y))), cos, sin)
        k = apply_rope(a.split_heads(a.norm_k(a.k(y))), cos, sin)
        return q, k, a.split_heads(a.v(y))

    def after_self_attention(self, h: torch.Tensor, attn: torch.Tensor, e6: torch.Tensor,
                             text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        """Gated residual of the attention output [n, L, heads, hd], then cross-attention and FFN.

        text_k, text_v: [n, heads, text_len, hd], each segment's prompt K/V (a fixed shape whatever
        the prompts, so a compiled region never sees a prompt's identity).
        """
        m = self.modulations(e6)
        h = h + (per_frame(self.self_attn.o(attn.flatten(2)), e6) * m.attn_gate).flatten(1, 2)
        c = self.cross_attn
        q = c.split_heads(c.norm_q(c.q(self.norm3(h) if self.norm3 is not None else h)))
        y = attend(q.transpose(1, 2), text_k, text_v).transpose(1, 2)  # [n, L, heads, hd]
        h = h + c.o(y.flatten(2))
        y = (per_frame(F.layer_norm(h, h.shape[-1:], eps=self.eps), e6) * (1 + m.ffn_scale) + m.ffn_shift).flatten(1, 2)
        return h + (per_frame(self.ffn(y), e6) * m.ffn_gate).flatten(1, 2)


def per_frame(y: torch.Tensor, e6: torch.Tensor) -> torch.Tensor:
    """[n, L, dim] -> [n, gf, L/gf, dim], to broadcast per-frame modulation e6 [n, gf, 6, dim]."""
    return y.unflatten(1, (e6.shape[1], -1))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [n, L, heads, hd] by per-token angles; float32 math, x's dtype out."""
    xp = x.float().unflatten(-1, (-1, 2))  # [n, L, heads, hd/2, 2]
    re, im = xp[..., 0], xp[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), -1).flatten(-2).type_as(x)


class WanModel(nn.Module):
    """Wan2.1 T2V DiT. See the module docstring for what it guarantees."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.head.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}  # see rope()
        self.swap: BlockSwap | None = None  # blocks streamed from host memory (swap_blocks)
        self.compile_layers(False)

    def compile_layers(self, enabled: bool = True, backend: str | Callable = "inductor") -> "WanModel":
        """Compile the two regions of a layer around self-attention (torch.compile).

        Every layer of every model in the process shares the compiled regions (one torch.compile of each
        per backend, :func:`model.compiling.compiled_regions`): the regions take only tensors whose shapes depend on the
        segment count and the video size (prompts enter as gathered [n, heads, text_len, hd] K/V), so
        neither a prompt switch, a new mix of prompts nor a newly built model compiles anything. The
        segment count (blocks in flight) is left to torch's automatic dynamic shapes: the first count
        compiles a static version, a second one a version for every count, so a cascade of any depth
        pays two compilations per video size, not one per depth. Self-attention itself stays eager
        (the KV pool). ``backend``: torch.compile's backend (a name or a callable, e.g. a graph counter
        in tests).
        """
        regions = (Block.self_attention_inputs, Block.after_self_attention)
        self._regions = compiled_regions(regions, backend) if enabled else regions
        self.compiled = enabled
        return self

    def swap_blocks(self, device: torch.device | str, swapped: int) -> "WanModel":
        """Run on ``device`` with the last ``swapped`` blocks' weights in pinned host memory, streamed in as the
        forward reaches them (:class:`model.block_swap.BlockSwap`; 0: every weight moved to ``device``).
        ``self.swap.detach()`` takes them all back to the CPU."""
        if self.swap is not None:
            self.swap.detach()
        if swapped == 0:
            return self.to(device)
        try:
            self.swap = BlockSwap(self, torch.device(device), swapped)
        except BaseException:  # refused or out of memory half-way: nothing stays on the device
            self.to("cpu")
            raise
        return self

    def layers(self):
        """The blocks in order, on the model's device when each runs (streamed in where blocks are swapped)."""
        return iter(self.blocks) if self.swap is None else self.swap.layers()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, num_heads: int | None = None,
                        fast_fp8: bool = False) -> "WanModel":
        """Build a model whose configuration is read from ``sd`` and load it (every key must match).

        The model takes the tensors of ``sd`` as its parameters (no copy); a dtype or device change
        copies only what changes. Pass a copy if the caller's tensors must stay independent.
        Block Linear weights stored fp8 (with ``<layer>.weight_scale`` [out, 1], see
        :func:`model.fp8.prepare_weights`) or as GGUF blocks (:mod:`model.gguf`) become
        :class:`model.fp8.Fp8Linear` / :class:`model.gguf.GGUFLinear` layers and stay so
        (``dtype`` casts only the other floating tensors); ``fast_fp8``: their products run as fp8
        where the GPU can.
        """
        cfg = WanConfig.from_state_dict(sd, num_heads)
        with torch.device("meta"):
            model = cls(cfg)
        use_stored_layers(model, sd, fast_fp8)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() and v.dtype not in FP8_DTYPES
                  and not k.endswith(".weight_scale") else v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        if device is not None:
            model.to(device=device)
        return model.eval().requires_grad_(False)

    def with_weight_dtype(self, weight_dtype: str) -> "WanModel":
        """This model with its block weights stored as ``weight_dtype`` (:data:`model.fp8.WEIGHT_DTYPES`; the
        same model for "default"), on the same device, compiled as it is."""
        if weight_dtype == "default":
            return self
        prepared = prepare_weights(self.state_dict(), self.dtype, weight_dtype)
        return WanModel.from_state_dict(prepared.sd, num_heads=self.cfg.num_heads,
                                        fast_fp8=prepared.fast).compile_layers(self.compiled)

    @classmethod
    def random(cls, cfg: WanConfig, seed: int = 0, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> "WanModel":
        """A model with seeded random weights (tests, benchmarks, the untrained demo).

        Matrix weights ~ N(0, 1/fan_in), modulations ~ N(0, 1/dim), biases ~ N(0, 0.02^2), norms 1,
        so activations stay O(1) at any depth. Drawn on ``device`` (the same seed gives the same
        weights on every machine of that device type) in float32, then rounded to ``dtype`` as each parameter
        (allocated in ``dtype``: a 14B model in bf16 never holds a float32 copy) takes them.
        """
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and name.endswith("weight"):
                    scale = p[0].numel() ** -0.5
                elif name.endswith("modulation"):
                    scale = cfg.dim ** -0.5
                elif name.endswith("bias"):
                    scale = 0.02
                else:  # norm weights
                    p.fill_(1.0)
                    continue
                p.copy_(torch.randn(p.shape, generator=g, device=device) * scale)
        return model.to(dtype).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ---- prompt ----------------------------------------------------------------------------------
    def encode_prompt(self, embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention K/V for one prompt.

        ``embeds``: text-encoder output [L, text_dim] or [1, L, text_dim], L <= text_len. It is padded
        with zeros to text_len and attended in full (no mask), as the reference does.
        """
        cfg = self.cfg
        e = embeds.reshape(-1, embeds.shape[-1]) if embeds.dim() == 3 else embeds
        if e.dim() != 2 or e.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt embeddings must be [L, {cfg.text_dim}], got {list(embeds.shape)}")
        if e.shape[0] > cfg.text_len:
            raise ValueError(f"prompt embeddings have {e.shape[0]} tokens; at most {cfg.text_len} fit")
        padded = e.new_zeros(1, cfg.text_len, cfg.text_dim)
        padded[0, : e.shape[0]] = e
        context = self.text_embedding(to_device(padded, self.device).to(self.dtype))  # [1, text_len, dim]
        return [blk.cross_attn.text_kv(context) for blk in self.layers()]

    # ---- positions -------------------------------------------------------------------------------
    def _axis_frequencies(self) -> list[torch.Tensor]:
        """RoPE frequencies (float64, CPU) of the time, height and width pair groups (see :meth:`rope`)."""
        c = self.cfg.head_dim // 2
        sizes = (c - 2 * (c // 3), c // 3, c // 3)
        return [1.0 / torch.pow(10000.0, torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n)) for n in sizes]

    def shift_frames(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys ``k`` [..., heads, head_dim] RoPE'd at frame position p, re-rotated to p + ``delta``
        (frames; negative moves them earlier): the time pairs turn by delta times their frequency
        (angles in float64, cos/sin in float32, as :meth:`rope`), the height/width pairs stay as they
        are. Returns a new tensor of ``k``'s dtype and shape. Rotations compose, so this equals
        RoPE at p + delta up to float rounding."""
        inv_t = self._axis_frequencies()[0]
        angle = torch.cat((inv_t * delta, torch.zeros(self.cfg.head_dim // 2 - len(inv_t), dtype=torch.float64)))
        cos, sin = (to_device(a.float(), k.device) for a in (angle.cos(), angle.sin()))
        return apply_rope(k, cos, sin)

    def rope(self, frame_starts: Sequence[int], frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, frames*h*w, 1, head_dim/2] (float32) of n segments' token grids (frames, h, w),
        segment i starting at absolute frame ``frame_starts[i]``.

        Head-dim pairs are split into time/height/width groups of c-2(c//3), c//3, c//3 pairs
        (c = head_dim/2), each with frequencies theta^(-2i/d_axis), theta = 10000; the angle of a pair
        is its axis position times its frequency (float64, then cos/sin rounded to float32).
        Memory stays bounded over endless videos: only the last grid size's height/width table and
        the time frequencies are cached (one entry, about 0.5 MB at 832x480); the time rows are
        computed on the device for the frames this forward covers.
        """
        c = self.cfg.head_dim // 2
        key = (h, w, self.device)
        if key not in self._rope_cache:
            inv = self._axis_frequencies()
            ah = torch.outer(torch.arange(h, dtype=torch.float64), inv[1])[:, None].expand(h, w, -1)
            aw = torch.outer(torch.arange(w, dtype=torch.float64), inv[2])[None].expand(h, w, -1)
            ahw = torch.cat((ah, aw), -1).reshape(h * w, c - len(inv[0]))
            self._rope_cache.clear()
            tables = (inv[0], ahw.cos().float(), ahw.sin().float())
            self._rope_cache[key] = tuple(to_device(a, self.device) for a in tables)
        inv_t, cos_hw, sin_hw = self._rope_cache[key]
        lo = min(frame_starts)
        at = torch.outer(torch.arange(lo, max(frame_starts) + frames, dtype=torch.float64, device=self.device), inv_t)
        shape = (len(frame_starts), frames, h * w, -1)

        def table(t: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:  # [frames, ct], [h*w, c-ct] -> [n, L, 1, c]
            rows = torch.stack([t[s - lo:s - lo + frames] for s in frame_starts])  # [n, frames, ct]
            return torch.cat((rows[:, :, None].expand(shape), hw.expand(shape)), -1).flatten(1, 2)[:, :, None]

        return table(at.cos().float(), cos_hw), table(at.sin().float(), sin_hw)

    # ---- forward ---------------------------------------------------------------------------------
    def time_embed(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding (float64, cos then sin) of timesteps t [...] -> [..., dim] via the MLP."""
        half = self.cfg.freq_dim // 2
        pos = t.to(torch.float64).reshape(-1)
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
        s = torch.outer(pos, freqs)
        emb = torch.cat([s.cos(), s.sin()], 1).to(self.dtype)
        return self.time_embedding(emb).unflatten(0, t.shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, frame_starts: Sequence[int],
                prompts: Sequence[list[tuple[torch.Tensor, torch.Tensor]]],
                attention: SelfAttentionContext) -> torch.Tensor:
        """Predict the flow velocity of n segments at once.

        x: [n, in_dim, F, H, W] latents; t: [n, F] timesteps per frame; frame_starts: n absolute frame
        indices (RoPE offset); prompts: n per-layer text K/V lists (from :meth:`encode_prompt`), gathered
        per layer into one [n, heads, text_len, hd] K/V, so one cross-attention call serves every
        segment whatever its prompt. Returns [n, out_dim, F, H, W].
        """
        cfg = self.cfg
        n, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        gf, gh, gw = frames // pt, height // ph, width // pw

        h = self.patch_embedding(x.to(self.dtype))  # [n, dim, gf, gh, gw]
        h = h.flatten(2).transpose(1, 2)  # [n, L, dim], L = gf*gh*gw, frame-major

        e = self.time_embed(t[:, ::pt])  # [n, gf, dim]
        e6 = self.time_projection(e).unflatten(-1, (6, cfg.dim))  # [n, gf, 6, dim]
        cos, sin = self.rope(frame_starts, gf, gh, gw)  # [n, L, 1, hd/2]
        inputs, after = self._regions
        for i, blk in enumerate(self.layers()):
            q, k, v = inputs(blk, h, e6, cos, sin)
            text_k = torch.cat([p[i][0] for p in prompts])  # [n, heads, text_len, hd]
            text_v = torch.cat([p[i][1] for p in prompts])
            h = after(blk, h, attention(i, q, k, v), e6, text_k, text_v)

        shift, scale = (self.head.modulation.unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        y = self.head.head(per_frame(F.layer_norm(h, h.shape[-1:], eps=cfg.eps), e6) * (1 + scale) + shift)  # [n, gf, tpf, p*c]
        # unpatchify: [n, gf, gh*gw, pt*ph*pw*c] -> [n, c, gf*pt, gh*ph, gw*pw]
        y = y.view(n, gf, gh, gw, pt, ph, pw, cfg.out_dim)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, cfg.out_dim, gf * pt, gh * ph, gw * pw)
        return y
