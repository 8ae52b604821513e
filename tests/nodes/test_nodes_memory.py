"""The sampler node on the cards users own: where the weights sit (resident, or blocks streamed from host
memory, chosen from the memory estimate or forced), fp8 weights kept fp8, the fp8 KV cache and the compile
choice; and what a run costs the node beyond the engine's loop (frames written in place) and tells its client
(one line when it fails): through the stand-in comfy modules on the tiny model (CPU; a CUDA device is faked
only where the placement is decided, before any tensor moves)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_nodes import (  # noqa: F401
    BLOCKS,
    NODES,
    H,
    Recorder,
    W,
    cond,
    config,
    devices_mod,
    model,
    no_engine,
    run,
    sampler_mod,
    tiny,
    values_mod,
)

from cascade_core.model.dit import WanModel
from cascade_core.model.fp8 import Fp8Linear
from cascade_core.sampling.loop import CascadeConfig
from cascade_core.sampling.memory import blocks_to_swap

GIB = 1024 ** 3


def _sample(model, settings, conditioning):
    with Recorder() as rec:
        out = run("BlockCascadeSampler", model=model, config=settings, positive=conditioning, width=W, height=H,
                  blocks=BLOCKS, seed=3)
    start = [d for e, d in rec.events("start")][0]
    return out[0]["samples"], start["settings"]


def test_forced_block_swap_gives_the_resident_latents_and_leaves_the_weights_on_the_cpu(model):
    conditioning = cond()
    resident, line = _sample(model, config(), conditioning)
    assert "weights float32, resident" in line
    swapped, line = _sample(model, config(swap_blocks=1), conditioning)
    assert f"1 of {model.cfg.num_layers} blocks swapped" in line and "chosen" not in line
    assert torch.equal(swapped, resident)
    assert model.model.swap is None and model.model.device.type == "cpu"


def test_the_placement_follows_the_memory_estimate(model, monkeypatch, no_engine):
    """A faked GPU with room for the run and the weights but k blocks (each swapped block frees its bytes, the
    two slots it streams through take two blocks'): k + 2 blocks swapped, said on the settings line; one byte
    less than every block swapped needs: refused."""
    model = values_mod.FileModel(WanModel.random(dataclasses.replace(model.cfg, num_layers=6), 0), "deep")
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 1)
    settings = config(devices="cuda:0")
    run_ = sampler_mod.check(model, settings, W, H, BLOCKS, cond(), None, None, None, None, 0, None)
    need = run_.session.memory(model.cfg, model.dtype, 1, 0)[0]
    weights, block = model.weight_bytes(), model.block_bytes()
    layers = model.cfg.num_layers
    for free, want in ((need + weights, 0), (need + weights - 1, 3), (need + weights - 3 * block, 5)):
        monkeypatch.setattr(devices_mod, "free_bytes", lambda d, free=free: free)
        assert blocks_to_swap(free, need, weights, block, layers) == want
        checked = sampler_mod.check(model, settings, W, H, BLOCKS, cond(), None, None, None, None, 0, None)
        sampler_mod.make_room(checked, model)
        assert checked.swapped == want
        assert ("resident" if not want else f"{want} of {layers} blocks swapped (chosen") in checked.settings_text
    everything = need + weights - layers * block + 2 * block
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: everything - 1)
    checked = sampler_mod.check(model, settings, W, H, BLOCKS, cond(), None, None, None, None, 0, None)
    with pytest.raises(ValueError, match=r"not enough GPU memory on cuda:0: .* even with every block swapped"):
        sampler_mod.make_room(checked, model)


def test_a_forced_swap_with_several_devices_or_too_many_blocks_is_refused(model, no_engine):
    with pytest.raises(ValueError, match="swap_blocks: block swap runs on one device"):
        _sample(model, config(devices="cpu,cpu", swap_blocks=1), cond())
    with pytest.raises(ValueError, match=f"swap_blocks: the model has {model.cfg.num_layers} transformer blocks, got 9"):
        _sample(model, config(swap_blocks=9), cond())


def test_the_loaders_fp8_choice_keeps_the_weights_fp8_and_stays_close(model):
    (fp8,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto",
                 weight_dtype="fp8_e4m3fn")
    layers = [m for m in fp8.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == model.cfg.num_layers * 10 and fp8.weight_dtype() == "fp8_e4m3fn"
    assert fp8.weight_bytes() < model.weight_bytes() - 2.9 * sum(m.weight.numel() for m in layers)
    conditioning = cond()
    want, _ = _sample(model, config(), conditioning)
    got, line = _sample(fp8, config(), conditioning)
    assert "weights fp8_e4m3fn, resident" in line
    dev = float((got - want).norm() / want.norm())
    assert 0 < dev < 0.1


def test_the_fp8_kv_cache_and_the_compile_choice_reach_the_run(model, monkeypatch):
    conditioning = cond()
    want, _ = _sample(model, config(), conditioning)
    got, line = _sample(model, config(kv_dtype="fp8"), conditioning)
    assert "not compiled" in line  # auto on a CPU
    assert 0 < float((got - want).norm() / want.norm()) < 0.02
    seen = []
    real = type(model.model).compile_layers
    monkeypatch.setattr(type(model.model), "compile_layers",
                        lambda self, enabled=True, backend="inductor": seen.append(enabled) or real(self, False))
    _, line = _sample(model, config(compile="on"), conditioning)
    assert seen == [True] and line.endswith("; compiled; weights float32, resident")
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        config(compile="fast")


def test_settings_carry_the_new_choices():
    settings = config(compile="off", kv_dtype="fp8", swap_blocks=4)
    assert (settings.compile, settings.cascade.kv_dtype, settings.swap_blocks) == ("off", "fp8", 4)
    assert dataclasses.replace(CascadeConfig(), kv_dtype="fp8").kv_dtype == "fp8"


def test_the_loader_lists_and_loads_gguf_files_kept_quantised(tmp_path):
    import folder_paths
    from test_gguf import write_gguf

    from cascade_core.model.gguf import GGUFLinear

    folder = folder_paths.get_folder_paths("diffusion_models")[0]
    write_gguf(f"{folder}/tiny_q8.gguf")
    options = NODES["BlockCascadeModelLoader"].GET_SCHEMA().inputs[0].options  # read when the node is drawn
    assert "tiny_q8.gguf" in (options["options"] if isinstance(options, dict) else options)
    (loaded,) = run("BlockCascadeModelLoader", model_name="tiny_q8.gguf", dtype="fp32", ema="auto")
    assert loaded.weight_dtype() == "gguf_Q4_K/Q8_0"
    assert sum(isinstance(m, GGUFLinear) for m in loaded.model.modules()) == loaded.cfg.num_layers * 10


def test_weights_comfyui_unloads_while_making_room_are_not_counted_free_twice(model, monkeypatch, no_engine):
    """Resident before ComfyUI makes room, unloaded by it: the free memory it reports already holds them."""
    deep = values_mod.FileModel(WanModel.random(dataclasses.replace(model.cfg, num_layers=6), 0), "deep")
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 1)
    settings = config(devices="cuda:0")
    checked = sampler_mod.check(deep, settings, W, H, BLOCKS, cond(), None, None, None, None, 0, None)
    need = checked.session.memory(deep.cfg, deep.dtype, 1, 0)[0]
    unloaded = []
    monkeypatch.setattr(deep, "resident_on", lambda d: not unloaded)
    monkeypatch.setattr(devices_mod, "make_room", lambda d, n: unloaded.append(d))
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: need + deep.weight_bytes() - 1)  # after unloading
    sampler_mod.make_room(checked, deep)
    assert unloaded and checked.swapped == 3  # one byte short of resident: the fewest swapped that fit


def test_a_runs_frames_are_written_in_place_and_image_is_that_tensor(model, monkeypatch):
    """A run of known length joins nothing at its end: IMAGE is the tensor each block's frames were written
    into as they came (a join would copy the whole video, 0.4 GB at 81 frames of 832x480)."""
    seen = []
    real = sampler_mod.stream.Reporter.images

    def images(self):
        out = real(self)
        seen.append((out, self.video, torch.cat(self.frames)))
        return out

    monkeypatch.setattr(sampler_mod.stream.Reporter, "images", images)
    with Recorder():
        run("BlockCascadeSampler", model=model, config=config(), positive=cond(), width=W, height=H, blocks=BLOCKS,
            seed=3)
    ((out, video, joined),) = seen
    assert isinstance(video, torch.Tensor) and out.untyped_storage().data_ptr() == video.untyped_storage().data_ptr()
    assert torch.equal(out, joined) and out.shape[0] == video.shape[0]  # every announced frame came


def test_a_run_that_fails_tells_the_client_one_line(model, monkeypatch):
    """An error of many lines (CUDA's out-of-memory text, a worker's trace) reaches the widget as its first line;
    ComfyUI gets the exception itself (its log keeps the rest)."""
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n  File \"x.py\", line 3, in f\n    boom()")

    monkeypatch.setattr(sampler_mod.RunSession, "runner", lambda self, device=None: broken)
    with Recorder() as rec, pytest.raises(RuntimeError, match="boom"):
        run("BlockCascadeSampler", model=model, config=config(), positive=cond(), width=W, height=H, blocks=BLOCKS,
            seed=3)
    (done,) = [d for e, d in rec.events("done")]
    assert done["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_finished_run_frees_its_tensors_without_a_collection(model):
    """A finished run leaves no reference cycle holding a tensor (its KV cache, latents, frames): the node no longer
    runs the garbage collector and empties the device's cache after each run (a tenth of a second a run; ComfyUI
    does both between prompts), so nothing of a run may wait for a collection to be freed. With the collector off
    and every unreachable object kept, a collection after the run finds no tensor."""
    import gc

    run("BlockCascadeSampler", model=model, config=config(), positive=cond(), width=W, height=H, blocks=BLOCKS, seed=3)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with Recorder():
            run("BlockCascadeSampler", model=model, config=config(), positive=cond(), width=W, height=H,
                blocks=BLOCKS, seed=3)
        gc.collect()
        held = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not held, f"tensors freed only by a collection: {held[:8]}"
