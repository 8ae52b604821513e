"""The KV pool (CPU, fp32, tiny random DiT): a KV-cached block-by-block forward equals one full forward with
the block-causal mask, and the window and sink keep exactly the frames they promise."""

import pytest
import torch
from conftest import TINY
from oracles import MaskedAttention, frame_mask

from cascade_core.model.kv_pool import KVPool, PoolLayout

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame
TOKENS_PER_FRAME = (H // 8 // 2) * (W // 8 // 2)



def block_causal(fpb, window=None, sink=0):
    def sees(fq, fk):
        end = (fq // fpb + 1) * fpb
        if fk >= end:
            return False
        return window is None or fk < sink or fk >= end - (window - sink)
    return sees


def run_cached(model, x, t, fpb, text, window=None, sink=0):
    """Block after block through the KV pool; returns the concatenated outputs."""
    blocks = x.shape[2] // fpb
    layout = PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=x.shape[2], window=window, sink=sink)
    pool = KVPool(layout, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    outs, held = [], []
    for b in range(blocks):
        sl = slice(b * fpb, (b + 1) * fpb)
        pool.make_room(b, b)
        outs.append(model(x[:, :, sl], t[:, sl], [b * fpb], [text], pool.attention([b], [(b + 1) * fpb])))
        held.append(pool.held_frames())
    return torch.cat(outs, 2), held


@pytest.mark.parametrize("window,sink", [(None, 0), (8, 2), (8, 0), (6, 2)])
def test_kv_cached_forward_equals_full_masked_forward(model, prompt, window, sink):
    fpb, blocks = 2, 10 if window else 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, fpb * blocks, H // 8, W // 8, generator=g)
    t = (torch.rand(blocks, generator=g) * 1000).repeat_interleave(fpb)[None]  # own timestep per block
    text = model.encode_prompt(prompt)
    full = model(x, t, [0], [text], MaskedAttention(frame_mask(range(fpb * blocks), block_causal(fpb, window, sink), TOKENS_PER_FRAME)))
    cached, held = run_cached(model, x, t, fpb, text, window, sink)
    assert (full - cached).abs().max() <= 1e-5
    if window:  # the window really dropped frames: later blocks see fewer keys than the video has
        assert len(held[-1]) < fpb * blocks


def test_window_and_sink_keep_exactly_the_specified_frames(model, prompt):
    # 10 blocks of 2 frames, window 4 blocks (8 frames, sink included), sink 1 block (2 frames)
    fpb, window, sink = 2, 8, 2
    x = torch.randn(1, 16, 20, H // 8, W // 8)
    t = torch.zeros(1, 20)
    _, held = run_cached(model, x, t, fpb, model.encode_prompt(prompt), window, sink)
    for b, frames in enumerate(held):
        end = (b + 1) * fpb
        expected = sorted(set(range(min(sink, end))) | set(range(max(0, end - (window - sink)), end)))
        assert frames == expected, (b, frames, expected)
    assert held[-1] == [0, 1, 14, 15, 16, 17, 18, 19]


# ---- P1 equals a plain sequential loop written here ---------------------------------------------
