"""LoRA merging at load: every key style people have, alpha, strength, image-to-video extras, wrong sizes.

The expected weights are computed here, independently of the loader:
W' = W + scale * alpha / rank * up @ down (alpha = rank when the file has none), and W' = W + scale * diff
for full deltas. Tiny random models of the real architecture (CPU, fp32).
"""
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from test_checkpoint import SMALL, assert_same_weights, latents, ref  # noqa: F401  (ref: a fixture)

from cascade_core.cli.command import main
from cascade_core.weights.checkpoint import load_dit
from cascade_core.weights.dit_names import diffusers_name
from cascade_core.weights.safe_io import CheckpointError, read_tensor_file, save_safetensors

RANK = 4
TARGETS = ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2"]
# How each style spells a layer name (the part before .lora_down.weight / .lora_A.weight / .alpha).
STEMS = {
    "peft": lambda layer: f"base_model.model.{layer}",
    "peft-default": lambda layer: f"base_model.model.{layer}",
    "kohya": lambda layer: "lora_unet_" + layer.replace(".", "_"),
    "kohya-double-underscore": lambda layer: "lora_unet__" + layer.replace(".", "_"),
    "kohya-dotted": lambda layer: "lora_unet_" + layer.replace(".", "_", 1),  # lora_unet_blocks_0.self_attn.q
    "comfyui": lambda layer: f"diffusion_model.{layer}",
    "comfyui-up-down": lambda layer: f"diffusion_model.{layer}",
    "diffusers": lambda layer: "transformer." + diffusers_name(layer),
}
SUFFIXES = {"peft-default": (".lora_A.default.weight", ".lora_B.default.weight"),
            "kohya": (".lora_down.weight", ".lora_up.weight"),
            "kohya-double-underscore": (".lora_down.weight", ".lora_up.weight"),
            "kohya-dotted": (".lora_down.weight", ".lora_up.weight"),
            "comfyui-up-down": (".lora_down.weight", ".lora_up.weight")}
STYLES = list(STEMS)


def lora_pairs(ref, seed=7, layers=TARGETS):
    """layer -> (down [rank, in], up [out, rank]) for the reference weights."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in layers:
        out_f, in_f = ref[layer + ".weight"].shape
        pairs[layer] = (torch.randn(RANK, in_f, generator=g) * 0.3, torch.randn(out_f, RANK, generator=g) * 0.3)
    return pairs


def lora_tensors(style, pairs, alpha=None):
    """The same deltas in one key style; ``alpha`` stored as ``<stem>.alpha`` when given."""
    down_suffix, up_suffix = SUFFIXES.get(style, (".lora_A.weight", ".lora_B.weight"))
    t = {}
    for layer, (down, up) in pairs.items():
        stem = STEMS[style](layer)
        t[stem + down_suffix], t[stem + up_suffix] = down, up
        if alpha is not None:
            t[stem + ".alpha"] = torch.tensor(float(alpha))
    return t


def write_lora(style, tensors, path):
    if style == "peft":  # LongLive: generator_lora beside critic_lora in a training .pt
        torch.save({"generator_lora": tensors, "step": 3000,
                    "critic_lora": {"base_model.model.x.lora_A.weight": torch.zeros(1)}}, path)
    else:
        save_safetensors(tensors, path)
    return path


def lora_file(style, pairs, path, alpha=None):
    return write_lora(style, lora_tensors(style, pairs, alpha), path)


def oracle(ref, pairs, scale, alpha=None):
    """W + scale * alpha / rank * up @ down for the LoRA layers, every other tensor unchanged."""
    want = dict(ref)
    for layer, (down, up) in pairs.items():
        a = RANK if alpha is None else alpha
        want[layer + ".weight"] = ref[layer + ".weight"] + scale * a / RANK * (up @ down)
    return want


def assert_close_weights(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6), (k, (got[k] - want[k]).abs().max())


@pytest.fixture(scope="module")
def base_pt(ref, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "longlive_base.pt")
    # LongLive's base: generator and generator_ema; its LoRA was trained on the generator weights
    torch.save({"generator": {"model." + k: v for k, v in ref.items()},
                "generator_ema": {"model." + k: v * 0.5 for k, v in ref.items()}}, path)
    return path


def test_lora_merge_matches_the_unmerged_layers(ref, prompt, base_pt, tmp_path):
    pairs = lora_pairs(ref)
    lora = lora_file("peft", pairs, str(tmp_path / "lora.pt"))
    sd, info = load_dit(base_pt, dtype=torch.float32, lora=lora, num_heads=4)
    assert info.lora == "lora.pt" and info.lora_layers == len(TARGETS) and not info.ema_used
    assert "LoRA lora.pt x1 merged into 4 layers" in info.describe()
    for k in ref:
        layer = k.rsplit(".", 1)[0]
        if layer in pairs and k.endswith(".weight"):
            a, b = pairs[layer]
            bias = ref[layer + ".bias"]
            # the merged layer equals base layer + B(A(x)) (alpha = rank: LongLive's setting)
            x_in = torch.randn(3, ref[k].shape[1])
            assert torch.allclose(F.linear(x_in, sd[k], bias), F.linear(x_in, ref[k], bias) + (x_in @ a.T) @ b.T,
                                  atol=1e-5)
        else:
            assert torch.equal(sd[k], ref[k]), k
    assert not torch.equal(latents(sd, prompt), latents(ref, prompt))


@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("style", STYLES)
def test_every_lora_style_merges_to_the_oracle(style, alpha, ref, base_pt, tmp_path):
    pairs = lora_pairs(ref)
    lora = lora_file(style, pairs, str(tmp_path / f"{style}.{'pt' if style == 'peft' else 'safetensors'}"),
                     alpha=alpha)
    got, info = load_dit(base_pt, dtype=torch.float32, lora=lora, lora_scale=0.7, num_heads=4)
    assert info.lora_layers == len(TARGETS) and info.lora_note is None
    assert_close_weights(got, oracle(ref, pairs, 0.7, alpha))


@pytest.mark.parametrize("layer,layout", [("blocks.1.ffn.2", "rows"), ("blocks.1.ffn.2", "columns"),
                                          ("blocks.0.self_attn.q", "rows"), ("blocks.0.self_attn.q", "columns")])
def test_a_dora_lora_merges_as_dora_defines_it(layer, layout, ref, base_pt, tmp_path):
    """DoRA: the merged direction W + alpha/r * up @ down rescaled to the file's magnitudes (one an output row,
    [out, 1] as peft and kohya store them, or one an input column, [1, in] as LyCORIS does: told apart by the
    magnitudes' first size, also on a square layer), the strength moving W toward it; the oracle computed here."""
    g = torch.Generator().manual_seed(5)
    r, alpha, strength = 4, 2.0, 0.5
    w = ref[layer + ".weight"]  # [64, 128] or [64, 64]
    out_f, in_f = w.shape
    down, up = torch.randn(r, in_f, generator=g) * 0.2, torch.randn(out_f, r, generator=g) * 0.2
    magnitude = torch.rand(out_f, 1, generator=g) + 0.5 if layout == "rows" else torch.rand(1, in_f, generator=g) + 0.5
    stem = "lora_unet_" + layer.replace(".", "_")
    path = str(tmp_path / "dora.safetensors")
    save_safetensors({stem + ".lora_down.weight": down, stem + ".lora_up.weight": up,
                      stem + ".alpha": torch.tensor(alpha), stem + ".dora_scale": magnitude}, path)
    got, info = load_dit(base_pt, dtype=torch.float32, lora=path, lora_scale=strength, num_heads=4)
    direction = w + alpha / r * up @ down
    norm = direction.norm(dim=1, keepdim=True) if layout == "rows" else direction.norm(dim=0, keepdim=True)
    want = w + strength * (magnitude * direction / norm - w)
    assert info.lora_layers == 1
    assert torch.allclose(got[layer + ".weight"], want, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_lycoris_loha_and_lokr_merge_as_lycoris_defines_them(alpha, ref, base_pt, tmp_path):
    """LoHa: W + s * alpha/r * (W1a W1b) (element-wise) (W2a W2b); LoKr: W + s * alpha/r * kron(W1, W2a W2b), r the
    low-rank factor's rank (alpha/r = 1 without an alpha); the oracle computed here from the file's tensors."""
    g = torch.Generator().manual_seed(3)
    r, strength = 2, 0.6
    q, f0 = ref["blocks.0.self_attn.q.weight"], ref["blocks.0.ffn.0.weight"]  # [64, 64], [128, 64]
    loha = {k: torch.randn(*shape, generator=g) * 0.3 for k, shape in (
        ("hada_w1_a", (128, r)), ("hada_w1_b", (r, 64)), ("hada_w2_a", (128, r)), ("hada_w2_b", (r, 64)))}
    lokr = {"lokr_w1": torch.randn(4, 4, generator=g) * 0.3, "lokr_w2_a": torch.randn(16, r, generator=g) * 0.3,
            "lokr_w2_b": torch.randn(r, 16, generator=g) * 0.3}
    tensors = {f"lycoris_blocks_0_ffn_0.{k}": v for k, v in loha.items()}
    tensors.update({f"lycoris_blocks_0_self_attn_q.{k}": v for k, v in lokr.items()})
    if alpha is not None:
        for stem in ("lycoris_blocks_0_ffn_0", "lycoris_blocks_0_self_attn_q"):
            tensors[stem + ".alpha"] = torch.tensor(alpha)
    path = str(tmp_path / "lycoris.safetensors")
    save_safetensors(tensors, path)
    got, info = load_dit(base_pt, dtype=torch.float32, lora=path, lora_scale=strength, num_heads=4)
    factor = 1.0 if alpha is None else alpha / r
    want_f0 = f0 + strength * factor * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    kron = torch.einsum("ab,cd->acbd", lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]).reshape(64, 64)
    want_q = q + strength * factor * kron
    assert info.lora_layers == 2
    assert torch.allclose(got["blocks.0.ffn.0.weight"], want_f0, atol=1e-6)
    assert torch.allclose(got["blocks.0.self_attn.q.weight"], want_q, atol=1e-6)
    assert all(torch.equal(got[k], ref[k]) for k in ref if k not in ("blocks.0.ffn.0.weight",
                                                                        "blocks.0.self_attn.q.weight"))


@pytest.mark.parametrize("style", [*STYLES, "diff"])
def test_strength_zero_gives_the_base_and_half_gives_half_the_delta(style, ref, base_pt, tmp_path):
    pairs = lora_pairs(ref)
    if style == "diff":  # full deltas: a weight, a bias and a bare parameter
        d, m = torch.randn(64), torch.randn(1, 6, 64)
        tensors = {"diffusion_model.blocks.0.norm3.diff": d, "diffusion_model.blocks.0.norm3.diff_b": 2 * d,
                   "diffusion_model.blocks.1.modulation.diff": m}
        full = dict(ref, **{"blocks.0.norm3.weight": ref["blocks.0.norm3.weight"] + d,
                            "blocks.0.norm3.bias": ref["blocks.0.norm3.bias"] + 2 * d,
                            "blocks.1.modulation": ref["blocks.1.modulation"] + m})
    else:
        tensors, full = lora_tensors(style, pairs, alpha=2.0), oracle(ref, pairs, 1.0, alpha=2.0)
    lora = write_lora(style, tensors, str(tmp_path / f"{style}.{'pt' if style == 'peft' else 'safetensors'}"))
    zero, _ = load_dit(base_pt, dtype=torch.float32, lora=lora, lora_scale=0.0)
    assert_same_weights(zero, ref)
    half, info = load_dit(base_pt, dtype=torch.float32, lora=lora, lora_scale=0.5)
    assert info.lora_layers == (2 if style == "diff" else len(TARGETS))
    assert_close_weights(half, {k: ref[k] + 0.5 * (full[k] - ref[k]) for k in ref})


I2V_EXTRAS = {  # the image-to-video layers of a Wan2.1 I2V LoRA, as each spelling names them
    "kohya": {"lora_unet_blocks_0_cross_attn_k_img": (64, 64), "lora_unet_blocks_0_cross_attn_v_img": (64, 64),
              "lora_unet_blocks_1_cross_attn_k_img": (64, 64), "lora_unet_blocks_1_cross_attn_v_img": (64, 64),
              "lora_unet_blocks_1_cross_attn_norm_k_img": (64,), "lora_unet_img_emb_proj_1": (64, 40)},
    "comfyui": {"diffusion_model.blocks.0.cross_attn.k_img": (64, 64), "diffusion_model.img_emb.proj.4": (64, 64),
                "diffusion_model.blocks.0.cross_attn.norm_k_img": (64,)},
    "diffusers": {"transformer.blocks.0.attn2.add_k_proj": (64, 64), "transformer.blocks.0.attn2.add_v_proj": (64, 64),
                  "transformer.blocks.0.attn2.norm_added_k": (64,),
                  "transformer.condition_embedder.image_embedder.ff.net.0.proj": (64, 40)},
}
I2V_KINDS = {"kohya": {"k_img": 2, "v_img": 2, "norm_k_img": 1, "img_emb": 1},
             "comfyui": {"k_img": 1, "img_emb": 1, "norm_k_img": 1},
             "diffusers": {"add_k_proj": 1, "add_v_proj": 1, "norm_added_k": 1, "image_embedder": 1}}


def i2v_tensors(style, g):
    """LoRA pairs (with alpha) for matrices, a full .diff for the norms of one I2V spelling."""
    down, up = SUFFIXES.get(style, (".lora_A.weight", ".lora_B.weight"))
    t = {}
    for stem, shape in I2V_EXTRAS[style].items():
        if len(shape) == 1:
            t[stem + ".diff"] = torch.randn(shape, generator=g)
        else:
            t[stem + down] = torch.randn(RANK, shape[1], generator=g)
            t[stem + up] = torch.randn(shape[0], RANK, generator=g)
            t[stem + ".alpha"] = torch.tensor(2.0)
    return t


@pytest.mark.parametrize("style", list(I2V_EXTRAS))
def test_an_i2v_lora_merges_its_t2v_part_and_says_in_one_line_what_it_left_out(style, ref, base_pt, tmp_path,
                                                                                  caplog):
    pairs = lora_pairs(ref)
    tensors = {**lora_tensors(style, pairs, alpha=2.0), **i2v_tensors(style, torch.Generator().manual_seed(5))}
    lora = write_lora(style, tensors, str(tmp_path / "i2v_lora.safetensors"))
    with caplog.at_level(logging.WARNING, logger="block_cascade"):
        got, info = load_dit(base_pt, dtype=torch.float32, lora=lora, lora_scale=0.5)
    assert_close_weights(got, oracle(ref, pairs, 0.5, alpha=2.0))
    records = [r for r in caplog.records if r.name == "block_cascade"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    line = records[0].getMessage()
    n = sum(I2V_KINDS[style].values())
    assert "\n" not in line and line.startswith("LoRA i2v_lora.safetensors: ")
    assert f"left out {n} image-to-video layers" in line and "text-to-video model" in line
    for kind, count in I2V_KINDS[style].items():
        assert f"{kind} x{count}" in line, line
    assert info.lora_layers == len(TARGETS) and info.lora_note in line and info.lora_note in info.describe()


def test_a_lora_for_another_model_size_is_refused_naming_both_shapes(tmp_path, base_pt):
    # a wider model with more blocks (its blocks 2 and 3 have no counterpart here) and I2V layers
    g = torch.Generator().manual_seed(0)
    t = {}
    for b in range(4):
        for name in ("self_attn_q", "cross_attn_k_img"):
            t[f"lora_unet_blocks_{b}_{name}.lora_down.weight"] = torch.randn(RANK, 96, generator=g)
            t[f"lora_unet_blocks_{b}_{name}.lora_up.weight"] = torch.randn(96, RANK, generator=g)
    path = str(tmp_path / "wide_lora.safetensors")
    save_safetensors(t, path)
    with pytest.raises(CheckpointError) as e:
        load_dit(base_pt, lora=path)
    assert str(e.value).startswith("wide_lora.safetensors: ")
    assert "LoRA shapes [96, 4] x [4, 96] do not fit the weight [64, 64]" in str(e.value), e.value


@pytest.mark.parametrize("keys,message", [
    ({"base_model.model.blocks.0.self_attn.qq.lora_A.weight": (4, 64),
      "base_model.model.blocks.0.self_attn.qq.lora_B.weight": (64, 4),
      "base_model.model.blocks.7.ffn.0.lora_A.weight": (4, 64),
      "base_model.model.blocks.7.ffn.0.lora_B.weight": (128, 4)},
     "4 LoRA keys match no layer of this Wan2.1 DiT (2 layers, width 64): base_model.model.blocks.0.self_attn.qq"),
    ({"blocks.0.self_attn.q.lora_A.weight": (4, 5120), "blocks.0.self_attn.q.lora_B.weight": (5120, 4)},
     "blocks.0.self_attn.q: LoRA shapes [5120, 4] x [4, 5120] do not fit the weight [64, 64]"),
    ({"blocks.0.self_attn.q.lora_A.weight": (4, 64)}, "blocks.0.self_attn.q: has lora_A/down but no lora_B/up"),
    ({"lora_unet_blocks_0_self_attn_q.alpha": ()}, "blocks.0.self_attn.q: has an alpha but no LoRA matrices"),
    ({"something_else": (3,)}, "this does not look like a LoRA file"),
    ({"blocks.0.self_attn.q.lora_A.weight": (4, 64), "blocks.0.self_attn.q.lora_B.weight": (64, 4),
      "blocks.0.self_attn.q.dora_scale": (32, 1)},
     "blocks.0.self_attn.q.dora_scale has shape [32, 1]; the weight [64, 64] needs one value an output row"),
    ({"blocks.0.self_attn.q.lora_A.weight": (0, 64), "blocks.0.self_attn.q.lora_B.weight": (64, 0)},
     "blocks.0.self_attn.q: LoRA shapes [64, 0] x [0, 64] do not fit"),
    ({"lycoris_blocks_0_ffn_0.hada_w1_a": (128, 2), "lycoris_blocks_0_ffn_0.hada_w1_b": (2, 64),
      "lycoris_blocks_0_ffn_0.hada_w2_a": (128, 2), "lycoris_blocks_0_ffn_0.hada_w2_b": (2, 64),
      "lycoris_blocks_0_ffn_0.alpha": (2,)}, "blocks.0.ffn.0.alpha has shape [2]; an alpha is one number"),
    ({"blocks.0.self_attn.q.dora_scale": (64, 1)}, "blocks.0.self_attn.q: has a dora_scale but no LoRA matrices"),
    ({"blocks.0.self_attn.q.oft_blocks": (4, 16, 16)}, "an OFT LoRA (blocks.0.self_attn.q.oft_blocks): this loader"),
    ({"lycoris_blocks_0_ffn_0.hada_t1": (4, 4, 3, 3)}, "a LyCORIS LoHa with a Tucker core (lycoris_blocks_0_ffn_0"),
    ({"lycoris_blocks_0_self_attn_q.lokr_w1": (8, 8), "lycoris_blocks_0_self_attn_q.lokr_w2_a": (8, 2),
      "lycoris_blocks_0_self_attn_q.lokr_w2_b": (2, 2), "lycoris_blocks_0_self_attn_q.lokr_t2": (2, 2, 3, 3)},
     "a LyCORIS LoKr with a Tucker core (lycoris_blocks_0_self_attn_q.lokr_t2): this loader merges"),
    ({"lycoris_blocks_0_ffn_0.hada_w1_a": (128, 4), "lycoris_blocks_0_ffn_0.hada_w1_b": (4, 64)},
     "blocks.0.ffn.0: an incomplete or ill-shaped LyCORIS LoHa (no hada_w2_a, hada_w2_b)"),
    ({"lycoris_blocks_0_self_attn_q.lokr_w1": (4, 4), "lycoris_blocks_0_self_attn_q.lokr_w2": (8, 8)},
     "blocks.0.self_attn.q: the LyCORIS delta [32, 32] does not fit the weight [64, 64]"),
])
def test_bad_loras_are_named(keys, message, base_pt, tmp_path):
    path = str(tmp_path / "bad_lora.safetensors")
    save_safetensors({k: torch.randn(s) for k, s in keys.items()}, path)
    with pytest.raises(CheckpointError) as e:
        load_dit(base_pt, lora=path)
    assert str(e.value).startswith("bad_lora.safetensors: ") and message in str(e.value), e.value


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_checkpoint_lora_and_ema(ref, base_pt, tmp_path, capsys):
    lora = lora_file("peft", lora_pairs(ref), str(tmp_path / "lora.pt"))
    merged, _ = load_dit(base_pt, dtype=torch.float32, lora=lora)
    save_safetensors(merged, str(tmp_path / "merged.safetensors"))
    outs = {}
    for name, extra in (("lora", ["--checkpoint", base_pt, "--lora", lora]),
                        ("merged", ["--checkpoint", str(tmp_path / "merged.safetensors")]),
                        ("base", ["--checkpoint", base_pt, "--ema", "base"]),
                        ("ema", ["--checkpoint", base_pt])):
        out = str(tmp_path / f"{name}.safetensors")
        assert main(["generate", *SMALL, *extra, "--latents-out", out]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        outs[name] = (read_tensor_file(out)["latents"], summary["model"])
    assert torch.equal(outs["lora"][0], outs["merged"][0])
    assert not torch.equal(outs["lora"][0], outs["base"][0]) and not torch.equal(outs["base"][0], outs["ema"][0])
    assert "LoRA lora.pt x1 merged" in outs["lora"][1] and "from self-forcing .pt (generator)" in outs["lora"][1]
    assert "EMA weights" in outs["ema"][1] and "dim 64, 2 layers" in outs["ema"][1]
    assert main(["generate", *SMALL, "--lora", lora]) == 2
    assert "--lora needs --checkpoint" in capsys.readouterr().err
    assert main(["generate", *SMALL, "--checkpoint", base_pt, "--ema", "sometimes"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_lora_scale_reaches_the_merge(ref, base_pt, tmp_path, capsys):
    pairs = lora_pairs(ref)
    lora = lora_file("kohya-double-underscore", pairs, str(tmp_path / "kohya.safetensors"), alpha=2.0)
    # the base weights the LoRA goes onto (the generator, not the EMA) with the oracle's merge at 0.3
    save_safetensors(oracle(ref, pairs, 0.3, alpha=2.0), str(tmp_path / "oracle.safetensors"))
    outs = {}
    for name, extra in (("scaled", ["--checkpoint", base_pt, "--lora", lora, "--lora-scale", "0.3"]),
                        ("oracle", ["--checkpoint", str(tmp_path / "oracle.safetensors")]),
                        ("full", ["--checkpoint", base_pt, "--lora", lora])):
        out = str(tmp_path / f"{name}.safetensors")
        assert main(["generate", *SMALL, *extra, "--latents-out", out]) == 0
        outs[name] = (read_tensor_file(out)["latents"], json.loads(capsys.readouterr().out.splitlines()[-1])["model"])
    assert torch.allclose(outs["scaled"][0], outs["oracle"][0], atol=1e-5)
    assert not torch.allclose(outs["scaled"][0], outs["full"][0], atol=1e-3)
    assert "LoRA kohya.safetensors x0.3 merged into 4 layers" in outs["scaled"][1]
    for bad in ("nan", "inf"):
        assert main(["generate", *SMALL, "--checkpoint", base_pt, "--lora", lora, "--lora-scale", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lora_scale must be a finite number" in err, err


def test_a_merge_that_overflows_is_refused_naming_the_layer(ref, base_pt, tmp_path):
    """A finite but huge strength (or a LoRA holding NaN) would give NaN latents downstream."""
    lora = lora_file("kohya", lora_pairs(ref), str(tmp_path / "k.safetensors"))
    with pytest.raises(CheckpointError, match=r"strength 1e\+200 gives NaN or infinite weights in blocks\."):
        load_dit(base_pt, dtype=torch.float32, lora=lora, lora_scale=1e200, num_heads=4)
