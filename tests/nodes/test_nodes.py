"""The ComfyUI nodes, run through the stand-in comfy modules (tests/comfy_stub) on a tiny model (CPU).

What this proves: the schemas build (V3 entry point, no V1 mappings); Load Causal Video Model, Prompt
Embeddings from File, Block Cascade Config, Prompt Schedule and the Sampler run end to end and give
the engine's own latents (RAW, core Wan2.1 layout) and frames; the widget events (start/state/frames/
done) are JSON, go to the queuing client, carry decodable JPEGs and consistent frame indices; progress
advances once per block; Cancel stops within one tick and the next run works; a core MODEL is
loaded/patched by ComfyUI first and its tensors are shared; and every bad input of the design's
section 6 is refused before the engine runs, with the allowed range in the message.
"""
from __future__ import annotations

import base64
import io as _io
import json
import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "comfy_stub"))
os.environ.setdefault("BLOCK_CASCADE_TEST_ROOT", tempfile.mkdtemp(prefix="bc-comfy-"))

import comfy.model_management as mm  # noqa: E402  (the stand-in)
import comfy.utils  # noqa: E402
import execution  # noqa: E402  (the stand-in's queue-time validation)
import folder_paths  # noqa: E402
import server  # noqa: E402
from conftest import TINY, tiny_models  # noqa: E402
from custom_node_loader import load_pack  # noqa: E402

from cascade_core.model.dit import WanModel  # noqa: E402
from cascade_core.session import RunSession  # noqa: E402
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate  # noqa: E402
from cascade_core.video.frames import LatentRGBDecoder  # noqa: E402

PACK, NODES = load_pack(ROOT)
PKG = PACK.__name__
sampler_mod = sys.modules[f"{PKG}.nodes.sampler"]
devices_mod = sys.modules[f"{PKG}.nodes.devices"]
stream_mod = sys.modules[f"{PKG}.nodes.stream"]
values_mod = sys.modules[f"{PKG}.nodes.values"]


tiny = tiny_models()
MODELS = folder_paths.models_dir
WRITTEN = tiny.write(MODELS, vae_width="tiny")
folder_paths.folder_names_and_paths.setdefault("prompt_embeds", ([os.path.join(MODELS, "prompt_embeds")], {".safetensors"}))

W, H, BLOCKS = 64, 32, 3


def run(node_id: str, unique_id: str = "7", **kwargs):
    cls = NODES[node_id].PREPARE_CLASS_CLONE({"UNIQUE_ID": unique_id})
    out = cls.execute(**kwargs)
    return out.args


class Recorder:
    """PromptServer.instance and the progress hook of ComfyUI, recording what the nodes send."""

    def __init__(self, on_event=None):
        self.server = server.PromptServer()
        self.progress = []
        self.on_event = on_event
        sent = self.server.sent

        def send_sync(event, data, sid=None):
            json.dumps(data)  # JSON only, or this raises
            sent.append((event, data, sid))
            if self.on_event is not None:
                self.on_event(event, data)

        self.server.send_sync = send_sync

    def __enter__(self):
        server.PromptServer.instance = self.server
        comfy.utils.PROGRESS_BAR_HOOK = lambda v, t, p, node_id=None: self.progress.append((v, t, node_id))
        return self

    def __exit__(self, *exc):
        server.PromptServer.instance = None
        comfy.utils.PROGRESS_BAR_HOOK = None

    def events(self, name=None):
        return [(e, d) for e, d, _ in self.server.sent if name is None or e == "block_cascade." + name]


@pytest.fixture(scope="module")
def model():
    (m,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto")
    return m


@pytest.fixture(scope="module")
def prompts():
    (a,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[0])
    (b,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[1])
    return a, b


def config(**kw):
    args = dict(parallel=3, attention="bidirectional", window=0, sink=0, steps="1000,750,500,250", shift=5.0,
                devices="auto", attention_backend="auto", flashblock=False)
    args.update(kw)
    (settings,) = run("BlockCascadeConfig", **args)
    return settings


@pytest.fixture(autouse=True)
def fast_state_events(monkeypatch):
    monkeypatch.setattr(stream_mod, "STATE_INTERVAL", 0.0)  # every tick's state event, to check them all
    mm.interrupt_current_processing(False)
    yield
    mm.interrupt_current_processing(False)


# ---- schemas ---------------------------------------------------------------------------------------
def test_schemas_build_and_register_through_the_v3_entry_point():
    assert set(NODES) == {"BlockCascadeModelLoader", "BlockCascadeFromModel", "BlockCascadeConfig",
                          "BlockCascadePromptSchedule", "BlockCascadeEmbedsLoader", "BlockCascadeDecoderLoader",
                          "BlockCascadeSampler", "BlockCascadeVideoToVideo"}
    assert not hasattr(PACK, "NODE_CLASS_MAPPINGS") and PACK.WEB_DIRECTORY == "./web"
    for cls in NODES.values():
        s = cls.GET_SCHEMA()
        assert s.category == "video/block cascade" and s.display_name and s.description
    s = NODES["BlockCascadeSampler"].GET_SCHEMA()
    assert [o.io_type for o in s.outputs] == ["LATENT", "IMAGE"]
    assert "UNIQUE_ID" in [h.value for h in s.hidden]
    ins = s.input_types()
    assert set(ins["optional"]) == {"positive", "schedule", "vae", "start_image", "prefix", "context_frames", "clip",
                                    "decoder", "preview_decoder"}
    assert ins["optional"]["clip"][0] == "CLIP" and "type wan" in ins["optional"]["clip"][1]["tooltip"]
    assert "blocks" in ins["required"]["blocks"][1]["display_name"] and "16 fps" in ins["required"]["blocks"][1]["tooltip"]
    assert "frame-wise" in ins["required"]["blocks"][1]["tooltip"]
    assert "latent-RGB preview" in ins["optional"]["vae"][1]["tooltip"]
    loader = NODES["BlockCascadeModelLoader"].INPUT_TYPES()["required"]
    assert loader["model_name"][0] == [tiny.DIT_NAME]
    assert list(loader) == ["model_name", "dtype", "ema", "lora", "lora_strength"]
    assert loader["lora_strength"][0] == "FLOAT" and loader["lora_strength"][1]["default"] == 1.0
    assert loader["lora_strength"][1]["min"] < 0 < 1 < loader["lora_strength"][1]["max"]


def test_root_module_imports_nothing_heavy_and_exposes_the_engine_by_name():
    code = ("import importlib.util, sys; p = sys.argv[1]; "
            "s = importlib.util.spec_from_file_location(p.replace('.', '_x_'), p + '/__init__.py'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('torch' in sys.modules, hasattr(m, 'comfy_entrypoint'), hasattr(m, 'NODE_CLASS_MAPPINGS')); "
            "import cascade_core; print(cascade_core.__file__.startswith(p))")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, cwd="/",
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False", "True"]


# ---- end to end ------------------------------------------------------------------------------------
def test_sampler_end_to_end_events_progress_and_outputs(model, prompts):
    from cascade_core.video.latents import normalized_to_raw

    settings = config()
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", unique_id="12", model=model, config=settings, width=W,
                             height=H, blocks=BLOCKS, seed=5, positive=prompts[0])
    # the engine's own result, untouched but for the RAW conversion of core Wan2.1 LATENTs
    ref = generate(model.model, PromptSchedule.single(prompts[0][0][0]), settings.cascade, blocks=BLOCKS,
                   width=W, height=H, seed=5)
    assert torch.equal(latent["samples"], normalized_to_raw(ref.latents.float()))
    assert latent["samples"].shape == (1, 16, 3 * BLOCKS, H // 8, W // 8)
    frames = 1 + 4 * (3 * BLOCKS - 1)
    assert images.shape == (frames, H, W, 3) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1

    names = [e for e, _ in rec.events()]
    assert names[0] == "block_cascade.start" and names[-1] == "block_cascade.done"
    assert all(sid == "client-1" for _, _, sid in rec.server.sent)
    (_, start), = rec.events("start")
    assert start == {"node": "12", "run": start["run"], "blocks": BLOCKS, "frames_total": frames, "fps": 16,
                     "width": W, "height": H, "stages": 5, "parallel": 3, "settings": start["settings"],
                     "clean_pass": True, "steerable": False, "compiling": False}
    assert start["settings"].startswith("self-forcing: 3 latent frame(s) a block; steps 1000,750,500,250 (warped, "
                                        "shift 5)") and "P3 bidirectional" in start["settings"]
    states = [d for _, d in rec.events("state")]
    assert [s["tick"] for s in states] == list(range(ref.ticks)) and states[-1]["done_blocks"] == BLOCKS
    assert all(isinstance(p, list) and len(p) == 2 for s in states for p in s["pairs"])
    assert max(len(s["pairs"]) for s in states) == 3  # three blocks in flight
    got = [d for _, d in rec.events("frames")]
    assert [d["block"] for d in got] == list(range(BLOCKS))
    assert [d["first_frame"] for d in got] == [0, 9, 21]
    assert sum(len(d["frames"]) for d in got) == frames
    from PIL import Image
    img = Image.open(_io.BytesIO(base64.b64decode(got[1]["frames"][0])))
    assert img.format == "JPEG" and img.size == (W, H)
    assert {d["run"] for _, d in rec.events()} == {start["run"]}
    (_, done), = rec.events("done")
    assert done["frames"] == frames and "error" not in done
    assert rec.progress == [(i, BLOCKS, "12") for i in range(1, BLOCKS + 1)]


def test_prompt_schedule_switches_prompts_at_blocks(model, prompts):
    (s0,) = run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=0)
    (s1,) = run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=2, previous=s0)
    settings = config(parallel=2, attention="causal")
    with Recorder():
        latent, _ = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=BLOCKS,
                        seed=1, schedule=s1)
    e0, e1 = prompts[0][0][0][0], prompts[1][0][0][0]
    ref = generate(model.model, PromptSchedule([(0, e0), (2, e1)]), settings.cascade, blocks=BLOCKS, width=W,
                   height=H, seed=1)
    from cascade_core.video.latents import normalized_to_raw
    assert torch.equal(latent["samples"], normalized_to_raw(ref.latents.float()))
    # order of chaining does not matter; a second prompt at one block is refused
    (t1,) = run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=2)
    (t0,) = run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=0, previous=t1)
    assert [s for s, _ in t0.entries] == [0, 2]
    with pytest.raises(ValueError, match="already has a prompt at block 2"):
        run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=2, previous=t0)


def test_a_prompt_schedule_entry_may_blend_into_its_prompt_over_blocks(model, prompts):
    """blend_blocks N on an entry: the sampler runs the engine's blended switch (sampling.blend); 0 is the
    hard switch; block 0 (nothing before it) and N outside 0..64 are refused in one line."""
    (s0,) = run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=0)
    (s1,) = run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=2, previous=s0, blend_blocks=2)
    assert s1.blends == ((2, 2),)
    settings = config(parallel=2, attention="causal")
    with Recorder():
        latent, _ = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=BLOCKS,
                        seed=1, schedule=s1)
    e0, e1 = prompts[0][0][0][0], prompts[1][0][0][0]
    ref = generate(model.model, PromptSchedule([(0, e0), (2, e1)], {2: 2}), settings.cascade, blocks=BLOCKS,
                   width=W, height=H, seed=1)
    from cascade_core.video.latents import normalized_to_raw
    assert torch.equal(latent["samples"], normalized_to_raw(ref.latents.float()))
    (hard,) = run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=2, previous=s0, blend_blocks=0)
    assert hard.blends == ()
    for start, n, words in ((0, 2, "at start block 0: the first prompt has nothing to blend from"),
                            (2, 65, "blend_blocks must lie in 0..64")):
        with pytest.raises(ValueError, match=words) as info:
            run("BlockCascadePromptSchedule", conditioning=prompts[1], start_block=start, blend_blocks=n)
        assert "\n" not in str(info.value)


def test_sampler_with_a_core_vae_streams_decoded_frames(model, prompts):
    from cascade_core.video.vae import WanVAEDecoder

    sd = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(WRITTEN["vae"]).items()}

    class CoreVAE:  # what VAELoader returns, as far as the pack uses it
        latent_channels = 16

        def get_sd(self):
            return sd

    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=model, config=config(), width=W, height=H,
                             blocks=BLOCKS, seed=2, vae=CoreVAE(), positive=prompts[0])
    from cascade_core.video.latents import raw_to_normalized
    z = raw_to_normalized(latent["samples"])
    stream = WanVAEDecoder.from_state_dict(sd, dtype=torch.float32, device="cpu").stream()
    ref = torch.cat([stream.decode(z[:, :, 3 * b:3 * b + 3]) for b in range(BLOCKS)], 2)
    ref = ((ref[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    assert images.shape == ref.shape
    assert torch.allclose(images, ref, atol=1e-4)
    assert sum(len(d["frames"]) for _, d in rec.events("frames")) == images.shape[0]


def test_core_model_is_loaded_and_patched_by_comfy_first_and_shared(prompts):
    inner = WanModel.random(tiny.TINY_DIT, seed=3)

    class Patcher:  # a core MODEL: ComfyUI's loading applies the LoRA patch to the weights in place
        def __init__(self):
            self.model = type("WAN21", (), {})()
            self.model.diffusion_model = inner
            self.patched = False

        def patch_model(self):
            if not self.patched:
                with torch.no_grad():
                    inner.head.head.weight.add_(0.25)
                self.patched = True

    patcher = Patcher()
    before = inner.head.head.weight.clone()
    (m,) = run("BlockCascadeFromModel", model=patcher)
    mm.calls.clear()
    wan = m.acquire(torch.device("cpu"), 0)
    assert any(c[0] == "load_models_gpu" and c[2] and c[3] for c in mm.calls)  # force patch + full load
    assert torch.equal(wan.head.head.weight, before + 0.25)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(wan.state_dict().values(), inner.state_dict().values()))
    with Recorder() as rec:
        latent, _ = run("BlockCascadeSampler", model=m, config=config(parallel=1, attention="causal"), width=W,
                        height=H, blocks=2, seed=0, positive=prompts[0])
    assert latent["samples"].shape[2] == 6 and len(rec.events("frames")) == 2


def test_a_pool_gets_the_weights_once_while_comfys_patches_are_unchanged(monkeypatch):
    """Causal Model from MODEL on several devices: three runs upload the weights to the worker pool
    once; a LoRA change (new patches, so a new patcher and patches_uuid) uploads them again. The
    weights are taken on the CPU (ComfyUI patches a CPU clone): the GPU-side acquire never runs, so no
    GPU of ComfyUI's process holds a copy beside a worker's."""
    import uuid

    from cascade_core import distributed

    inner = WanModel.random(tiny.TINY_DIT, seed=3)

    class Patcher:  # a core MODEL: loading applies its patch (a LoRA) to the weights in place
        def __init__(self, delta):
            self.model = type("WAN21", (), {})()
            self.model.diffusion_model = inner
            self.delta, self.patches_uuid, self.load_device = delta, uuid.uuid4(), torch.device("cuda", 0)

        def clone(self):
            c = Patcher.__new__(Patcher)
            c.__dict__.update(self.__dict__)
            return c

        def patch_model(self):
            assert self.load_device == torch.device("cpu")  # only the CPU clone is ever loaded
            with torch.no_grad():
                inner.head.head.bias.copy_(torch.full_like(inner.head.head.bias, self.delta))

    uploads = []
    real_upload = distributed.WorkerPool._upload
    monkeypatch.setattr(distributed.WorkerPool, "_upload",
                        lambda pool, model, *args: (uploads.append(model), real_upload(pool, model, *args)))
    monkeypatch.setattr(values_mod.CoreModel, "acquire", lambda *a, **k: pytest.fail("GPU-side acquire ran"))
    settings = values_mod.Settings(cascade=CascadeConfig(parallel=2, frames_per_block=3), devices="cpu,cpu")
    outs, conditioning = [], cond()
    try:
        for delta in (0.5, 0.5, 0.5, 0.75):  # the fourth: a changed LoRA
            if not outs or delta != 0.5:
                (m,) = run("BlockCascadeFromModel", model=Patcher(delta))
            with Recorder():
                outs.append(run("BlockCascadeSampler", model=m, config=settings, positive=conditioning, width=W,
                                height=H, blocks=2, seed=5)[0]["samples"])
    finally:
        distributed.close_pools()
    assert len(uploads) == 2, f"{len(uploads)} uploads"
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[2], outs[3])  # the new patch reached the workers


def test_core_model_that_is_not_wan_t2v_is_refused():
    i2v = WanModel.random(tiny.TINY_DIT, seed=0)
    i2v.register_parameter("img_emb_weight", torch.nn.Parameter(torch.zeros(1)))
    patcher = type("P", (), {})()
    patcher.model = type("WAN21", (), {})()
    patcher.model.diffusion_model = i2v
    with pytest.raises(ValueError, match="not a Wan2.1 text-to-video DiT.*image-to-video"):
        run("BlockCascadeFromModel", model=patcher)
    patcher.model.diffusion_model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a Wan2.1 T2V DiT"):
        run("BlockCascadeFromModel", model=patcher)


# ---- cancel ----------------------------------------------------------------------------------------
def test_cancel_stops_within_one_tick_frees_memory_and_the_next_run_works(model, prompts):
    stop_at = {}

    def on_event(event, data):
        if event == "block_cascade.state" and data["tick"] == 2:
            mm.interrupt_current_processing(True)  # what POST /interrupt does
            stop_at["tick"] = 2

    mm.calls.clear()
    with Recorder(on_event) as rec:
        with pytest.raises(mm.InterruptProcessingException):
            run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=3,
                positive=prompts[0])
    assert stop_at and max(d["tick"] for _, d in rec.events("state")) == 2  # no tick after the one it saw
    (_, done), = rec.events("done")
    assert done["stopped"] is True and done["blocks"] == 0 and "video" not in done  # no block final: nothing kept
    assert not mm.processing_interrupted()  # ComfyUI's flag is consumed
    assert ("soft_empty_cache",) in mm.calls
    with Recorder() as rec:
        latent, _ = run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS,
                        seed=3, positive=prompts[0])
    assert latent["samples"].shape[2] == 3 * BLOCKS and "error" not in rec.events("done")[0][1]


def test_comfys_progress_hook_raising_at_cancel_does_not_lose_what_was_made(model, prompts):
    """ComfyUI's progress hook raises its interrupt exception when Cancel is up (lowering the flag): Cancel pressed
    as block 0 is final reaches the hook first, yet the run still stops at its next tick and keeps block 0."""
    pressed = []

    def hook(value, total, preview, node_id=None):
        if not pressed:  # Cancel pressed just before the first update
            pressed.append(value)
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()  # ComfyUI's hook does exactly this

    with Recorder() as rec:
        comfy.utils.PROGRESS_BAR_HOOK = hook
        latent, images = run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS,
                             seed=3, positive=prompts[0])
    (_, done), = rec.events("done")
    assert done["stopped"] is True and done["blocks"] == 1 and "video" in done
    assert latent["samples"].shape[2] == 3 and images.shape[0] == 9
    assert not mm.processing_interrupted()


def test_cancel_while_a_block_is_being_decoded_keeps_that_block_whole(model, prompts, monkeypatch):
    """Cancel pressed while the first final block is decoded: its decode goes on to the end (a final block is
    kept), the run stops at its next tick, and the outputs and the saved video hold that block's frames."""
    from safetensors.torch import load_file

    from cascade_core.video.vae import WanVAEDecoder

    sd = load_file(WRITTEN["vae"])

    class CoreVAE:
        latent_channels = 16

        def get_sd(self):
            return sd

    decoded = []  # latent frames through the decoder, per pass
    real_pass = WanVAEDecoder.decode_pass

    def decode_pass(self, z, state):
        decoded.append(z.shape[2])
        mm.interrupt_current_processing(True)  # Cancel pressed during the decode of the first block
        return real_pass(self, z, state)

    monkeypatch.setattr(WanVAEDecoder, "decode_pass", decode_pass)
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS,
                             seed=3, vae=CoreVAE(), positive=prompts[0])
    assert sum(decoded) == 3 == latent["samples"].shape[2]  # the whole first block, and only it
    (_, done), = rec.events("done")
    assert done["stopped"] is True and done["blocks"] == 1 and done["video"]["filename"].endswith(".mp4")
    assert images.shape[0] == done["frames"] == 9
    assert not mm.processing_interrupted()


def test_the_log_gives_the_runs_real_duration_also_through_a_worker_pool(model, prompts, monkeypatch, caplog):
    import dataclasses
    import logging
    import re
    import time

    def pool_like(run_devices):  # a worker pool reports only its own compute time
        def run(*a, **k):
            time.sleep(0.3)
            return dataclasses.replace(generate(*a, **k), seconds=0.001)
        return run

    monkeypatch.setattr(RunSession, "runner", lambda self, device=None: pool_like(self.devices))
    with caplog.at_level(logging.INFO, logger="block_cascade"):
        with Recorder() as rec:
            run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=3,
                positive=prompts[0])
    (line,) = [r.getMessage() for r in caplog.records if " frames in " in r.getMessage()]
    seconds = float(re.search(r"frames in ([0-9.]+) s", line).group(1))
    assert seconds >= 0.3, line
    assert rec.events("done")[0][1]["seconds"] >= 0.3  # the widget's summary


def test_every_event_carries_the_run_so_a_reloaded_page_can_join(model, prompts):
    with Recorder() as rec:
        run("BlockCascadeSampler", model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=1,
            positive=prompts[0])
    (_, start), = rec.events("start")
    for kind in ("state", "frames"):
        for _, data in rec.events(kind):
            assert {k: data[k] for k in start} == start
    (_, done), = rec.events("done")
    assert done["blocks"] == len(rec.events("frames")) == BLOCKS


# ---- bad input: refused before any engine work -----------------------------------------------------
@pytest.fixture
def no_engine(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the engine ran although the input is bad")

    monkeypatch.setattr(RunSession, "runner", lambda self, device=None: forbidden)
    monkeypatch.setattr(values_mod.FileModel, "acquire", forbidden)
    monkeypatch.setattr(values_mod.CoreModel, "acquire", forbidden)


def sample(model, **kw):
    args = dict(model=model, config=config(), width=W, height=H, blocks=BLOCKS, seed=0)
    args.update(kw)
    with Recorder() as rec:
        run("BlockCascadeSampler", **args)
    return rec


def test_several_devices_run_through_the_worker_pool_with_the_same_latents(model):
    from cascade_core import distributed

    conditioning = cond()
    outs = {}
    try:
        for spec in ("cpu", "cpu,cpu"):
            settings = values_mod.Settings(cascade=CascadeConfig(parallel=2, frames_per_block=3), devices=spec)
            with Recorder():
                outs[spec] = run("BlockCascadeSampler", model=model, config=settings, positive=conditioning,
                                 width=W, height=H, blocks=BLOCKS, seed=5)
        assert distributed.get_pool(["cpu", "cpu"]).world_size == 2  # the pool really ran two ranks
    finally:
        distributed.close_pools()
    one, two = (outs[s][0]["samples"] for s in ("cpu", "cpu,cpu"))
    assert one.shape == two.shape and (one - two).abs().max() <= 1e-4


def cond(width=4096, tokens=8, n=1):
    return [[torch.randn(1, tokens, width), {}] for _ in range(n)]


@pytest.mark.parametrize("kw, message", [
    (dict(positive=cond(768)), r"width 768.*expects 4096"),
    (dict(positive=cond(n=2)), r"holds 2 prompts"),
    (dict(positive=[]), r"CONDITIONING is empty"),
    (dict(), r"^no prompt: connect positive \(one prompt\) or schedule \(Prompt Schedule\)$"),
    (dict(positive=cond(), schedule="EMPTY"), r"either positive .* or schedule .*, not both$"),
    (dict(schedule="EMPTY"), r"prompt schedule is empty"),
    (dict(schedule="BEYOND"), r"block 5 is beyond the video.*0\.\.2"),
    (dict(schedule="LATE_START"), r"first prompt must start at block 0"),
    (dict(schedule="WIDE"), r"prompt at block 0: .*width 1024"),
    (dict(positive=cond(), width=830), r"width must be a multiple of 16 in 16\.\.4096"),
    (dict(positive=cond(), height=0), r"height must be a multiple of 16"),
    (dict(positive=cond(), blocks=-1), r"length \(blocks\) must lie in 0\.\.1000 .*0 = endless"),
    (dict(positive=cond(), blocks=0), r"^an endless video \(blocks 0, until stopped\) needs a local window"),
])
def test_bad_sampler_inputs_are_refused_before_the_engine_runs(model, no_engine, kw, message):
    ScheduleValue = values_mod.ScheduleValue
    special = {"EMPTY": ScheduleValue(), "BEYOND": ScheduleValue(((0, torch.randn(4, 4096)), (5, torch.randn(4, 4096)))),
               "LATE_START": ScheduleValue(((1, torch.randn(4, 4096)),)),
               "WIDE": ScheduleValue(((0, torch.randn(4, 1024)),))}
    if kw.get("schedule") in special:
        kw["schedule"] = special[kw["schedule"]]
    with pytest.raises(ValueError, match=message):
        sample(model, **kw)


@pytest.mark.parametrize("backend, message", [
    ("flash4", r"flash4 runs only on NVIDIA Hopper and Blackwell GPUs \(CUDA\) in float16 or bfloat16; "
               r"this run is on cpu in float32: run on a CUDA GPU, or use auto$"),
    ("cudnn", r"attention backend cudnn is not available on cpu for float32; use auto"),
])
def test_an_attention_backend_the_device_lacks_is_refused_before_the_engine_runs(model, no_engine, monkeypatch,
                                                                                  backend, message):
    from cascade_core.model.attention_libraries import LIBRARY_KERNELS

    monkeypatch.setattr(LIBRARY_KERNELS["flash4"], "loaded", False)  # flash-attn-4 not installed
    settings = values_mod.Settings(cascade=CascadeConfig(), attention_backend=backend)
    with pytest.raises(ValueError, match=message):
        sample(model, config=settings, positive=cond())


CONFIG_WIDGETS = dict(parallel=1, attention="causal", window=0, sink=0, steps="1000,750,500,250", shift=5.0,
                      devices="auto", attention_backend="auto", flashblock=False)
SAMPLER_WIDGETS = dict(model=["1", 0], config=["2", 0], width=832, height=480, blocks=7, seed=0)


def queue_errors(node: str, **inputs) -> list[tuple[str, str]]:
    """(input name, details) of every error ComfyUI's queue-time validation reports for one node."""
    return [(e["extra_info"]["input_name"], e["details"]) for e in execution.node_errors(NODES[node], inputs)]


@pytest.mark.parametrize("node, bad, fault, text", [
    ("BlockCascadeConfig", dict(steps="250,500"), "steps", "strictly decrease"),
    ("BlockCascadeConfig", dict(steps="a,b"), "steps", "comma-separated integers"),
    ("BlockCascadeConfig", dict(parallel=18), "parallel", ""),
    ("BlockCascadeConfig", dict(shift=-1.0), "shift", ""),
    ("BlockCascadeConfig", dict(attention_backend="nope"), "attention_backend", "nope"),
    ("BlockCascadeConfig", dict(attention="sideways"), "attention", "sideways"),
    ("BlockCascadeSampler", dict(width=3), "width", ""),
    ("BlockCascadeSampler", dict(blocks=-1), "blocks", ""),
    ("BlockCascadePromptSchedule", dict(conditioning=["3", 0], start_block=1000), "start_block", "0..999"),
    ("BlockCascadePromptSchedule", dict(conditioning=["3", 0], start_block=2, blend_blocks=65), "blend_blocks", ""),
    ("BlockCascadePromptSchedule", dict(conditioning=["3", 0], start_block=2, blend_blocks=-1), "blend_blocks", ""),
])
def test_a_refused_input_is_reported_once_on_the_input_at_fault(node, bad, fault, text):
    base = {"BlockCascadeConfig": CONFIG_WIDGETS, "BlockCascadeSampler": SAMPLER_WIDGETS,
            "BlockCascadePromptSchedule": dict(conditioning=["3", 0], start_block=0)}[node]
    assert queue_errors(node, **base) == []
    errors = queue_errors(node, **{**base, **bad})
    assert len(errors) == 1 and errors[0][0] == fault and text in errors[0][1], errors


def test_checks_across_inputs_are_reported_once_when_the_config_runs():
    # a linked steps widget is checked when the node runs
    assert queue_errors("BlockCascadeConfig", **{**CONFIG_WIDGETS, "steps": ["5", 0]}) == []
    with pytest.raises(ValueError, match=r"parallelism must lie in 1\.\.5 .*steps \+ 1"):
        config(parallel=6)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        config(parallel=5, steps="1000,750,500")
    with pytest.raises(ValueError, match=r"window must be 0 \(unlimited\) or at least sink \+ one block = 3"):
        config(window=2)
    with pytest.raises(ValueError, match=r"at least sink \+ one block = 6"):
        config(window=5, sink=3)
    assert config(window=12, sink=3).cascade.window == 12
    with pytest.raises(ValueError, match=r"with window 0 \(unlimited\) every frame is attended anyway"):
        config(window=0, sink=3)  # a sink without a window would silently do nothing
    with pytest.raises(ValueError, match="shift must lie in 0.1..20"):
        config(shift=0.05)
    with pytest.raises(ValueError, match="in-flight attention"):
        config(attention="sideways")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        config(attention_backend="nope")


def test_devices_absent_several_or_full_are_named_with_their_free_memory(model, monkeypatch, no_engine):
    GIB = 1024 ** 3
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 0)
    with pytest.raises(ValueError, match=r"cuda:0 is not present.*0 CUDA device"):
        config(devices="cuda:0")
    with pytest.raises(ValueError, match="not a device"):
        config(devices="gpu zero")
    # two present GPUs: several devices are accepted (the worker pool runs them), CPU and GPU mixed are not
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 2)
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: (3 * GIB) // (1 + d.index))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    assert config(devices="cuda:0,cuda:1").devices == "cuda:0,cuda:1"
    with pytest.raises(ValueError, match="mixes CPU and CUDA"):
        config(devices="cpu,cuda:0")
    with pytest.raises(ValueError) as exc:
        config(devices="cuda:0,cuda:2")
    msg = str(exc.value)
    assert "cuda:2 is not present" in msg and "cuda:0 (Test GPU, 3.0 GiB free), cuda:1 (Test GPU, 1.5 GiB free)" in msg
    # a GPU already full: refused before anything moves, naming the GPU and its free memory
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: GIB // 10)
    mm.calls.clear()
    settings = values_mod.Settings(cascade=CascadeConfig(parallel=2), devices="cuda:1")
    with pytest.raises(ValueError, match=r"not enough GPU memory on cuda:1.*0\.10 GiB are free even with every block swapped"):
        sample(model, config=settings, positive=cond())
    assert mm.calls[0][0] == "free_memory"  # ComfyUI was asked to unload its own models first
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 0)


def test_bad_vae_is_refused_before_the_engine_runs(model, no_engine):
    class Wan22VAE:
        latent_channels = 48

        def get_sd(self):
            return {}

    class SDVAE:
        latent_channels = 16

        def get_sd(self):
            return {"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}

    with pytest.raises(ValueError, match="48 latent channels.*Wan2.1 VAE"):
        sample(model, positive=cond(), vae=Wan22VAE())
    with pytest.raises(ValueError, match="not a Wan2.1 VAE"):
        sample(model, positive=cond(), vae=SDVAE())


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return os.path.basename(path)


def test_bad_checkpoint_files_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    folder = os.path.join(MODELS, "diffusion_models")
    good = open(os.path.join(folder, tiny.DIT_NAME), "rb").read()
    truncated = _write(os.path.join(folder, "bc_truncated.safetensors"), good[: len(good) // 2])
    others = {  # not a Wan2.1 T2V DiT: the message names the file and what it looks like
        "bc_sd15_like.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
                                     "Stable Diffusion"),
        "bc_vae_like.safetensors": (tiny.vae_state_dict("tiny"), "VAE"),
        "bc_i2v_like.safetensors": ({**tiny.tiny_dit_state_dict(), "img_emb.proj.0.bias": torch.zeros(3)},
                                    "image-to-video"),
        "bc_t5_like.safetensors": ({"shared.weight": torch.zeros(4, 4),
                                    "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)},
                                   "text encoder"),
    }
    for name, (sd, what) in others.items():
        save_file(sd, os.path.join(folder, name))
        with pytest.raises(ValueError, match=f"{name}: not a Wan2.1 .*{what}"):
            run("BlockCascadeModelLoader", model_name=name, dtype="fp32", ema="auto")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = os.path.join(folder, "bc_evil.pt")
    torch.save({"w": Evil()}, evil)
    for name in (truncated, os.path.basename(evil)):
        with pytest.raises(ValueError) as err:
            run("BlockCascadeModelLoader", model_name=name, dtype="fp32", ema="auto")
        assert name in str(err.value)
    assert not marker.exists()  # the pickle's code never ran
    with pytest.raises(ValueError, match="refused"):
        run("BlockCascadeModelLoader", model_name=os.path.basename(evil), dtype="fp32", ema="auto")
    # nothing else broke: the good file still loads
    (m,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto")
    assert m.cfg.text_dim == 4096


def test_bad_embeddings_files_are_refused_naming_the_file():
    from safetensors.torch import save_file

    folder = os.path.join(MODELS, "prompt_embeds")
    save_file({"a": torch.zeros(4, 4096), "b": torch.zeros(4, 4096)}, os.path.join(folder, "bc_two.safetensors"))
    save_file({"a": torch.zeros(4, 4, 4096)}, os.path.join(folder, "bc_3d.safetensors"))
    with pytest.raises(ValueError, match="bc_two.safetensors: expected exactly one tensor"):
        run("BlockCascadeEmbedsLoader", embeds="bc_two.safetensors")
    with pytest.raises(ValueError, match=r"bc_3d.safetensors: expected prompt embeddings \[L, 4096\]"):
        run("BlockCascadeEmbedsLoader", embeds="bc_3d.safetensors")
    (c,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[0])
    assert c[0][0].shape == (1, tiny.EMBED_TOKENS, 4096)


# ---- the event stream on its own ------------------------------------------------------------------
def test_state_events_are_rate_limited_but_the_last_tick_always_goes(monkeypatch):
    monkeypatch.setattr(stream_mod, "STATE_INTERVAL", 0.1)
    now = [0.0]
    sent = []
    r = stream_mod.Reporter("3", 40, 120, 5, 5, 64, 32, LatentRGBDecoder(), send=lambda e, d: sent.append((e, d)),
                            clock=lambda: now[0])
    r.start()
    ev = type("Tick", (), {})
    for t in range(44):
        now[0] = 0.01 * t
        e = ev()
        e.tick, e.ticks, e.pairs, e.done_blocks = t, 44, ((t, 0),), 0
        r.on_tick(e)
    ticks = [d["tick"] for e, d in sent if e == "block_cascade.state"]
    assert ticks[0] == 0 and ticks[-1] == 43 and len(ticks) <= 7  # 0.44 s of ticks: at most ~10/s, plus the last
    assert stream_mod.preview_size(832, 480) == (320, 184) and stream_mod.preview_size(64, 32) == (64, 32)


def test_frames_are_encoded_and_sent_off_the_loop_thread_in_order_before_done():
    import threading

    from cascade_core.sampling.loop import BlockEvent

    g = torch.Generator().manual_seed(4)
    factors = torch.randn(16, 3, generator=g) * 0.02
    sent = []  # (event, data, thread)
    before = set(threading.enumerate())
    r = stream_mod.Reporter("3", 3, 9, 5, 1, 64, 32, LatentRGBDecoder(factors, torch.zeros(3)),
                            send=lambda e, d: sent.append((e, d, threading.get_ident())))
    r.start()
    z = torch.randn(1, 16, 9, 2, 4, generator=g)
    for b in range(3):
        r.on_block(BlockEvent(b, z[:, :, 3 * b:3 * b + 3], b, 0.0))
    r.finish()
    r.done()
    frames = [(d["block"], d["first_frame"], len(d["frames"]), t) for e, d, t in sent if e.endswith(".frames")]
    assert [f[:3] for f in frames] == [(0, 0, 9), (1, 9, 12), (2, 21, 12)]
    assert threading.get_ident() not in {f[3] for f in frames}  # JPEGs are encoded off the sampler's loop
    assert sent[-1][0] == "block_cascade.done" and sent[-1][1]["frames"] == 33 and sent[-1][1]["blocks"] == 3
    # the IMAGE output: the preview of one decode of all latents (the oracle: latent RGB by hand)
    expected = torch.einsum("c,cr->r", z[0, :, 0].mean((1, 2)), factors)
    assert r.images().shape == (33, 32, 64, 3)
    assert torch.allclose(r.images()[0].mean((0, 1)), ((expected + 1) / 2).clamp(0, 1), atol=1e-4)
    assert set(threading.enumerate()) == before


def test_model_loader_merges_a_lora_from_the_loras_folder():
    from safetensors.torch import save_file

    rank, dim = 4, tiny.TINY_DIT.dim
    lora = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(rank, dim),
            "blocks.0.self_attn.q.lora_B.weight": torch.randn(dim, rank)}
    os.makedirs(os.path.join(MODELS, "loras"), exist_ok=True)
    save_file(lora, os.path.join(MODELS, "loras", "bc_tiny_lora.safetensors"))
    options = NODES["BlockCascadeModelLoader"].INPUT_TYPES()["required"]["lora"][0]
    assert options[0] == "none" and "bc_tiny_lora.safetensors" in options
    (plain,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto", lora="none")
    (merged,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto",
                    lora="bc_tiny_lora.safetensors")
    delta = merged.model.blocks[0].self_attn.q.weight - plain.model.blocks[0].self_attn.q.weight
    assert torch.allclose(delta, lora["blocks.0.self_attn.q.lora_B.weight"] @ lora["blocks.0.self_attn.q.lora_A.weight"],
                          atol=1e-4)
    assert torch.equal(merged.model.blocks[1].self_attn.q.weight, plain.model.blocks[1].self_attn.q.weight)
    assert "bc_tiny_lora.safetensors" in merged.info
    (half,) = run("BlockCascadeModelLoader", model_name=tiny.DIT_NAME, dtype="fp32", ema="auto",
                  lora="bc_tiny_lora.safetensors", lora_strength=0.5)
    half_delta = half.model.blocks[0].self_attn.q.weight - plain.model.blocks[0].self_attn.q.weight
    assert torch.allclose(half_delta, 0.5 * delta, atol=1e-5) and "x0.5" in half.info


def test_window_sink_and_flashblock_settings_reach_the_engine(model, prompts):
    settings = config(parallel=2, window=6, sink=3, flashblock=True, attention_backend="math")
    c = settings.cascade
    assert (c.window, c.sink, c.flashblock, c.parallel, settings.attention_backend) == (6, 3, "reuse", 2, "math")
    assert config(window=0).cascade.window is None  # 0 = unlimited
    with Recorder() as rec:
        latent, _ = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=4, seed=9,
                        positive=prompts[0])
    ref = generate(model.model, PromptSchedule.single(prompts[0][0][0][0]), c, blocks=4, width=W, height=H, seed=9)
    from cascade_core.video.latents import normalized_to_raw
    assert torch.equal(latent["samples"], normalized_to_raw(ref.latents.float()))
    assert len(rec.events("frames")) == 4


FP8_VARIANTS = [(fp8, naming, per_row) for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2)
                for naming, per_row in ((None, False), ("scale_weight", False), ("weight_scale", False),
                                        ("scale_weight", True))]


@pytest.mark.parametrize("fp8, naming, per_row", FP8_VARIANTS)
def test_fp8_weights_read_the_same_from_a_file_and_from_a_core_model(fp8, naming, per_row, tmp_path):
    """A scaled or unscaled e4m3 / e5m2 model (per-tensor or per-row scales, either scale name, with
    ComfyUI's activation scales) gives identical weights through the checkpoint loader and through the
    Causal Model from MODEL path: the blocks' Linear weights kept fp8 (their stored bytes, a scale a row),
    every weight, widened, equal to weight.float() * scale cast to bf16."""
    from cascade_core.model.fp8 import dequantize_state_dict
    from cascade_core.weights.checkpoint import load_dit
    from cascade_core.weights.safe_io import save_safetensors

    g = torch.Generator().manual_seed(7)
    stored, expected = {}, {}
    for k, v in WanModel.random(TINY, seed=2).state_dict().items():
        if v.dim() == 2 and k.endswith(".weight"):
            amax = v.abs().amax(dim=1, keepdim=True) if per_row else v.abs().max()
            scale = (amax / torch.finfo(fp8).max).float() if naming else torch.tensor(1.0)
            q = (v / scale).to(fp8)
            stored[k] = q
            if naming:
                stored[k[: -len("weight")] + naming] = scale
                stored[k[: -len("weight")] + "scale_input"] = torch.rand((), generator=g)
            expected[k] = (q.float() * scale).bfloat16()
        else:
            stored[k], expected[k] = v, v.bfloat16()
    path = str(tmp_path / "model.safetensors")
    save_safetensors({"model.diffusion_model." + k: v for k, v in stored.items()}, path)
    from_file, info = load_dit(path, dtype=torch.bfloat16)
    from_model, dtype, fast = values_mod.compute_weights(dict(stored), torch.bfloat16)
    assert dtype == torch.bfloat16 and fast == info.fast_fp8 == (fp8 == torch.float8_e4m3fn)
    assert set(from_file) == set(from_model)
    kept = [k for k, v in from_model.items() if v.dtype == fp8]
    assert len(kept) == TINY.num_layers * 10 and all(k.startswith("blocks.") for k in kept)
    for k in kept:  # the stored bytes themselves
        assert torch.equal(from_model[k].view(torch.uint8), stored[k].view(torch.uint8)), k
    widened_file, widened_model = (dequantize_state_dict(sd, torch.bfloat16)[0] for sd in (from_file, from_model))
    assert set(widened_file) == set(widened_model) == set(expected)
    for k in expected:
        assert torch.equal(widened_file[k], expected[k]), k
        assert torch.equal(widened_model[k], expected[k]), k


@pytest.mark.parametrize("spec, message", [
    ("cpu,cuda:0", "devices: cpu,cuda:0 mixes CPU and CUDA; use only cuda:N or only cpu"),
    ("cuda:1,cuda:1", "devices: cuda:1 is listed twice in cuda:1,cuda:1; one process per GPU"),
    ("cuda:0,cuda:2", "devices: cuda:2 is not present; cuda:0,cuda:2 asks for 2 GPU(s) and this machine has 2 "
                      "CUDA device(s): cuda:0 (Test GPU, 3.0 GiB free), cuda:1 (Test GPU, 1.5 GiB free)"),
])
def test_the_node_and_the_command_line_parse_device_lists_alike(spec, message, monkeypatch, capsys):
    """One parser: the config node and --devices refuse a bad list with the same words; the node
    adds ComfyUI's free memory (the command line, the device's own)."""
    from cascade_core.cli.command import main as cli_main

    GIB = 1024 ** 3
    monkeypatch.setattr(devices_mod, "cuda_count", lambda: 2)
    monkeypatch.setattr(devices_mod, "free_bytes", lambda d: (3 * GIB) // (1 + d.index))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (3 * GIB // (1 + torch.device(d).index), 8 * GIB))
    with pytest.raises(ValueError) as exc:
        config(devices=spec)
    assert str(exc.value) == message
    assert cli_main(["generate", "--width", "64", "--height", "32", "--blocks", "1", "--quiet",
                     "--devices", spec]) == 2
    assert capsys.readouterr().err.strip().endswith(message)


@pytest.fixture
def server_routes(monkeypatch):
    """A route table on the stand-in ComfyUI server (aiohttp's RouteTableDef, as far as the pack uses
    it: ``get``/``post`` decorators); the routes added, as (method, path, handler)."""
    import server

    class Routes(list):
        def _add(self, method, path):
            def add(handler):
                self.append(types.SimpleNamespace(method=method, path=path, handler=handler))
                return handler
            return add

        def get(self, path):
            return self._add("GET", path)

        def post(self, path):
            return self._add("POST", path)

    routes = Routes()
    monkeypatch.setattr(server.PromptServer, "instance", types.SimpleNamespace(routes=routes))
    return routes
