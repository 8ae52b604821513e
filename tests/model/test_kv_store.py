"""The fp8 KV cache: each value within half an e4m3 ulp of its row's largest, moves exact, about half the bytes;
whole runs of every cache layout stay within a stated bound of the cache in the model's dtype."""
import dataclasses

import pytest
import torch
from conftest import TINY

from cascade_core.model.dit import WanModel
from cascade_core.model.kv_store import KVStore
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.sampling.memory import estimate_run_bytes
from cascade_core.sampling.plan import plan_run

# Relative L2 of a tiny run's latents, fp8 cache against the model's dtype (measured: about 0.002)
RUN_BOUND = 0.02


def test_values_round_within_half_an_ulp_of_their_rows_largest():
    g = torch.Generator().manual_seed(0)
    store = KVStore(2, 10, 3, 16, torch.float32, "cpu", fp8=True)
    x = torch.randn(10, 3, 16, generator=g) * torch.logspace(-3, 3, 10)[:, None, None]  # rows far apart
    store.put(1, 0, 10, x)
    got = store.get(1, 0, 10)
    assert got.dtype == torch.float32 and store.data.dtype == torch.float8_e4m3fn
    assert ((got - x).abs() <= 2 ** -4 * x.abs().amax(-1, keepdim=True)).all()
    assert not torch.equal(got, x)
    store.move(5, 0, 4)  # stored bytes and scales as they are: the same values come back
    assert torch.equal(store.get(1, 5, 9), got[:4])
    plain = KVStore(2, 10, 3, 16, torch.bfloat16, "cpu")
    assert store.nbytes / plain.nbytes == pytest.approx((1 + 4 / 16) / 2)


@pytest.mark.parametrize("cfg", [
    CascadeConfig(parallel=3),
    CascadeConfig(frames_per_block=1, window=6, sink=2, parallel=3, flashblock="reuse"),  # moves, FlashBlock
    CascadeConfig(frames_per_block=1, window=4, sink=1, rope_positions="slots", sink_ema=0.9),  # Reward Forcing
    CascadeConfig(frames_per_block=1, window=5, sink=1, parallel=5, attention="bidirectional",
                  rolling_window=True),  # Rolling Forcing's anchors
], ids=["cascade", "window-flashblock", "ema-slots", "rolling"])
def test_an_fp8_cache_stays_within_its_bound_of_the_models_dtype(cfg):
    model = WanModel.random(TINY, 0)
    emb = torch.randn(7, TINY.text_dim, generator=torch.Generator().manual_seed(2))
    run = dict(blocks=6, width=64, height=32, seed=1)
    want = generate(model, PromptSchedule.single(emb), cfg, **run).latents
    got = generate(model, PromptSchedule.single(emb), dataclasses.replace(cfg, kv_dtype="fp8"), **run).latents
    dev = float((got - want).norm() / want.norm())
    assert 0 < dev < RUN_BOUND


def test_the_memory_estimate_counts_the_fp8_cache():
    cfg = CascadeConfig(window=12, sink=3, parallel=3)
    big = dataclasses.replace(TINY, dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)
    sizes = [estimate_run_bytes(plan_run(c, blocks=20, width=832, height=480), big, torch.bfloat16, 1, 0)
             for c in (cfg, dataclasses.replace(cfg, kv_dtype="fp8"))]
    kv = [float(what.split("KV cache ")[1].split(" GiB")[0]) for _, what in sizes]
    assert kv[1] == pytest.approx(kv[0] * (1 + 4 / 128) / 2, rel=0.01) and sizes[1][0] < sizes[0][0]
