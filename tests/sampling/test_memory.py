"""Where the weights sit (the memory estimate's placement rule) and the refusal's cheapest setting, at the
real 1.3B shapes (nothing allocated: the estimate reads shapes only)."""
import dataclasses

import torch

from cascade_core.model.dit import WanConfig
from cascade_core.sampling.config import CascadeConfig
from cascade_core.sampling.memory import blocks_to_swap, cheaper_settings, estimate_run_bytes
from cascade_core.sampling.plan import plan_run

WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
GIB = 1024 ** 3


def test_the_fewest_blocks_that_fit_are_swapped():
    block, layers, need = 100, 30, 1000
    weights = block * layers
    assert blocks_to_swap(None, need, weights, block, layers) == 0  # unknown free memory: resident
    assert blocks_to_swap(need + weights, need, weights, block, layers) == 0
    # swapping k >= 2 blocks frees (k - 2) blocks' bytes: the two slots hold two
    assert blocks_to_swap(need + weights - 1, need, weights, block, layers) == 3
    assert blocks_to_swap(need + weights - 250, need, weights, block, layers) == 5
    assert blocks_to_swap(need + 2 * block, need, weights, block, layers) == layers
    assert blocks_to_swap(need + 2 * block - 1, need, weights, block, layers) is None
    assert blocks_to_swap(1, need, weights, block, layers, forced=7) == 7  # forced wins


def test_the_refusal_names_the_cheapest_setting_that_fits():
    run = plan_run(CascadeConfig(), blocks=7, width=832, height=480)  # Self-Forcing, 21 latent frames
    weights, block = 2 * 1_420_000_000, 2 * 44_000_000

    def floor(plan, w):  # the least a run can hold: every block swapped
        return estimate_run_bytes(plan, WAN_1_3B, torch.bfloat16, 1, 0)[0] + w - 28 * block * w // weights

    fp8_kv = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, kv_dtype="fp8"))
    assert floor(fp8_kv, weights) < floor(run, weights)
    free = (floor(fp8_kv, weights) + floor(run, weights)) // 2
    assert cheaper_settings(run, WAN_1_3B, torch.bfloat16, 1, 0, free, weights, block, True) == "kv_dtype fp8"
    # fp8 weights come first where they alone fit
    free = floor(run, weights // 2) + 1
    assert free < floor(run, weights)
    assert cheaper_settings(run, WAN_1_3B, torch.bfloat16, 1, 0, free, weights, block, False) == \
        "weight_dtype fp8_e4m3fn"
    assert cheaper_settings(run, WAN_1_3B, torch.bfloat16, 1, 0, 1 * GIB // 8, weights, block, False) == ""
