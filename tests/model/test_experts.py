"""The Wan2.2-A14B expert pair (model.experts) on tiny random configs of the real architecture (CPU, fp32): the
expert of a segment by its timestep (the boundary is the high expert's), a KV pool per expert, the clean pass
through both, the shared text K/V, a batched tick equal to its segments one at a time, block swap, refusals,
and the two-expert diffusers folder (weights.expert_files, weights.checkpoint.load_expert_pair)."""
import json
import os
import re

import pytest
import torch
from conftest import TINY

from cascade_core.model.dit import WanModel
from cascade_core.model.experts import ExpertPair, PairAttention
from cascade_core.model.kv_pool import KVPool, PoolLayout
from cascade_core.weights.checkpoint import load_dit, load_expert_pair
from cascade_core.weights.dit_names import diffusers_name
from cascade_core.weights.safe_io import CheckpointError, save_safetensors

FPB, TPF = 2, 8  # frames a block, tokens a frame (latent 4 x 8 in patches of 2 x 2)
LAYOUT = PoolLayout(frames_per_block=FPB, tokens_per_frame=TPF, total_frames=12, max_in_flight=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny forwards: one thread is faster on a busy machine."""


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))


def latents(n, seed):
    return torch.randn(n, 16, FPB, 4, 8, generator=torch.Generator().manual_seed(seed))


def kv_pool():
    return KVPool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")


def solo(expert, x, t, block, text, pool, clean=False):
    """One segment through one expert over a plain KVPool (the expert's own cache)."""
    return expert(x, torch.full((1, FPB), float(t)), [block * FPB], [text], pool.attention([block], [(block + 1) * FPB],
                                                                                             clean=[clean]))


@pytest.mark.parametrize("t, expert", [(875.0, "high"), (874.99, "low"), (1000.0, "high"), (125.0, "low")])
def test_a_step_runs_on_the_expert_of_its_timestep_and_its_pool_only(experts, embeds, t, expert):
    pair = ExpertPair(*experts)
    pool = pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    x = latents(1, 1)
    v = pair(x, torch.full((1, FPB), t), [0], [pair.encode_prompt(embeds)], pool.attention([0], [FPB]))
    assert pair.forwards == {expert: 1, ("low" if expert == "high" else "high"): 0}
    own = solo(pair.expert(expert), x, t, 0, experts[0].encode_prompt(embeds), ref := kv_pool())
    assert torch.equal(v, own)
    other = "low" if expert == "high" else "high"
    assert torch.equal(pool.pools[expert].k.get(0, 0, FPB * TPF), ref.k.get(0, 0, FPB * TPF))
    assert not pool.pools[other].k.get(0, 0, FPB * TPF).any()  # the other expert's pool is untouched


def test_a_clean_pass_writes_each_experts_own_kv(experts, embeds):
    pair = ExpertPair(*experts)
    pool = pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    x = latents(1, 2)
    pair(x, torch.zeros(1, FPB), [0], [pair.encode_prompt(embeds)], pool.attention([0], [FPB], clean=[True]))
    assert pair.forwards == {"high": 1, "low": 1}
    text = experts[0].encode_prompt(embeds)  # the high expert's text K/V serve both (the reference)
    for name, expert in zip(("high", "low"), experts):
        solo(expert, x, 0, 0, text, ref := kv_pool(), clean=True)
        for layer in range(TINY.num_layers):
            assert torch.equal(pool.pools[name].k.get(layer, 0, FPB * TPF), ref.k.get(layer, 0, FPB * TPF))
            assert torch.equal(pool.pools[name].v.get(layer, 0, FPB * TPF), ref.v.get(layer, 0, FPB * TPF))
    assert not torch.equal(pool.pools["high"].k.get(1, 0, FPB * TPF), pool.pools["low"].k.get(1, 0, FPB * TPF))


def test_text_kv_are_the_high_experts_unless_each_keeps_its_own(experts, embeds):
    x, t = latents(1, 3), 500.0  # a low-noise step
    for shared, text_of in ((True, experts[0]), (False, experts[1])):
        pair = ExpertPair(*experts, shared_text=shared)
        pool = pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
        v = pair(x, torch.full((1, FPB), t), [0], [pair.encode_prompt(embeds)], pool.attention([0], [FPB]))
        assert torch.equal(v, solo(experts[1], x, t, 0, text_of.encode_prompt(embeds), kv_pool()))


def test_a_batched_tick_equals_its_segments_one_at_a_time(experts, embeds):
    """A tick of a clean pass, a low step and a high step (one forward per expert) == one pair forward each,
    oldest first, over a copy of the same pools."""
    pair = ExpertPair(*experts)
    text = pair.encode_prompt(embeds)
    pools = [pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
             for _ in range(2)]
    for b in range(3):  # history: blocks 0..2 finished, through both experts
        for pool in pools:
            pair(latents(1, 10 + b), torch.zeros(1, FPB), [b * FPB], [text],
                 pool.attention([b], [(b + 1) * FPB], clean=[True]))
    blocks, x = [3, 4, 5], latents(3, 20)
    t = torch.tensor([[0.0] * FPB, [750.0] * FPB, [985.5] * FPB])
    ends = [(b + 1) * FPB for b in blocks]
    pair.forwards = {"high": 0, "low": 0}
    context = pools[0].attention(blocks, ends, clean=[True, False, False])
    batched = pair(x, t, [b * FPB for b in blocks], [text] * 3, context)
    assert pair.forwards == {"high": 1, "low": 1} and context.extra == 1
    one = torch.cat([pair(x[i:i + 1], t[i:i + 1], [b * FPB], [text], pools[1].attention([b], [ends[i]], clean=[i == 0]))
                     for i, b in enumerate(blocks)])
    assert (batched[1:] - one[1:]).abs().max() <= 1e-5  # a clean pass's velocity is not used


def test_the_idle_expert_streamed_from_host_memory_changes_nothing(experts, embeds):
    x, t = latents(2, 4), torch.tensor([[985.5] * FPB, [631.6] * FPB])

    def run(pair):
        pool = pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
        text = pair.encode_prompt(embeds)
        return pair(x, t, [0, FPB], [text, text], pool.attention([0, 1], [FPB, 2 * FPB]))

    resident = run(ExpertPair(*experts))
    swapped = ExpertPair(WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1))
    swapped.swap_blocks("cpu", TINY.num_layers)
    assert swapped.high.swap is not None and swapped.low.swap is not None
    assert torch.equal(run(swapped), resident)


def test_bad_pairs_and_contexts_are_refused(experts, embeds):
    wide = WanModel.random(type(TINY)(dim=96, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32), seed=0)
    with pytest.raises(ValueError, match="differ in dim"):
        ExpertPair(experts[0], wide)
    for boundary in (0, 1000, 875.5, float("nan")):
        with pytest.raises(ValueError, match="whole timestep"):
            ExpertPair(*experts, boundary=boundary)
    pair = ExpertPair(*experts)
    pool = pair.kv_pool(LAYOUT, TINY.num_layers, TINY.num_heads, TINY.head_dim, torch.float32, "cpu")
    with pytest.raises(ValueError, match="one device"):
        pool.attention([0, 1], [FPB, 2 * FPB], local=[0])
    with pytest.raises(ValueError, match="re-cache"):
        pool.recache_attention(FPB)
    with pytest.raises(TypeError, match="PairPool"):
        pair(latents(1, 0), torch.zeros(1, FPB), [0], [pair.encode_prompt(embeds)], kv_pool().attention([0], [FPB]))
    with pytest.raises(TypeError, match="ExpertPair.forward"):
        experts[0](latents(1, 0), torch.zeros(1, FPB), [0], [experts[0].encode_prompt(embeds)],
                   pool.attention([0], [FPB]))
    assert isinstance(pool.clean_attention(0, FPB), PairAttention)


# ---- the two-expert diffusers folder ---------------------------------------------------------------

def write_pipeline(root, models, index=None, halves=("transformer", "transformer_2")):
    """A diffusers pipeline folder: each half's weights under diffusers names, its config.json, model_index.json."""
    os.makedirs(root, exist_ok=True)
    for name, model in zip(halves, models):
        sd = {diffusers_name(k): v for k, v in model.state_dict().items()}
        save_safetensors(sd, os.path.join(root, name, "diffusion_pytorch_model.safetensors"))
        with open(os.path.join(root, name, "config.json"), "w") as f:
            json.dump({"_class_name": "WanTransformer3DModel", "num_attention_heads": TINY.num_heads}, f)
    if index is not None:
        with open(os.path.join(root, "model_index.json"), "w") as f:
            json.dump(index, f)
    return root


def test_a_two_expert_folder_loads_both_halves_and_its_boundary(experts, tmp_path):
    root = write_pipeline(str(tmp_path / "CausalWan2.2-T2V-A14B"), experts,
                          {"_class_name": "WanPipeline", "boundary_ratio": 0.9, "transformer": ["diffusers", "W"],
                           "transformer_2": ["diffusers", "W"]})
    high, low, boundary, note = load_expert_pair(root, dtype=torch.float32)
    for (sd, info), model in zip((high, low), experts):
        assert info.config == TINY and sd.keys() == model.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert boundary == 900 and "model_index.json" in note
    os.remove(os.path.join(root, "model_index.json"))  # a transformer_2/ folder says it alone; the boundary assumed
    assert load_expert_pair(root, dtype=torch.float32)[2:] == (875, "boundary timestep 875 (assumed: FastVideo's "
                                                                    "causal Wan2.2-A14B config)")


def test_one_half_alone_or_a_missing_half_is_refused_in_one_line(experts, tmp_path):
    root = write_pipeline(str(tmp_path / "pair"), experts, {"boundary_ratio": 0.875})
    for path, words in ((os.path.join(root, "transformer"), "one expert (high-noise)"),
                        (os.path.join(root, "transformer_2"), "one expert (low-noise)"), (root, "holds two experts")):
        with pytest.raises(CheckpointError, match=re.escape(words)) as err:
            load_dit(path, dtype=torch.float32)
        assert "\n" not in str(err.value) and str(err.value).startswith(os.path.basename(path) + ":")
    half = write_pipeline(str(tmp_path / "half"), experts[:1], {"boundary_ratio": 0.875, "transformer_2": ["x", "y"]})
    with pytest.raises(CheckpointError, match="without transformer_2/"):
        load_expert_pair(half)
    bad = write_pipeline(str(tmp_path / "bad"), experts, {"boundary_ratio": 1.5})
    with pytest.raises(CheckpointError, match="boundary_ratio 1.5"):
        load_expert_pair(bad)
    plain = write_pipeline(str(tmp_path / "plain"), experts[:1], None)  # a one-transformer folder: not a pair
    assert load_dit(os.path.join(plain, "transformer"), dtype=torch.float32)[1].config == TINY
