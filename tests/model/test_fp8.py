"""The fp8 option: quantization error is bounded and the whole model still runs the cascade."""
import torch
from torch import nn

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import FP8, Fp8Linear, quantize_layers, quantize_rows
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate


def test_row_quantization_error_is_within_e4m3_precision():
    x = torch.randn(50, 64) * torch.logspace(-2, 2, 50)[:, None]  # rows of very different scales
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (50, 1)
    rel = ((q.float() * scale - x).abs() / x.abs().amax(1, keepdim=True)).max()
    assert rel <= 2 ** -4  # 3 mantissa bits: half an ulp at the row's largest value is 1/16


def test_fp8_linear_approximates_the_linear():
    lin = nn.Linear(128, 96)
    x = torch.randn(4, 10, 128)
    f8 = Fp8Linear(lin)
    assert f8.weight.dtype == FP8
    with torch.no_grad():
        exact, approx = lin(x), f8(x)
    rel = float((approx - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.05


def test_quantized_model_runs_and_deviation_is_bounded():
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)
    model = WanModel.random(cfg, 0)
    emb = torch.randn(7, 32)
    run = dict(blocks=3, width=64, height=32, seed=1)
    ref = generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=2), **run).latents
    quantize_layers(model)
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in model.modules())
    assert n_fp8 == cfg.num_layers * (4 + 4 + 2)  # self q,k,v,o; cross q,k,v,o; ffn 0,2
    out = generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=2), **run).latents
    dev = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and 0 < dev < 0.1
