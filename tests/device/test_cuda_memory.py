"""GPU checks of the memory features (skipped without CUDA): fp8 products through torch._scaled_mm stay close
to the widened product; block swap over CUDA streams gives the resident latents exactly, compiled too; the
fp8 KV cache and GGUF layers run on the GPU."""
import dataclasses

import pytest
import torch

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import Fp8Linear, has_fp8_matmul, prepare_weights
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=6, text_dim=64)
RUN = dict(blocks=4, width=128, height=64, seed=0)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _latents(model, cfg=CascadeConfig(parallel=3)):
    emb = torch.randn(12, SMALL.text_dim, generator=torch.Generator().manual_seed(1))
    return generate(model, PromptSchedule.single(emb), cfg, **RUN).latents


def test_fp8_products_stay_close_to_the_widened_product():
    if not has_fp8_matmul(torch.device("cuda")):
        pytest.skip("no fp8 matrix units")
    g = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(512, 256, generator=g, device="cuda")
    sd = {"blocks.0.ffn.0.weight": w}
    prepared = prepare_weights(sd, torch.bfloat16, "fp8_e4m3fn_fast")
    layer = Fp8Linear(prepared.sd["blocks.0.ffn.0.weight"], prepared.sd["blocks.0.ffn.0.weight_scale"], None, fast=True)
    x = torch.randn(4680, 256, generator=g, device="cuda", dtype=torch.bfloat16)
    widened = Fp8Linear(layer.weight, layer.weight_scale, None, fast=False)
    assert rel(layer(x), widened(x)) < 0.05 and not torch.equal(layer(x), widened(x))


@pytest.mark.parametrize("compiled", [False, True])
def test_block_swap_on_cuda_gives_the_resident_latents_exactly(compiled):
    model = WanModel.random(SMALL, 0, device="cuda", dtype=torch.bfloat16).compile_layers(compiled)
    want = _latents(model)
    model.to("cpu").swap_blocks("cuda", 4)
    assert all(t.is_pinned() for b in model.blocks[2:] for t in b.state_dict().values())
    try:
        assert torch.equal(_latents(model), want)
    finally:
        model.swap.detach()
        model.compile_layers(False)


def test_fp8_weights_and_kv_cache_run_on_the_gpu():
    model = WanModel.random(SMALL, 0, device="cuda", dtype=torch.bfloat16)
    want = _latents(model, CascadeConfig(parallel=3, window=6, sink=3, frames_per_block=1))
    fp8 = model.with_weight_dtype("fp8_e4m3fn_fast")
    kv = _latents(model, CascadeConfig(parallel=3, window=6, sink=3, frames_per_block=1, kv_dtype="fp8"))
    both = _latents(fp8, CascadeConfig(parallel=3, window=6, sink=3, frames_per_block=1, kv_dtype="fp8"))
    assert 0 < rel(kv, want) < 0.05 and 0 < rel(both, want) < 0.15


def test_gguf_layers_run_on_the_gpu(tmp_path):
    pytest.importorskip("gguf")
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "weights"))
    from test_gguf import CFG, write_gguf

    from cascade_core.weights.checkpoint import load_dit

    oracle = write_gguf(tmp_path / "wan.gguf")
    sd, _ = load_dit(str(tmp_path / "wan.gguf"), dtype=torch.float32, num_heads=4)
    model = WanModel.from_state_dict(sd, num_heads=4, device="cuda")
    reference = WanModel.from_state_dict(dict(oracle), num_heads=4, device="cuda")
    emb = torch.randn(6, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    run = dict(blocks=3, width=64, height=32, seed=2)
    got, want = (generate(m, PromptSchedule.single(emb), CascadeConfig(parallel=2), **run).latents
                 for m in (model, reference))
    assert rel(got, want) < 1e-4 and dataclasses.is_dataclass(CFG)
