"""What the one memory estimate counts beyond one model's pool (nothing allocated: shapes only): a Wan2.2 A14B pair's
two KV pools and two experts' weights (placement per expert), LongLive 2.0's pinned scene-cut room, and the text
K/V sets a steered run may add. Each term is checked against bytes worked out here from the shapes (the estimate
adds 20 %, so a difference of two estimates is 1.2 x the term, within int rounding)."""
import dataclasses

import torch

from cascade_core.common.latent_space import WAN22_LATENTS
from cascade_core.model.dit import WanConfig
from cascade_core.sampling.families import family_config
from cascade_core.sampling.memory import blocks_to_swap, cheaper_settings, estimate_run_bytes, placement_words
from cascade_core.sampling.plan import plan_run

A14B_EXPERT = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
FIVE_B = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
GIB = 1024 ** 3


def kv_bytes(c: WanConfig, frames: int, tokens_per_frame: int, elem: int = 2) -> int:
    """K and V of every layer for ``frames`` latent frames."""
    return 2 * c.num_layers * frames * tokens_per_frame * c.dim * elem


def test_a_pair_counts_two_kv_pools_and_says_so():
    run = plan_run(family_config("causal-wan2.2-a14b"), blocks=7, width=832, height=480)
    one, what_one = estimate_run_bytes(run, A14B_EXPERT, torch.bfloat16, 1, 0)
    two, what_two = estimate_run_bytes(run, A14B_EXPERT, torch.bfloat16, 1, 0, experts=2)
    frames = 1 + 3 * 6  # block 0 one latent frame, then blocks of 3; no window: every frame is kept
    pool = kv_bytes(A14B_EXPERT, frames, (480 // 16) * (832 // 16))
    assert abs((two - one) - 1.2 * pool) <= 1  # one more pool, nothing else (activations: one expert at a time)
    assert what_two.startswith(f"KV cache {2 * pool / GIB:.2f} GiB (2 experts' pools), activations")
    assert "experts" not in what_one


def test_two_experts_swap_each_their_blocks():
    block, layers, need = 100, 30, 1000
    weights = 2 * block * layers  # both experts' weights
    assert blocks_to_swap(need + weights, need, weights, block, layers, experts=2) == 0
    # k blocks of each expert through two slots each: 2 (k - 2) blocks' bytes freed
    assert blocks_to_swap(need + weights - 1, need, weights, block, layers, experts=2) == 3
    assert blocks_to_swap(need + weights - 250, need, weights, block, layers, experts=2) == 4
    every = need + weights - 2 * (layers - 2) * block  # all blocks of both: the slots and the rest stay
    assert blocks_to_swap(every, need, weights, block, layers, experts=2) == layers
    assert blocks_to_swap(every - 1, need, weights, block, layers, experts=2) is None
    assert blocks_to_swap(every, need, weights, block, layers) is None  # counted as one expert it would not fit
    assert blocks_to_swap(1, need, weights, block, layers, forced=7, experts=2) == 7
    assert placement_words(0, 40, "bfloat16", 2) == "weights bfloat16, 2 experts resident"
    assert placement_words(12, 40, "fp8_e4m3fn", 2) == "weights fp8_e4m3fn, 12 of each expert's 40 blocks swapped"
    assert placement_words(40, 40, "bfloat16", 2).endswith("40 of each expert's 40 blocks swapped, the idle expert "
                                                           "off the GPU")
    assert placement_words(3, 40, "bfloat16") == "weights bfloat16, 3 of 40 blocks swapped"


def test_the_refusal_of_a_pair_counts_both_pools_and_both_experts():
    """A free size where one expert's need with fp8 weights fits but the pair's does not: fp8 weights are named for
    one expert, a smaller setting (an fp8 KV cache) for the pair."""
    run = plan_run(family_config("causal-wan2.2-a14b"), blocks=7, width=832, height=480)
    expert_weights, block = 28 * GIB, int(0.7 * GIB)

    def floor(plan, weights, experts):  # the least a run can hold: every block of every expert swapped
        need = estimate_run_bytes(plan, A14B_EXPERT, torch.bfloat16, 1, 0, experts=experts)[0]
        per_block = block * weights // (experts * expert_weights)
        return need + weights - experts * (A14B_EXPERT.num_layers - 2) * per_block

    free = floor(run, expert_weights // 2, 1) + 1
    assert cheaper_settings(run, A14B_EXPERT, torch.bfloat16, 1, 0, free, expert_weights, block, False) == \
        "weight_dtype fp8_e4m3fn"
    fp8_kv = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, kv_dtype="fp8"))
    free = floor(fp8_kv, 2 * expert_weights, 2) + 1
    assert free < floor(run, expert_weights, 2)  # fp8 weights alone do not fit the pair
    assert cheaper_settings(run, A14B_EXPERT, torch.bfloat16, 1, 0, free, 2 * expert_weights, block, False,
                            experts=2) == "kv_dtype fp8"


def test_the_multi_shot_sink_counts_a_pinned_blocks_room():
    cfg = family_config("longlive-2")
    run = plan_run(cfg, blocks=6, width=1280, height=704, latent_space=WAN22_LATENTS)
    pinned, _ = estimate_run_bytes(run, FIVE_B, torch.bfloat16, 2, 0)
    off = plan_run(dataclasses.replace(cfg, multi_shot_sink=False), blocks=6, width=1280, height=704,
                   latent_space=WAN22_LATENTS)
    plain, what = estimate_run_bytes(off, FIVE_B, torch.bfloat16, 2, 0)
    room = kv_bytes(FIVE_B, cfg.sink, (704 // 32) * (1280 // 32))  # the sink's 8 frames of K/V
    assert abs((pinned - plain) - 1.2 * room) <= 1
    assert "a pinned block's 8 frames" in estimate_run_bytes(run, FIVE_B, torch.bfloat16, 2, 0)[1]
    assert "pinned" not in what


def test_a_steered_run_counts_the_text_sets_steering_may_add():
    cfg = family_config("self-forcing", parallel=3)
    plain = plan_run(cfg, blocks=7, width=832, height=480)
    steered = plan_run(cfg, blocks=7, width=832, height=480, steered=True)
    c = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
    in_flight = plain.schedule.max_in_flight
    a = estimate_run_bytes(plain, c, torch.bfloat16, 1, 0)[0]
    b = estimate_run_bytes(steered, c, torch.bfloat16, 1, 0)[0]
    text_set = c.num_layers * 2 * c.text_len * c.dim * 2
    # the prompts of the blocks in flight, the block before them and one waiting; a blend's set per block
    # in flight and the one before
    assert abs((b - a) - 1.2 * ((in_flight + 2) + (in_flight + 1)) * text_set) <= 1
