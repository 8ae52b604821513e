"""Exactness of the engine on tiny random configs of the real architecture (CPU, fp32)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, counted
from oracles import noise_after_step, noise_levels, renoised, starting_noise, x0_from_velocity

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.kv_pool import KVPool, PoolLayout
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate, step_noise
from cascade_core.sampling.schedule import CascadeSchedule, FlowSchedule

W, H = 64, 32  # pixels -> latent 4 x 8 -> 2 x 4 = 8 tokens per frame


# ---- an oracle written independently of the pool: one full sequence with an explicit mask ---------

class MaskedAttention:
    def __init__(self, mask):
        self.mask = mask  # [L, L] bool, True = attend

    def __call__(self, layer, q, k, v):
        tr = lambda x: x.transpose(1, 2)  # [n, L, heads, hd] -> [n, heads, L, hd]
        return tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v), attn_mask=self.mask))


def frame_mask(block_of_frame, sees):
    """Token mask from a frame-level rule sees(query_frame, key_frame)."""
    frames = len(block_of_frame)
    m = torch.tensor([[sees(fq, fk) for fk in range(frames)] for fq in range(frames)])
    tpf = (H // 8 // 2) * (W // 8 // 2)
    return m.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)


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
    full = model(x, t, [0], [text], MaskedAttention(frame_mask(range(fpb * blocks), block_causal(fpb, window, sink))))
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

def plain_sequential_loop(model, embeds, blocks, fpb, seed, steps=(1000, 750, 500, 250), shift=5.0,
                          context_noise=0.0):
    """The reference algorithm with a naive growing cache (torch.cat), written independently; its noise
    is drawn by the documented rule (tests/oracles.py), not by the engine's helpers."""
    ts, sigmas = noise_levels(steps, shift)
    text = model.encode_prompt(embeds)
    committed = [[] for _ in range(TINY.num_layers)]  # per layer: list of (k, v) of clean blocks

    class Growing:
        def __init__(self):
            self.last = {}

        def __call__(self, layer, q, k, v):
            ks = torch.cat([c[0] for c in committed[layer]] + [k[0]])
            vs = torch.cat([c[1] for c in committed[layer]] + [v[0]])
            self.last[layer] = (k[0], v[0])
            tr = lambda z: z.unsqueeze(0).transpose(1, 2)
            return F.scaled_dot_product_attention(tr(q[0]), tr(ks), tr(vs)).transpose(1, 2)

    noise = starting_noise(seed, (1, 16, blocks * fpb, H // 8, W // 8))
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
        for layer in range(TINY.num_layers):
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


def test_step_noise_follows_its_documented_rule():
    like = torch.empty(1, 16, 2, 4, 8)
    draws = {}
    for seed, block, step in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (7, 3, 2), (2**40, 9, 3)]:
        got = step_noise(seed, block, step, like)
        assert torch.equal(got, noise_after_step(seed, block, step, like.shape)), (seed, block, step)
        draws[seed, block, step] = got
    keys = list(draws)  # another block, step or seed: other noise
    assert all(not torch.equal(draws[a], draws[b]) for i, a in enumerate(keys) for b in keys[i + 1:])


def test_flow_schedule_matches_reference_numbers():
    f = FlowSchedule()
    assert torch.allclose(f.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.allclose(f.sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625]), atol=1e-5)
    with pytest.raises(ValueError, match="strictly decrease"):
        FlowSchedule((500, 750))
    with pytest.raises(ValueError, match="0..1000"):
        FlowSchedule((1001, 500))
    with pytest.raises(ValueError, match="0..1000"):
        FlowSchedule((500, -1))


@pytest.mark.parametrize("warp", [True, False])
def test_a_last_step_0_is_t_0_at_the_tables_smallest_sigma(warp):
    # krea-ai/realtime-video: 5 steps linspace(1000, 0, 5) read through the table padded with t = 0; the
    # sigma of t = 0 is the nearest entry of the 1000-entry table, s = 0.001: 5 * 0.001 / (1 + 4 * 0.001)
    f = FlowSchedule((1000, 750, 500, 250, 0), shift=5.0, warp=warp)
    want = [1000.0, 937.5, 833.3333, 625.0, 0.0] if warp else [1000.0, 750.0, 500.0, 250.0, 0.0]
    assert torch.allclose(f.timesteps, torch.tensor(want), atol=1e-3)
    assert f.timesteps[-1].item() == 0.0
    assert f.sigmas[-1].item() == pytest.approx(0.005 / 1.004, rel=1e-5)


def test_without_clean_passes_a_block_ends_at_its_last_step():
    plan = CascadeSchedule(blocks=3, steps=5, clean_pass=False)
    assert [t.pairs for t in plan.ticks()] == [((b, s),) for b in range(3) for s in range(5)]
    assert not any(plan.is_clean(b, s) for b in range(3) for s in range(6))
    with pytest.raises(ValueError, match="1..5"):
        CascadeSchedule(blocks=3, steps=5, parallel=6, clean_pass=False)


# ---- the cascade ------------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [1, 2, 3, 4, 5])
def test_schedule_ticks(parallel):
    plan = CascadeSchedule(blocks=7, steps=4, parallel=parallel)
    ticks = plan.ticks()
    seen = {}
    for tick in ticks:
        assert 1 <= len(tick.pairs) <= parallel
        assert [b for b, _ in tick.pairs] == sorted({b for b, _ in tick.pairs})
        for b, stage in tick.pairs:
            seen.setdefault(b, []).append((tick.index, stage))
    for b, runs in seen.items():  # every block runs stages 0..4 in consecutive ticks, in order
        assert [s for _, s in runs] == list(range(5))
        assert [i for i, _ in runs] == list(range(runs[0][0], runs[0][0] + 5))
    assert sorted(seen) == list(range(7))
    if parallel == 1:
        assert len(ticks) == 7 * 5
    if parallel == 5:  # one block emitted per tick in steady state
        assert len(ticks) == 7 + 4 and max(len(t.pairs) for t in ticks) == 5


def test_schedule_rejects_bad_levels():
    with pytest.raises(ValueError, match="1..5"):
        CascadeSchedule(blocks=3, steps=4, parallel=6)
    with pytest.raises(ValueError, match="at least 1 block"):
        CascadeSchedule(blocks=-1, steps=4)


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
    solo_pool.k.copy_(pool.k), solo_pool.v.copy_(pool.v)
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
        cfg = CascadeConfig(frames_per_block=2, parallel=p, attention=attention)
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
                 MaskedAttention(frame_mask(range(6), lambda fq, fk: True)))
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


def test_prompt_schedule_validation():
    e = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="empty"):
        PromptSchedule([]).validate(3)
    with pytest.raises(ValueError, match="beyond the video"):
        PromptSchedule([(0, e), (3, e)]).validate(3)
    with pytest.raises(ValueError, match="expects 4096"):
        PromptSchedule([(0, torch.zeros(4, 768))]).validate(3, 4096)


# ---- the model's interface --------------------------------------------------------------------

def test_config_is_read_from_weights_and_tensors_are_shared(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = WanModel.from_state_dict(sd, num_heads=4)
    assert loaded.cfg == TINY
    assert loaded.blocks[1].ffn[0].weight.data_ptr() == sd["blocks.1.ffn.0.weight"].data_ptr()
    expected_names = {"patch_embedding.weight", "text_embedding.0.weight", "time_embedding.2.bias",
                      "time_projection.1.weight", "blocks.0.self_attn.norm_q.weight",
                      "blocks.1.cross_attn.o.bias", "blocks.0.norm3.weight", "blocks.1.ffn.2.weight",
                      "blocks.0.modulation", "head.head.weight", "head.modulation"}
    assert expected_names <= set(sd)


def test_real_shapes_are_read_from_weights():
    for dim, heads, layers, ffn in ((1536, 12, 30, 8960), (5120, 40, 40, 13824)):
        with torch.device("meta"):
            sd = WanModel(WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers)).state_dict()
        cfg = WanConfig.from_state_dict(sd)
        assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.head_dim) == (dim, heads, layers, ffn, 128)
        assert math.prod(cfg.patch_size) == 4


def test_folded_clean_pass_schedule():
    plan = CascadeSchedule(blocks=4, steps=4, parallel=1, fold_clean=True)
    ticks = plan.ticks()
    assert len(ticks) == 4 * 4 + 1 and plan.max_in_flight == 2
    shared = [t.pairs for t in ticks if len(t.pairs) == 2]
    assert shared == [((b, 4), (b + 1, 0)) for b in range(3)]  # clean pass of b with step 0 of b+1
    assert CascadeSchedule(blocks=4, steps=4, parallel=3, fold_clean=True).entry(1) == 1  # P>1: unchanged


@pytest.mark.parametrize("window,sink,flashblock", [(None, 0, "off"), (6, 2, "off"), (None, 0, "reuse")])
def test_folded_clean_pass_gives_the_p1_result_in_fewer_forwards(model, prompt, window, sink, flashblock):
    run = dict(blocks=5, width=W, height=H, seed=3)
    base = dict(frames_per_block=2, window=window, sink=sink, flashblock=flashblock)
    plain = generate(model, PromptSchedule.single(prompt), CascadeConfig(**base), **run)
    folded = generate(model, PromptSchedule.single(prompt), CascadeConfig(**base, fold_clean=True), **run)
    assert (plain.latents - folded.latents).abs().max() <= 1e-5
    assert (plain.forwards, folded.forwards) == (5 * 5, 5 * 4 + 1)


@pytest.mark.parametrize("window, sink, fpb", [(2, 0, 3), (5, 3, 3), (3, 1, 3), (0, 0, 1)])
def test_one_window_check_says_the_same_on_every_path(window, sink, fpb):
    """The pool layout and the run's config refuse a window that cannot hold the sink and a block with
    one and the same message; a window of exactly sink + one block is accepted by both."""
    expected = (f"window must hold the sink and one block: at least sink + one block = {sink + fpb} latent "
                f"frames (sink {sink}, blocks of {fpb}), got {window}")
    with pytest.raises(ValueError) as layout:
        PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=30, window=window, sink=sink)
    with pytest.raises(ValueError) as config:
        CascadeConfig(frames_per_block=fpb, window=window, sink=sink).validate()
    assert str(layout.value) == str(config.value) == expected
    PoolLayout(frames_per_block=fpb, tokens_per_frame=8, total_frames=30, window=sink + fpb, sink=sink)
    CascadeConfig(frames_per_block=fpb, window=sink + fpb, sink=sink).validate()
