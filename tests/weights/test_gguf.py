"""ComfyUI-GGUF .gguf DiT files: written here with the gguf package (Q8_0 blocks quantised by it, Q4_K blocks
laid out by hand from its format), read with their blocks kept (bytes counted), and sampled as the gguf
package's own numpy dequantisation of them samples: the oracle never goes through the loader's dequantiser."""
import dataclasses

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

from cascade_core.model.dit import WanConfig, WanModel  # noqa: E402
from cascade_core.model.fp8 import tensor_bytes, weight_dtype_of  # noqa: E402
from cascade_core.model.gguf import GGUFLinear  # noqa: E402
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate  # noqa: E402
from cascade_core.weights.checkpoint import load_dit  # noqa: E402
from cascade_core.weights.safe_io import CheckpointError  # noqa: E402

# ffn width 256: ffn.2's rows hold one 256-value K-quant super-block
CFG = WanConfig(dim=64, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32)
Q8, Q4K = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K


def _q4k_rows(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_K blocks: per 256 values, d and dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles."""
    raw = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path):
    """The tiny model as a ComfyUI-GGUF file; returns the weights as the gguf package dequantises them."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="wan")
    oracle = {}
    for k, v in WanModel.random(CFG, 0).state_dict().items():
        a = v.float().numpy()
        if k.startswith("blocks.") and k.endswith("ffn.2.weight"):
            q, kind = _q4k_rows(*a.shape, rng), Q4K
        elif k.startswith("blocks.") and v.dim() == 2:
            q, kind = quants.quantize(a, Q8), Q8
        else:
            q, kind = None, None
        if q is not None:
            writer.add_tensor(k, q, raw_dtype=kind)
            oracle[k] = torch.from_numpy(quants.dequantize(q, kind).copy())
        elif v.dim() > 4:  # GGUF holds four dimensions: ComfyUI-GGUF flattens and records the shape
            writer.add_array("comfy.gguf.orig_shape." + k, list(a.shape))
            writer.add_tensor(k, a.reshape(a.shape[0], -1))
            oracle[k] = v
        else:
            writer.add_tensor(k, a)
            oracle[k] = v
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return oracle


def _latents(model):
    emb = torch.randn(6, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    return generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=2), blocks=3, width=64, height=32,
                    seed=2).latents


def test_gguf_blocks_stay_quantised_and_sample_as_their_dequantised_weights(tmp_path):
    oracle = write_gguf(tmp_path / "wan.gguf")
    sd, info = load_dit(str(tmp_path / "wan.gguf"), dtype=torch.float32, num_heads=4)
    assert info.quantization == "GGUF Q4_K/Q8_0" and info.weight_dtype == "gguf"
    assert info.parameters == sum(v.numel() for v in oracle.values())
    model = WanModel.from_state_dict(sd, num_heads=4)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == CFG.num_layers * 10 and weight_dtype_of(model) == "gguf_Q4_K/Q8_0"
    # the blocks as stored (Q8_0 34 bytes and Q4_K 144 bytes per 32 and 256 weights) and an int64 type each
    raw = sum(m.weight.numel() for m in layers)
    widened = 4 * sum(m.out_features * m.in_features for m in layers)
    assert tensor_bytes(model) == tensor_bytes(WanModel.random(CFG, 0)) - widened + raw + 8 * len(layers)
    assert raw == sum(m.out_features * m.in_features * (34 / 32 if m.qtype == Q8 else 144 / 256) for m in layers)
    for m in layers:  # the product sees the package's own dequantisation
        name = next(n for n, mod in model.named_modules() if mod is m) + ".weight"
        want = oracle[name]
        got = (m(torch.eye(m.in_features)) - (0 if m.bias is None else m.bias)).t()  # W from W^T x at x = I
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), name
    reference = WanModel.from_state_dict(dict(oracle), num_heads=4)
    assert torch.allclose(_latents(model), _latents(reference), rtol=1e-4, atol=1e-5)


def test_a_gguf_model_swaps_its_blocks_as_they_are(tmp_path):
    write_gguf(tmp_path / "wan.gguf")
    sd, _ = load_dit(str(tmp_path / "wan.gguf"), dtype=torch.float32, num_heads=4)
    model = WanModel.from_state_dict(sd, num_heads=4)
    want = _latents(model)
    model.swap_blocks("cpu", 2)
    assert torch.equal(_latents(model), want)


def test_an_unreadable_gguf_file_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(CheckpointError, match="broken.gguf.*not a readable GGUF file"):
        load_dit(str(bad))


def test_an_fp8_choice_reads_gguf_blocks_widened_then_stored_fp8(tmp_path):
    oracle = write_gguf(tmp_path / "wan.gguf")
    sd, info = load_dit(str(tmp_path / "wan.gguf"), dtype=torch.float32, num_heads=4, weight_dtype="fp8_e4m3fn")
    assert info.weight_dtype == "fp8_e4m3fn"
    assert dataclasses.replace(CFG) == WanModel.from_state_dict(sd, num_heads=4).cfg
    assert sd["blocks.0.ffn.2.weight"].dtype == torch.float8_e4m3fn
    widened = sd["blocks.0.ffn.2.weight"].float() * sd["blocks.0.ffn.2.weight_scale"]
    want = oracle["blocks.0.ffn.2.weight"]
    assert ((widened - want).abs() <= 2 ** -4 * want.abs().amax(1, keepdim=True) + 1e-6).all()
