"""FlashBlock: exact split/merge of attention, and the reuse approximation's behaviour."""
import math

import pytest
import torch

from cascade_core.model import attention
from cascade_core.model.kv_pool import KVPool, PoolLayout
from cascade_core.model.pool_attention import FULL, REUSE, STORE
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_merged_pieces_equal_attention_over_the_union(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 16, generator=g) for n in (10, 25, 25))
    attention.set_backend(backend)
    try:
        pieces = [attention.attend_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 7), (7, 20), (20, 25))]
        merged, lse = attention.merge_attention(pieces)
    finally:
        attention.set_backend("auto")
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    assert (merged - full).abs().max() <= 1e-5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() <= 1e-5


@pytest.mark.parametrize("parallel,attn,window,sink", [(1, "causal", None, 0), (3, "causal", None, 0),
                                                       (5, "bidirectional", None, 0), (2, "causal", 6, 2)])
def test_exact_mode_equals_standard_attention(model, prompt, parallel, attn, window, sink):
    run = dict(blocks=5, width=64, height=32, seed=4)
    base = CascadeConfig(frames_per_block=2, parallel=parallel, attention=attn, window=window, sink=sink)
    off = generate(model, PromptSchedule.single(prompt), base, **run).latents
    cfg = CascadeConfig(**{**base.__dict__, "flashblock": "exact"})
    exact = generate(model, PromptSchedule.single(prompt), cfg, **run).latents
    assert (off - exact).abs().max() <= 1e-5


def test_reuse_mode_is_an_approximation_that_spares_the_first_block(model, prompt):
    run = dict(blocks=4, width=64, height=32, seed=4)
    exact = generate(model, PromptSchedule.single(prompt), CascadeConfig(frames_per_block=2), **run).latents
    reuse = generate(model, PromptSchedule.single(prompt), CascadeConfig(frames_per_block=2, flashblock="reuse"),
                     **run).latents
    assert torch.isfinite(reuse).all()
    # block 0 has no keys outside itself: nothing is reused, so it is exact
    assert (reuse[:, :, :2] - exact[:, :, :2]).abs().max() <= 1e-5
    dev = float((reuse - exact).norm() / exact.norm())
    assert 0 < dev < 0.5  # later blocks reuse stale block-external attention


def test_reuse_merges_each_blocks_own_first_step_external_attention():
    """Pool level, two blocks in flight over three ticks (one frame per block, 4 tokens a frame).

    Oracle: plain softmax over [first-step queries . first-step external keys, current queries .
    current own keys] against [first-step external values, current own values]."""
    heads, hd, tpf = 2, 8, 4
    pool = KVPool(PoolLayout(frames_per_block=1, tokens_per_frame=tpf, total_frames=3, max_in_flight=2),
                  1, heads, hd, torch.float32, "cpu", keep_external=True)
    g = torch.Generator().manual_seed(8)
    qkv = lambda n: [torch.randn(n, tpf, heads, hd, generator=g) for _ in range(3)]  # noqa: E731
    pool.attention([0], [1], [FULL])(0, *qkv(1))  # block 0 committed
    k0, v0 = pool.k.get(0, 0, tpf).clone(), pool.v.get(0, 0, tpf).clone()

    def oracle(q_ext, k_ext, v_ext, q, k, v):  # all [L, heads, hd]; returns [L, heads, hd]
        scores = torch.cat([torch.einsum("qhd,khd->hqk", q_ext, k_ext),
                            torch.einsum("qhd,khd->hqk", q, k)], -1) / math.sqrt(hd)
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), torch.cat([v_ext, v]))

    q, k, v = qkv(1)  # tick 1: block 1's first step
    pool.attention([1], [2], [STORE])(0, q, k, v)
    first1 = (q[0], k0, v0)
    q, k, v = qkv(2)  # tick 2: block 1 reuses, block 2's first step (block 1 external to it)
    out = pool.attention([1, 2], [2, 3], [REUSE, STORE])(0, q, k, v)
    assert (out[0] - oracle(*first1, q[0], k[0], v[0])).abs().max() <= 1e-5
    first2 = (q[1], torch.cat([k0, k[0]]), torch.cat([v0, v[0]]))
    q, k, v = qkv(2)  # tick 3: both reuse; block 1's K/V changed since block 2 kept its part
    out = pool.attention([1, 2], [2, 3], [REUSE, REUSE])(0, q, k, v)
    assert (out[0] - oracle(*first1, q[0], k[0], v[0])).abs().max() <= 1e-5
    assert (out[1] - oracle(*first2, q[1], k[1], v[1])).abs().max() <= 1e-5
    fresh = oracle(q[1], torch.cat([k0, k[0]]), torch.cat([v0, v[0]]), q[1], k[1], v[1])
    assert (out[1] - fresh).abs().max() > 1e-2  # reuse really differs from fresh attention here


def test_a_fused_kernel_that_cannot_run_falls_back_with_one_warning(caplog):
    """A log-sum-exp kernel that refuses the call (here: a CUDA kernel given CPU tensors) is named in
    one warning per kind of call, never silently replaced by the float32 path; the result stays exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (5, 9, 9))
    attention.set_backend("cudnn")
    try:
        with caplog.at_level("WARNING", logger="block_cascade"):
            first = attention._lse_cuda(q, k, v)
            second = attention._lse_cuda(q, k, v)
    finally:
        attention.set_backend("auto")
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 2 and "cudnn" in warnings[0] and "float32 reference path" in warnings[1], warnings
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(first[0], ref, atol=1e-6) and torch.equal(first[0], second[0])
