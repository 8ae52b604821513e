"""The tick loop's exactness on tiny random configs of the real architecture (CPU, fp32): P1 equals a plain
sequential loop written here, a batched tick equals its pairs one at a time, prompt switches, fold-clean."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, counted
from oracles import (
    MaskedAttention,
    frame_mask,
    noise_after_step,
    noise_levels,
    renoised,
    starting_noise,
    x0_from_velocity,
)

from cascade_core.model.kv_pool import KVPool, PoolLayout
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame
TOKENS_PER_FRAME = (H // 8 // 2) * (W // 8 // 2)




def plain_sequential_loop(model, embeds, blocks, fpb, seed, steps=(1000, 750, 500, 250), shift=5.0,
                          context_noise=0.0, channels=16, spatial=8, width=W, height=H):
    """The reference algorithm with a naive growing cache (torch.cat), written independently; its noise
    is drawn by the documented rule (tests/oracles.py), not by the engine's helpers. ``channels``/``spatial``:
    the latent space's (Wan2.1: 16 and 8; Wan2.2: 48 and 16), for a ``width`` x ``height`` video."""
    ts, sigmas = noise_levels(steps, shift)
    text = model.encode_prompt(embeds)
    committed = [[] for _ in range(model.cfg.num_layers)]  # per layer: list of (k, v) of clean blocks

    class Growing:
        def __init__(self):
            self.last = {}

        def __call__(self, layer, q, k, v):
            ks = torch.cat([c[0] for c in committed[layer]] + [k[0]])
            vs = torch.cat([c[1] for c in committed[layer]] + [v[0]])
            self.last[layer] = (k[0], v[0])
            tr = lambda z: z.unsqueeze(0).transpose(1, 2)
            return F.scaled_dot_product_attention(tr(q[0]), tr(ks), tr(vs)).transpose(1, 2)

    noise = starting_noise(seed, (1, channels, blocks * fpb, height // spatial, width // spatial))
    out = []
    for b in range(blocks):
        x = noise[:, :, b * fpb:(b + 1) * fpb]
        for j in range(len(steps)):
            v = model(x, torch.full((1, fpb), float(ts[j])), [b * fpb], [text], Growing())
            x0 = x0_from_velocity(x, v, sigmas[j])
            if j + 1 < len(steps):
                x = renoised(x0, sigmas[j + 1], noise_after_step(seed, b, j, x0.shape))
        ctx = Growing()
        model(x0, torch.full((1, fpb), float(context_noise)), [b * fpb], [text], ctx)
        for layer in range(model.cfg.num_layers):
            committed[layer].append(ctx.last[layer])
        out.append(x0)
    return torch.cat(out, 2)


@pytest.mark.parametrize("context_noise", [0.0, 100.0])
def test_p1_equals_plain_sequential_loop(model, prompt, context_noise):
    cfg = CascadeConfig(frames_per_block=2, parallel=1, context_noise=context_noise)
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=3, width=W, height=H, seed=7)
    expected = plain_sequential_loop(model, prompt, 3, 2, seed=7, context_noise=context_noise)
    assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()


def test_context_noise_measurably_changes_what_later_blocks_see(model, prompt):
    """The oracle's clean pass at t=100 instead of t=0 changes the K/V later blocks attend to, so the
    comparison above would notice an engine that ignored context_noise."""
    clean = plain_sequential_loop(model, prompt, 3, 2, seed=7)
    noisy = plain_sequential_loop(model, prompt, 3, 2, seed=7, context_noise=100.0)
    assert torch.equal(clean[:, :, :2], noisy[:, :, :2])  # block 0 sees no earlier clean pass
    assert (clean[:, :, 2:] - noisy[:, :, 2:]).abs().max() > 1e-3


def test_batched_tick_equals_pairs_one_at_a_time(model, prompt):
    """Three in-flight blocks at different stages in ONE forward == one forward each, oldest first."""
    fpb = 2
    layout = PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=12, max_in_flight=3)
    text = model.encode_prompt(prompt)
    g = torch.Generator().manual_seed(5)
    # history: blocks 0..2 committed
    pool = KVPool(layout, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    for b in range(3):
        xb = torch.randn(1, 16, fpb, H // 8, W // 8, generator=g)
        model(xb, torch.zeros(1, fpb), [b * fpb], [text], pool.attention([b], [(b + 1) * fpb]))
    blocks = [3, 4, 5]
    x = torch.randn(3, 16, fpb, H // 8, W // 8, generator=g)
    t = torch.tensor([[0.0] * fpb, [625.0] * fpb, [937.5] * fpb])  # clean pass, step 3, step 1
    solo_pool = KVPool(layout, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    solo_pool.k.copy_(pool.k), solo_pool.v.copy_(pool.v)  # KVStore.copy_
    solo_pool.stored_end = pool.stored_end
    ends = [(b + 1) * fpb for b in blocks]
    batched = model(x, t, [b * fpb for b in blocks], [text] * 3, pool.attention(blocks, ends))
    solo = torch.cat([model(x[i:i + 1], t[i:i + 1], [b * fpb], [text], solo_pool.attention([b], [ends[i]]))
                      for i, b in enumerate(blocks)])
    assert (batched - solo).abs().max() <= 1e-5


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_every_level_is_deterministic_and_finite(model, prompt, attention):
    results = {}
    for p in range(1, 6):
        cfg = CascadeConfig(frames_per_block=2, parallel=p, attention=attention if p > 1 else "causal")  # P1: none
        a = generate(model, PromptSchedule.single(prompt), cfg, blocks=4, width=W, height=H, seed=11)
        b = generate(model, PromptSchedule.single(prompt), cfg, blocks=4, width=W, height=H, seed=11)
        assert torch.equal(a.latents, b.latents)
        assert torch.isfinite(a.latents).all()
        results[p] = a
    ref = results[1].latents
    # the first block never sees a noisy predecessor under causal visibility (batching with other
    # segments changes only the float rounding of its matrix products)
    if attention == "causal":
        for p in range(2, 6):
            assert (results[p].latents[:, :, :2] - ref[:, :, :2]).abs().max() <= 1e-5
    # cascading changes later blocks (it is an approximation), but by a bounded amount
    for p in range(2, 6):
        dev = float((results[p].latents - ref).norm() / ref.norm())
        assert 0 < dev < 0.5
    assert results[5].ticks == 4 + 4 and results[1].ticks == 4 * 5


def test_bidirectional_tick_equals_masked_oracle(model, prompt):
    """A bidirectional tick: each in-flight block also sees the newer in-flight blocks' current K/V."""
    fpb = 2
    layout = PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=6, max_in_flight=3)
    pool = KVPool(layout, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    text = model.encode_prompt(prompt)
    x = torch.randn(3, 16, fpb, H // 8, W // 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([[833.0] * fpb, [937.5] * fpb, [1000.0] * fpb])
    out = model(x, t, [0, 2, 4], [text] * 3, pool.attention([0, 1, 2], [6, 6, 6]))
    full = model(torch.cat(x.unbind(0), 1)[None], t.reshape(1, -1), [0], [text],
                 MaskedAttention(frame_mask(range(6), lambda fq, fk: True, TOKENS_PER_FRAME)))
    assert (torch.cat(out.unbind(0), 1)[None] - full).abs().max() <= 1e-5


# ---- prompts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 3, 5])
def test_prompt_switch_changes_nothing_before_its_block_and_adds_no_forward(model, prompt, parallel):
    other = torch.randn(9, TINY.text_dim, generator=torch.Generator().manual_seed(4))
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel)
    one, n_one = counted(model, lambda: generate(model, PromptSchedule.single(prompt), cfg, blocks=5, width=W,
                                                 height=H, seed=2))
    two, n_two = counted(model, lambda: generate(model, PromptSchedule([(0, prompt), (3, other)]), cfg, blocks=5,
                                                 width=W, height=H, seed=2))
    assert n_one == n_two == one.forwards == two.forwards
    assert torch.equal(one.latents[:, :, :6], two.latents[:, :, :6])  # blocks 0..2
    assert not torch.equal(one.latents[:, :, 6:8], two.latents[:, :, 6:8])  # block 3 follows the new prompt


@pytest.mark.parametrize("window,sink,flashblock", [(None, 0, "off"), (6, 2, "off"), (None, 0, "reuse")])
def test_folded_clean_pass_gives_the_p1_result_in_fewer_forwards(model, prompt, window, sink, flashblock):
    run = dict(blocks=5, width=W, height=H, seed=3)
    base = dict(frames_per_block=2, window=window, sink=sink, flashblock=flashblock)
    plain = generate(model, PromptSchedule.single(prompt), CascadeConfig(**base), **run)
    folded = generate(model, PromptSchedule.single(prompt), CascadeConfig(**base, fold_clean=True), **run)
    assert (plain.latents - folded.latents).abs().max() <= 1e-5
    assert (plain.forwards, folded.forwards) == (5 * 5, 5 * 4 + 1)
