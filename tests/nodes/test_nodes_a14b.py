"""Causal Wan2.2-A14B in the nodes, through the stand-in comfy modules (CPU): Load Causal Video Model takes a file
of a two-expert diffusers folder (or two files, high and low) and gives a pair the sampler runs, equal to
sampling.loop.generate on an ExpertPair built here from the same experts; the one memory estimate counts two KV
pools and both experts' weights and places each expert's blocks; what a pair does not run is refused in one line
before the engine runs."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch
from test_experts import write_pipeline
from test_nodes import (  # noqa: F401  (no_engine: a fixture)
    PKG,
    H,
    Recorder,
    W,
    config,
    devices_mod,
    no_engine,
    run,
    sampler_mod,
)

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.experts import ExpertPair
from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.video.latents import normalized_to_raw
from cascade_core.weights.safe_io import save_safetensors

# heads = dim / 128, what the loader takes where no config.json says (the loose files); umt5's text width
PAIR_CFG = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096)
BLOCKS, SEED = 2, 3
FAMILY = dict(parallel=0, attention="auto", window=-1, sink=-1, steps="auto", shift=0.0)  # the family's own
HALF = "transformer/diffusion_pytorch_model.safetensors"
experts_mod = sys.modules[f"{PKG}.nodes.experts"]  # the pack's module, imported by the loader node


@pytest.fixture(scope="module")
def experts():
    return WanModel.random(PAIR_CFG, seed=0), WanModel.random(PAIR_CFG, seed=1)


@pytest.fixture(scope="module")
def root(experts, tmp_path_factory):
    """A diffusion_models folder holding the two-expert folder a14b/ (boundary_ratio 0.9) and two loose files."""
    folder = tmp_path_factory.mktemp("models")
    write_pipeline(str(folder / "a14b"), experts, {"_class_name": "WanPipeline", "boundary_ratio": 0.9})
    for half in ("transformer", "transformer_2"):  # write_pipeline's config.json names tests' TINY heads
        with open(folder / "a14b" / half / "config.json", "w") as f:
            json.dump({"_class_name": "WanTransformer3DModel", "num_attention_heads": PAIR_CFG.num_heads}, f)
    for name, expert in zip(("high", "low"), experts):  # Wan's own names, no config
        save_safetensors(expert.state_dict(), str(folder / "loose" / f"{name}.safetensors"))
    return str(folder)


@pytest.fixture()
def models(root, monkeypatch):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["diffusion_models"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([*paths, root], exts))


def conditioning():
    return [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(5)), {}]]


def reference(experts, positive, boundary, **settings):
    """The oracle: the pair built here, the family's settings, the node's seed; as the node's RAW LATENT."""
    res = generate(ExpertPair(*experts, boundary=boundary), PromptSchedule.single(positive[0][0][0]),
                   family_config("causal-wan2.2-a14b", **settings), blocks=BLOCKS, width=W, height=H, seed=SEED)
    return normalized_to_raw(res.latents.float())


def sample(pair, positive, **settings):
    with Recorder() as rec:
        latent, _ = run("BlockCascadeSampler", model=pair, config=config(**{**FAMILY, **settings}),
                        positive=positive, width=W, height=H, blocks=BLOCKS, seed=SEED)
    (_, start), = rec.events("start")
    return latent["samples"], start["settings"]


def test_a_file_of_a_two_expert_folder_loads_the_pair_and_the_sampler_runs_it(experts, models):
    (pair,) = run("BlockCascadeModelLoader", model_name=f"a14b/{HALF}", dtype="fp32", ema="auto")
    assert pair.experts == 2 and pair.model.boundary == 900 and pair.family[0] == "causal-wan2.2-a14b"
    assert pair.weight_bytes() == sum(t.numel() * 4 for e in experts for t in e.state_dict().values())
    positive = conditioning()
    got, line = sample(pair, positive)
    assert torch.equal(got, reference(experts, positive, 900))
    assert line.startswith("causal-wan2.2-a14b (assumed: a two-expert") and "weights float32, 2 experts resident" \
        in line
    assert not torch.equal(got, reference(experts, positive, 875))  # the folder's boundary is the one that ran
    # every block of both experts streamed from host memory: the same latents, nothing left swapped after the run
    swapped, line = sample(pair, positive, swap_blocks=2)
    assert torch.equal(swapped, got) and "2 of each expert's 2 blocks swapped, the idle expert off the GPU" in line
    assert pair.model.swap is None and pair.model.device.type == "cpu"


def test_two_files_load_as_high_and_low_at_the_boundary_given(experts, root, models):
    """nodes.experts.load_pair with two files (the loader has no widget for the second yet: see its docstring)."""
    load_pair = experts_mod.load_pair
    high, low = (os.path.join(root, "loose", f"{n}.safetensors") for n in ("high", "low"))
    pair = load_pair(high, low, torch.float32, boundary=900)
    assert pair.model.boundary == 900
    positive = conditioning()
    assert torch.equal(sample(pair, positive)[0], reference(experts, positive, 900))
    assert load_pair(high, low, torch.float32).model.boundary == 875
    assert load_pair(high, None, torch.float32) is None  # a loose file alone: one DiT
    (one,) = run("BlockCascadeModelLoader", model_name="loose/high.safetensors", dtype="fp32", ema="auto")
    assert not hasattr(one.model, "high") and one.experts == 1


@pytest.mark.usefixtures("no_engine")
def test_the_estimate_counts_two_pools_and_places_each_experts_blocks(monkeypatch):
    deep = [WanModel.random(dataclasses.replace(PAIR_CFG, num_layers=6), seed=s) for s in (0, 1)]
    pair = experts_mod.PairModel(ExpertPair(*deep), "deep pair")
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 1)
    settings = config(**FAMILY, devices="cuda:0")
    checked = sampler_mod.check(pair, settings, W, H, BLOCKS, conditioning(), None, None, None, None, 0, None)
    one_pool = checked.session.memory(pair.cfg, pair.dtype, 1, 0)[0]
    need = checked.session.memory(pair.cfg, pair.dtype, 1, 0, experts=2)[0]
    assert need > one_pool
    weights, block = pair.weight_bytes(), pair.block_bytes()
    assert weights == sum(t.numel() * 4 for e in deep for t in e.state_dict().values())
    # k blocks of each expert swapped free 2 (k - 2) blocks' bytes
    for free, want in ((need + weights, 0), (need + weights - 1, 3), (need + weights - 3 * block, 4)):
        monkeypatch.setattr(devices_mod, "free_bytes", lambda d, free=free: free)
        checked = sampler_mod.check(pair, settings, W, H, BLOCKS, conditioning(), None, None, None, None, 0, None)
        sampler_mod.make_room(checked, pair)
        assert checked.need == need and checked.swapped == want, (free, want)
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: need + weights - 2 * 4 * block - 1)
    checked = sampler_mod.check(pair, settings, W, H, BLOCKS, conditioning(), None, None, None, None, 0, None)
    with pytest.raises(ValueError, match=r"KV cache .* \(2 experts' pools\).* even with every block swapped"):
        sampler_mod.make_room(checked, pair)


@pytest.mark.parametrize("settings,words", [
    (dict(devices="cpu,cpu"), "cannot run with several devices"),
    (dict(flashblock=True), "cannot run with flashblock reuse"),
    (dict(parallel=2, attention="bidirectional", independent_first_frame="off"),
     "two-expert model .* cannot run with bidirectional in-flight attention"),
])
@pytest.mark.usefixtures("no_engine")
def test_what_a_pair_does_not_run_is_refused_before_the_engine(models, settings, words):
    (pair,) = run("BlockCascadeModelLoader", model_name=f"a14b/{HALF}", dtype="fp32", ema="auto")
    with pytest.raises(ValueError, match=words) as err:
        sample(pair, conditioning(), **settings)
    assert "\n" not in str(err.value)


def test_a_lora_on_a_pair_is_refused_in_one_line(models, monkeypatch):
    import folder_paths

    loras = os.path.join(folder_paths.models_dir, "loras")
    os.makedirs(loras, exist_ok=True)
    open(os.path.join(loras, "pair_test_lora.safetensors"), "wb").close()
    try:
        with pytest.raises(ValueError, match="lora: merging a LoRA into a two-expert"):
            run("BlockCascadeModelLoader", model_name=f"a14b/{HALF}", dtype="fp32", ema="auto",
                lora="pair_test_lora.safetensors")
    finally:
        os.remove(os.path.join(loras, "pair_test_lora.safetensors"))
