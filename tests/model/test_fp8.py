"""fp8 weights: kept fp8 with one scale a row, widened per product (exactly the widened weights), or
re-quantized from wider weights within the format's precision; the whole model still runs the cascade."""
import pytest
import torch
from torch import nn

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import (
    FP8,
    Fp8Linear,
    dequantize_state_dict,
    prepare_weights,
    quantize_rows,
    tensor_bytes,
    weight_dtype_of,
)
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

CFG = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)
RUN = dict(blocks=3, width=64, height=32, seed=1)


def test_row_quantization_error_is_within_e4m3_precision():
    x = torch.randn(50, 64) * torch.logspace(-2, 2, 50)[:, None]  # rows of very different scales
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (50, 1)
    rel = ((q.float() * scale - x).abs() / x.abs().amax(1, keepdim=True)).max()
    assert rel <= 2 ** -4  # 3 mantissa bits: half an ulp at the row's largest value is 1/16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kept_fp8_layer_gives_the_widened_layer_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    w8 = (torch.randn(96, 128, generator=g) * 3).to(FP8)
    scale = torch.rand(96, 1, generator=g) + 0.1
    bias = torch.randn(96, generator=g).to(dtype)
    widened = nn.Linear(128, 96).to(dtype)
    with torch.no_grad():  # the widened model's weight, as the loader widens it
        widened.weight.copy_((w8.float() * scale).to(dtype))
        widened.bias.copy_(bias)
    x = torch.randn(4, 10, 128, generator=g).to(dtype)
    with torch.no_grad():
        assert torch.equal(Fp8Linear(w8, scale, bias)(x), widened(x))


def _model_and_latents(sd, fast=False):
    model = WanModel.from_state_dict(sd, num_heads=CFG.num_heads, fast_fp8=fast)
    emb = torch.randn(7, CFG.text_dim, generator=torch.Generator().manual_seed(2))
    return model, generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=2), **RUN).latents


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])
def test_an_fp8_choice_stores_the_block_weights_fp8_and_stays_close(weight_dtype):
    ref_model = WanModel.random(CFG, 0)
    sd = ref_model.state_dict()
    _, ref = _model_and_latents(sd)
    prepared = prepare_weights(sd, torch.float32, weight_dtype)
    assert prepared.fast == weight_dtype.endswith("_fast")
    model, out = _model_and_latents(prepared.sd, prepared.fast)
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == CFG.num_layers * (4 + 4 + 2)  # self q,k,v,o; cross q,k,v,o; ffn 0,2
    fp8_params = sum(m.weight.numel() for m in layers)
    rows = sum(m.out_features for m in layers)  # one float32 scale each
    assert weight_dtype_of(model) == weight_dtype
    assert tensor_bytes(model) == tensor_bytes(ref_model) - 3 * fp8_params + 4 * rows
    # each weight within half an fp8 ulp of its row's largest value
    want = dequantize_state_dict(sd, torch.float32)[0]
    got = dequantize_state_dict(prepared.sd, torch.float32)[0]
    bound = 2 ** -4 if "e4m3" in weight_dtype else 2 ** -3
    for k, v in want.items():
        if v.dim() == 2 and k.startswith("blocks."):
            assert ((got[k] - v).abs() <= bound * v.abs().amax(1, keepdim=True)).all(), k
        else:
            assert torch.equal(got[k], v), k
    dev = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and 0 < dev < 0.1


def test_a_model_of_fp8_weights_is_never_widened_whole():
    prepared = prepare_weights(WanModel.random(CFG, 0).state_dict(), torch.float32, "fp8_e4m3fn")
    model = WanModel.from_state_dict(prepared.sd, dtype=torch.bfloat16, num_heads=CFG.num_heads)
    kinds = {str(m.weight.dtype) for m in model.modules() if isinstance(m, Fp8Linear)}
    assert kinds == {"torch.float8_e4m3fn"} and model.dtype == torch.bfloat16
    assert all(m.weight_scale.dtype == torch.float32 for m in model.modules() if isinstance(m, Fp8Linear))
    again = model.with_weight_dtype("fp8_e4m3fn")  # stored so already: the very values
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.float(), b.float())


def test_unknown_weight_dtype_is_refused():
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp8_e4m3fn"):
        prepare_weights({}, torch.float32, "int4")


def test_a_dtype_cast_of_the_model_keeps_fp8_layers_stored():
    prepared = prepare_weights(WanModel.random(CFG, 0).state_dict(), torch.float32, "fp8_e4m3fn")
    model = WanModel.from_state_dict(prepared.sd, num_heads=CFG.num_heads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            assert m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32, name
            assert torch.equal(m.weight_scale, before[name + ".weight_scale"]) and m.bias.dtype == torch.bfloat16
    assert weight_dtype_of(model) == "fp8_e4m3fn" and model.dtype == torch.bfloat16


def test_a_flat_per_row_scale_scales_rows():
    """A scale [out] (one per output row, stored flat) multiplies rows, also of a square weight."""
    w = torch.randn(8, 8).to(FP8)
    scale = torch.arange(1, 9, dtype=torch.float32)
    got, _ = dequantize_state_dict({"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.weight_scale": scale}, torch.float32)
    assert torch.equal(got["blocks.0.ffn.0.weight"], w.float() * scale[:, None])
    kept = prepare_weights({"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.weight_scale": scale}, torch.float32).sd
    assert torch.equal(kept["blocks.0.ffn.0.weight_scale"], scale[:, None])


def test_bytes_without_a_gguf_type_are_refused_in_one_line():
    with pytest.raises(ValueError, match="stored as bytes .uint8. without its GGUF type"):
        prepare_weights({"blocks.0.ffn.0.weight": torch.zeros(4, 8, dtype=torch.uint8)}, torch.float32)
