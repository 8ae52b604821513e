"""load_dit: every supported layout loads to the same weights and latents; every bad file gets its own message.

Tiny random models of the real architecture (CPU, fp32). Files are written by the tests in each
layout (training .pt, ComfyUI safetensors, diffusers, fp8 with and without scales); LoRAs are in
test_lora.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cascade_core.cli.command import main
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import dequantize_state_dict
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.weights.checkpoint import CheckpointInfo, load_dit
from cascade_core.weights.dit_names import diffusers_name
from cascade_core.weights.safe_io import CheckpointError, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32)
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--steps", "1000,500", "--quiet", "--dtype", "fp32",
         "--device", "cpu", "--compile", "off"]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# Rounding error of one fp8 value relative to its scale: half a unit in the last place for normal
# numbers (3 / 2 mantissa bits), half the smallest subnormal step below them.
FP8_REL = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}
FP8_ABS = {E4M3: 2.0 ** -10, E5M2: 2.0 ** -17}


def reference_weights(seed=1):
    """Random weights for every parameter, norms included (so a misplaced tensor changes the output)."""
    model = WanModel.random(TINY, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    sd = {}
    for k, v in model.state_dict().items():
        if "norm" in k:
            v = 1 + 0.2 * torch.randn(v.shape, generator=g)
        sd[k] = v.clone()
    return sd


@pytest.fixture(scope="module")
def ref():
    return reference_weights()


@pytest.fixture(scope="module")
def prompt():
    return torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))


def latents(sd, prompt, heads=4):
    model = WanModel.from_state_dict({k: v.clone() for k, v in sd.items()}, num_heads=heads)
    return generate(model, PromptSchedule.single(prompt), CascadeConfig(steps=(1000, 500)), blocks=2,
                    width=64, height=32, seed=0).latents


def assert_same_weights(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def fp8_quantize(sd, fp8, scaled, naming="scale_weight", per_row=False):
    """ComfyUI-style fp8: matrices stored in fp8 (scaled per tensor by amax/max, or per output row of the
    Linear weights [out, 1]), the rest in fp32. Returns (stored tensors, the exact dequantised weights)."""
    stored, exact = {}, {}
    for k, v in sd.items():
        if v.dim() >= 2 and k.endswith(".weight"):
            if per_row and v.dim() == 2:
                scale = v.abs().amax(1, keepdim=True) / FP8_MAX[fp8]
            else:
                scale = (v.abs().max() / FP8_MAX[fp8]).reshape(()) if scaled else torch.tensor(1.0)
            q = (v / scale).to(fp8)
            stored[k] = q
            if scaled:
                stored[k[: -len(".weight")] + ("." + naming)] = scale.float()
            exact[k] = q.float() * scale
            # the quantisation error, computed explicitly from the format's precision
            bound = FP8_REL[fp8] * v.abs() + FP8_ABS[fp8] * scale
            assert ((exact[k] - v).abs() <= bound).all(), k
        else:
            stored[k], exact[k] = v, v
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return stored, exact


# ---- writers: (label in source_format, expected weights) -------------------------------------

def write(kind, sd, path):
    if kind == "self-forcing .pt (generator_ema)":
        torch.save({"generator": {"model." + k: v + 1 for k, v in sd.items()},
                    "critic": {"model.x": torch.zeros(1)},
                    "generator_ema": {"model." + k: v for k, v in sd.items()}}, path)
        return sd
    if kind == "self-forcing .pt (generator)":  # CausVid / Causal Forcing: no EMA
        torch.save({"generator": {"model." + k: v for k, v in sd.items()}, "step": 1200}, path)
        return sd
    if kind == "fsdp-wrapped names":
        def wrap(k):
            k = k.replace("blocks.", "_fsdp_wrapped_module.blocks.", 1)
            return "model._fsdp_wrapped_module." + k.replace(".self_attn.", "._checkpoint_wrapped_module.self_attn.")
        torch.save({"state_dict": {"model": {wrap(k): v for k, v in sd.items()}}}, path)
        return sd
    if kind == "plain .pt":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
        return sd
    if kind == "comfyui fp16":
        save_safetensors({"model.diffusion_model." + k: v.half() for k, v in sd.items()}, path)
        return {k: v.half().float() for k, v in sd.items()}
    if kind == "comfyui bf16":
        save_safetensors({"diffusion_model." + k: v.bfloat16() for k, v in sd.items()}, path)
        return {k: v.bfloat16().float() for k, v in sd.items()}
    if kind == "safetensors fp32":
        save_safetensors(sd, path)
        return sd
    if kind == "diffusers":
        save_safetensors({diffusers_name(k): v for k, v in sd.items()}, path)
        return sd
    if kind.startswith("fp8"):
        fp8 = E4M3 if "e4m3" in kind else E5M2
        stored, exact = fp8_quantize(sd, fp8, "scaled" in kind, "weight_scale" if "new" in kind else "scale_weight",
                                     per_row="per row" in kind)
        save_safetensors({"model.diffusion_model." + k: v for k, v in stored.items()}, path)
        return exact
    raise AssertionError(kind)


KINDS = ["self-forcing .pt (generator_ema)", "self-forcing .pt (generator)", "fsdp-wrapped names", "plain .pt",
         "comfyui fp16", "comfyui bf16", "safetensors fp32", "diffusers", "fp8 e4m3fn", "fp8 e5m2",
         "fp8 e4m3fn scaled", "fp8 e5m2 scaled", "fp8 e4m3fn scaled new", "fp8 e4m3fn scaled per row"]
BLOCK_LINEARS = 2 * (4 + 4 + 2)  # TINY's layers: self q,k,v,o; cross q,k,v,o; ffn 0,2


@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_loads_the_same_weights_and_latents(kind, ref, prompt, tmp_path):
    path = str(tmp_path / ("w.pt" if ".pt" in kind or "fsdp" in kind else "w.safetensors"))
    want = write(kind, ref, path)
    sd, info = load_dit(path, dtype=torch.float32, num_heads=4)
    if kind.startswith("fp8"):  # the blocks' Linear weights stay fp8 (values and one scale a row), the rest widened
        fp8 = E4M3 if "e4m3" in kind else E5M2
        assert sum(v.dtype == fp8 for v in sd.values()) == BLOCK_LINEARS and info.weight_dtype.startswith(
            "fp8_" + str(fp8).removeprefix("torch.float8_"))
        assert info.fast_fp8 == (fp8 == E4M3)
        assert all(sd[k[:-len("weight")] + "weight_scale"].shape == (v.shape[0], 1)
                   for k, v in sd.items() if v.dtype == fp8)
        scales = sum(v.numel() * 4 for k, v in sd.items() if k.endswith(".weight_scale"))
        fp8_params = sum(v.numel() for v in sd.values() if v.dtype == fp8)
        params = sum(v.numel() for v in ref.values())
        assert info.bytes == 4 * (params - fp8_params) + fp8_params + scales
        assert_same_weights(dequantize_state_dict(sd, torch.float32)[0], want)
    else:
        assert_same_weights(sd, want)
        assert info.bytes == 4 * sum(v.numel() for v in ref.values())
    assert isinstance(info, CheckpointInfo)
    assert (info.dim, info.num_layers, info.num_heads, info.ffn_dim) == (64, 2, 4, 128)
    assert info.parameters == sum(v.numel() for v in ref.values())  # scales are no parameters
    assert info.ema_used == (kind == "self-forcing .pt (generator_ema)")
    line = info.describe()
    assert "\n" not in line and "dim 64, 2 layers, 4 heads, ffn 128" in line
    if kind.startswith("self-forcing"):
        assert info.source_format == kind
    if kind.startswith("fp8"):
        assert info.quantization == kind.removesuffix(" new").removesuffix(" per row") and "float8" in "".join(
            info.source_dtypes)
    if kind.startswith("comfyui"):
        assert info.source_format.startswith("comfyui safetensors")
    if kind == "diffusers":
        assert info.source_format == "diffusers"
    assert torch.equal(latents(sd, prompt), latents(want, prompt))
    if want is ref:  # lossless layouts give the reference latents themselves
        assert torch.equal(latents(sd, prompt), latents(ref, prompt))


def test_fp8_latents_stay_close_to_full_precision(ref, prompt, tmp_path):
    path = str(tmp_path / "w.safetensors")
    write("fp8 e4m3fn scaled", ref, path)
    sd, _ = load_dit(path, dtype=torch.float32, num_heads=4)
    a, b = latents(sd, prompt), latents(ref, prompt)
    assert not torch.equal(a, b) and (a - b).norm() / b.norm() < 0.2


def test_target_dtype_and_shared_memory(ref, tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_safetensors({k: v.bfloat16() for k, v in ref.items()}, path)
    sd, info = load_dit(path)  # bf16 by default
    assert all(v.dtype == torch.bfloat16 for v in sd.values()) and info.dtype == "bfloat16"
    assert info.source_dtypes == {"bfloat16": len(ref)} and info.bytes == 2 * info.parameters
    with pytest.raises(ValueError, match="ema must be one of"):
        load_dit(path, ema="newest")
    with pytest.raises(ValueError, match="floating dtype"):
        load_dit(path, dtype=torch.float8_e4m3fn)


def test_ema_choice(ref, tmp_path):
    both, base_only, flat = (str(tmp_path / n) for n in ("both.pt", "base.pt", "flat.safetensors"))
    torch.save({"generator": {"model." + k: v + 1 for k, v in ref.items()},
                "generator_ema": {"model." + k: v for k, v in ref.items()}}, both)
    torch.save({"generator": {"model." + k: v for k, v in ref.items()}}, base_only)
    save_safetensors(ref, flat)
    ema_sd, info = load_dit(both, dtype=torch.float32)
    assert torch.equal(ema_sd["head.head.weight"], ref["head.head.weight"]) and info.ema_used and info.ema_available
    base_sd, info = load_dit(both, dtype=torch.float32, ema="base")
    assert torch.equal(base_sd["head.head.weight"], ref["head.head.weight"] + 1) and not info.ema_used
    assert "base (non-EMA) weights" in info.describe() and info.source_format == "self-forcing .pt (generator)"
    with pytest.raises(CheckpointError, match=r"base\.pt: has no EMA weights \(it holds generator\)"):
        load_dit(base_only, ema="ema")
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_dit(flat, ema="ema")
    torch.save({"generator_ema": {"model." + k: v for k, v in ref.items()}}, base_only)
    with pytest.raises(CheckpointError, match="holds only EMA weights"):
        load_dit(base_only, ema="base")
    torch.save({"state_dict": {"generator": {"model." + k: v + 1 for k, v in ref.items()},
                               "generator_ema": {"model." + k: v for k, v in ref.items()}}}, both)
    ema_sd, info = load_dit(both, dtype=torch.float32, ema="ema")  # an EMA container one level down
    assert torch.equal(ema_sd["head.head.weight"], ref["head.head.weight"])
    assert info.source_format == ".pt (state_dict/generator_ema)"


def test_folder_of_shards_with_config(ref, tmp_path):
    keys = sorted(ref)
    names = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_safetensors({diffusers_name(k): ref[k] for k in part}, str(tmp_path / name))
        names.update({diffusers_name(k): name for k in part})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                      "num_attention_heads": 4, "attention_head_dim": 16}))
    sd, info = load_dit(str(tmp_path), dtype=torch.float32)
    assert_same_weights(sd, ref)
    assert info.num_heads == 4 and info.source_format == "diffusers folder"


# ---- diffusers: the mapping checked against diffusers' own model -----------------------------

class FullAttention:
    def __call__(self, layer, q, k, v):
        tr = lambda x: x.transpose(1, 2)  # noqa: E731
        return tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v)))


def test_diffusers_transformer_gives_the_same_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    with torch.no_grad():  # every parameter random, the affine norms included
        for name, p in theirs.named_parameters():
            scale = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.3
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_safetensors(theirs.state_dict(), path)
    sd, info = load_dit(path, dtype=torch.float32, num_heads=4)
    assert info.source_format == "diffusers"
    ours = WanModel.from_state_dict(sd, num_heads=4)

    x = torch.randn(2, 16, 3, 8, 12)
    text = torch.randn(7, 32)
    context = torch.zeros(2, 512, 32)
    context[:, :7] = text  # the reference pads the prompt with zeros to 512 tokens
    tokens_per_frame = 4 * 6
    with torch.no_grad():
        uniform, per_frame = torch.tensor([[700.0] * 3, [250.0] * 3]), torch.tensor([[900.0, 500, 100], [250, 250, 10]])
        for t in (uniform, per_frame):
            a = ours(x, t, [0, 0], [ours.encode_prompt(text)] * 2, FullAttention())
            # per-frame timesteps through diffusers' per-token timestep path
            b = theirs(x, t.repeat_interleave(tokens_per_frame, dim=1), context, return_dict=False)[0]
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-4 * b.abs().max(), (a - b).abs().max()


# ---- refused, broken and wrong files ---------------------------------------------------------

class Payload:
    def __init__(self, how, target):
        self.how, self.target = how, target

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.target}",)
        return open, (self.target, "w")


@pytest.mark.parametrize("how", ["system", "open"])
def test_code_running_pickle_is_refused_and_runs_nothing(how, ref, tmp_path):
    target = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"generator": {"model.patch_embedding.weight": Payload(how, str(target))}}, path)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="evil.pt: refused: its pickle would import or call code"):
        load_dit(path)
    assert not target.exists()
    r = subprocess.run([sys.executable, "-m", "cascade_core", "generate", *SMALL, "--checkpoint", path],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "refused" in err and "evil.pt" in err
    assert not target.exists()


def wrong_files(ref):
    """name -> (tensors, expected message)."""
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    i2v = dict(ref, **{"img_emb.proj.0.weight": z(1280), "blocks.0.cross_attn.k_img.weight": z(64, 64)})
    in36 = dict(ref, **{"patch_embedding.weight": z(64, 36, 1, 2, 2)})
    in48 = dict(ref, **{"patch_embedding.weight": z(64, 48, 1, 2, 2)})
    wide = dict(ref, **{"blocks.1.ffn.0.weight": z(256, 64), "blocks.1.ffn.0.bias": z(256),
                        "blocks.1.ffn.2.weight": z(64, 256)})
    missing = {k: v for k, v in ref.items() if k != "blocks.1.cross_attn.k.bias"}
    extra = dict(ref, **{"blocks.0.extra.weight": z(3)})
    packed = dict(ref, **{"blocks.0.ffn.0.weight": torch.zeros(128, 64, dtype=torch.int8)})
    return {
        "sd15": ({"model.diffusion_model.input_blocks.0.0.weight": z(320, 4, 3, 3),
                  "first_stage_model.decoder.conv_in.weight": z(512, 4, 3, 3)}, "Stable Diffusion / SDXL UNet"),
        "flux": ({"double_blocks.0.img_attn.qkv.weight": z(9, 3), "single_blocks.0.linear1.weight": z(9, 3)},
                 "Flux-style DiT"),
        "vae": ({"encoder.conv1.weight": z(96, 3, 3, 3, 3), "decoder.conv1.weight": z(384, 16, 3, 3, 3)}, "a VAE"),
        "wan_vae_diffusers": ({"decoder.conv_in.weight": z(384, 16, 3, 3, 3), "decoder.mid_block.resnets.0.norm1.gamma":
                               z(384, 1, 1, 1), "encoder.down_blocks.0.conv1.weight": z(96, 96, 3, 3, 3),
                               "encoder.mid_block.attentions.0.to_qkv.weight": z(1152, 384, 1, 1)},
                              "the full Wan2.1 video VAE in the diffusers layout"),
        "sd_vae_diffusers": ({"decoder.conv_in.weight": z(512, 4, 3, 3), "decoder.mid_block.resnets.0.norm1.weight": z(512),
                              "encoder.down_blocks.0.resnets.0.conv1.weight": z(128, 128, 3, 3),
                              "encoder.mid_block.attentions.0.to_q.weight": z(512, 512)}, "an image VAE"),
        "umt5": ({"shared.weight": z(10, 8), "encoder.block.0.layer.0.SelfAttention.q.weight": z(8, 8)},
                 "a T5 / umt5 text encoder"),
        "i2v": (i2v, "a Wan image-to-video DiT"),
        "wan22_i2v": (in36, "36 input channels"),
        "wan22_ti2v": (in48, "Wan2.2 TI2V-5B"),
        "junk_names": ({"foo": z(3), "bar.weight": z(2)}, "none of its 2 tensors has Wan DiT names"),
        "a_lora": ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": z(4, 64)}, "a LoRA"),
        "wide_layer": (wide, "inconsistent shapes: blocks.1.ffn.0.weight is [256, 64]"),
        "missing": (missing, "missing keys: blocks.1.cross_attn.k.bias"),
        "extra": (extra, "unexpected keys: blocks.0.extra.weight"),
        "packed": (packed, "integer-packed weights"),
    }


@pytest.mark.parametrize("name", ["sd15", "flux", "vae", "wan_vae_diffusers", "sd_vae_diffusers", "umt5", "i2v",
                                  "wan22_i2v", "wan22_ti2v", "junk_names", "a_lora", "wide_layer", "missing", "extra",
                                  "packed"])
def test_wrong_files_say_what_they_are(name, ref, tmp_path, capsys):
    tensors, message = wrong_files(ref)[name]
    path = str(tmp_path / f"{name}.safetensors")
    save_safetensors(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_dit(path)
    assert str(e.value).startswith(f"{name}.safetensors: ") and message in str(e.value), e.value
    no_steps = [a for a in SMALL if a not in ("--steps", "1000,500")]  # a 48-channel file runs as longlive-2 (UniPC)
    assert main(["generate", *no_steps, "--checkpoint", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == f"error: {e.value}", err


def test_lora_only_training_file_as_checkpoint(tmp_path):
    path = str(tmp_path / "lora.pt")
    torch.save({"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)},
                "critic_lora": {}}, path)
    with pytest.raises(CheckpointError, match="holds only LoRA weights"):
        load_dit(path)


@pytest.mark.parametrize("name,content,message", [
    ("truncated.safetensors", "half-safetensors", "truncated or corrupt"),
    ("truncated.pt", "half-pt", "truncated or corrupt"),
    ("junk.safetensors", b"\x13\x37" * 300, "truncated or corrupt"),
    ("junk.pt", b"not a checkpoint at all" * 10, "truncated or corrupt"),
    ("empty.safetensors", b"", "the file is empty"),
    ("weights.gguf", b"GGUF" * 10, "not a readable GGUF file"),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 5678\n",
     "a Git LFS pointer, not the weights: run `git lfs pull`"),
    ("weights.onnx", b"\x08\x07" * 10, "unknown file type"),
])
def test_broken_files(name, content, message, ref, tmp_path, capsys):
    path = tmp_path / name
    if content == "half-safetensors":
        save_safetensors(ref, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "half-pt":
        torch.save({"generator": ref}, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_dit(str(path))
    assert main(["generate", *SMALL, "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and name in err, err
