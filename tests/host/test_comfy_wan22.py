"""The Wan2.2 workflows of the pack inside a real ComfyUI (CPU): skipped unless COMFYUI_DIR points at a ComfyUI
checkout (the host of test_comfy_host.py, whose helpers this file imports).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/venv/bin/python python -m pytest -q tests/host/test_comfy_wan22.py

Proves that three shipped API workflows run to execution_success with their graphs as shipped, only the prompt
texts (tiny embeddings), the video size (32 x 32), the blocks and the compute dtype changed, on tiny random files of
the released layouts written into the host's models folder:
- longlive2_text_to_video.json and longlive2_image_to_video.json: LongLive 2.0's DiT (the Wan2.2-TI2V-5B
  architecture: 48 latent channels in and out, width 64, text width 4096) as the workflows name it,
  ``longlive2/model_bf16.pt`` in LongLive's layout (``{"generator": {"model.<key>": ...}}``, bf16; the pack reads
  it with weights_only), and core VAELoader's Wan2.2 VAE, which decodes the frames and, for image to video, encodes
  the start image (core LoadImage of a small PNG of another size). ComfyUI builds the Wan2.2 VAE at the released
  widths only (encoder 160, decoder 256; a file of other shapes fails its load_state_dict), so the file is a
  complete random Wan2.2 VAE at those widths under the names of ``Wan2.2_VAE.pth`` (as ComfyUI's
  ``wan2.2_vae.safetensors`` keeps them), fp16, about 1.4 GB, written once for the module;
- causal_wan22_a14b_text_to_video.json: the two-expert diffusers folder the workflow names
  (``SFWan2.2-T2V-A14B/transformer/diffusion_pytorch_model-00001-of-00012.safetensors``: transformer/ the high-noise
  expert, transformer_2/ the low-noise one, each 12 shards with their index, model_index.json's boundary), two
  tiny Wan2.1-shaped DiTs, decoded by the host fixture's full-width Wan2.1 VAE.
Each run: ComfyUI loaded the VAE without missing keys; the block_cascade start event's settings name the family;
the frames events cover every block and add up to the family's frame count; done carries no error; the saved
video is in the history's outputs. Image to video: the image is block 0's frame 0 (the settings say so; no frame
before block 0, the same frame count as text to video).
"""
from __future__ import annotations

import json
import os
import random

import pytest
from test_comfy_host import COMFYUI_DIR, events, put_input_image, shipped_with_tiny_models, started_host

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host")

LONGLIVE2 = "longlive2/model_bf16.pt"  # the name both LongLive 2.0 workflows give (the family's folder)
A14B = "SFWan2.2-T2V-A14B"  # the folder the A14B workflow names; its file is the first of 12 shards
SHARDS = 12
WAN22_VAE = "block_cascade_tiny_wan2.2_vae.safetensors"
FRAMES_PER_BLOCK = {"longlive-2": 8, "causal-wan2.2-a14b": 3}  # latent frames a block (sampling.families)


def write_longlive2_dit(path: str) -> None:
    """A random Wan2.2-TI2V-5B-shaped DiT (width 64: one head of 64, as the loader assumes without a config; text
    width 4096, umt5-xxl's) in LongLive 2.0's .pt layout, bf16."""
    import torch

    from cascade_core.model.dit import WanConfig, WanModel

    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, in_dim=48, out_dim=48, text_dim=4096)
    sd = WanModel.random(cfg, seed=0).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"generator": {"model." + k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}}, path)


def write_wan22_vae(path: str) -> None:
    """A complete random Wan2.2 VAE at the released widths (diffusers' AutoencoderKLWan in the Wan2.2
    configuration, torch's default initialisation) under the original names, fp16."""
    import torch
    from diffusers import AutoencoderKLWan
    from test_vae22 import WAN22_CONFIG
    from test_vae22_encode import RELEASED, original_layout

    from cascade_core.weights.safe_io import save_safetensors

    torch.manual_seed(0)
    with torch.no_grad():
        sd = {k: v.half() for k, v in original_layout(AutoencoderKLWan(**RELEASED, **WAN22_CONFIG)).items()}
    save_safetensors(sd, path)


def write_a14b_folder(root: str) -> None:
    """A two-expert diffusers folder: transformer/ and transformer_2/ each a tiny Wan2.1 T2V DiT (width 128, one
    head, text width 4096) under diffusers' names in ``SHARDS`` shards with their index, config.json;
    model_index.json with FastVideo's boundary ratio."""
    from conftest import tiny_models

    from cascade_core.model.dit import WanModel
    from cascade_core.weights.dit_names import diffusers_name
    from cascade_core.weights.safe_io import save_safetensors

    TINY_DIT = tiny_models().TINY_DIT
    for seed, half in enumerate(("transformer", "transformer_2")):
        sd = {diffusers_name(k): v for k, v in WanModel.random(TINY_DIT, seed=seed).state_dict().items()}
        names = sorted(sd)
        shard = {k: f"diffusion_pytorch_model-{i % SHARDS + 1:05d}-of-{SHARDS:05d}.safetensors"
                 for i, k in enumerate(names)}
        for file in sorted(set(shard.values())):
            save_safetensors({k: sd[k] for k in names if shard[k] == file}, os.path.join(root, half, file))
        with open(os.path.join(root, half, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": shard}, f)
        with open(os.path.join(root, half, "config.json"), "w") as f:
            json.dump({"_class_name": "WanTransformer3DModel", "num_attention_heads": TINY_DIT.num_heads}, f)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "W"],
                   "transformer_2": ["diffusers", "W"]}, f)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The host of test_comfy_host.py with the Wan2.2 files beside its tiny Wan2.1 ones."""
    started = started_host(tmp_path_factory)
    h = next(started)
    models = os.path.join(h.base, "models")
    write_longlive2_dit(os.path.join(models, "diffusion_models", LONGLIVE2))
    write_a14b_folder(os.path.join(models, "diffusion_models", A14B))
    write_wan22_vae(os.path.join(models, "vae", WAN22_VAE))
    try:
        yield h
    finally:
        started.close()
        os.remove(os.path.join(models, "vae", WAN22_VAE))  # 1.4 GB: not left in the kept temporary folders


def run_shipped(host, name: str, blocks: int, vae: str | None = None):
    """``name`` (workflows/api) on the tiny files, its model name as shipped (the file placed by the fixture), a
    fresh seed; ``vae``: core VAELoader's file (default: the host's Wan2.1 VAE). -> (workflow, messages, prompt
    id, sampler's node id), the run asserted to succeed (else its errors or the host log's tail)."""
    wf = shipped_with_tiny_models(host, name, blocks, None)
    for node in wf.values():
        if node["class_type"] == "VAELoader" and vae is not None:
            node["inputs"]["vae_name"] = vae
        elif node["class_type"] == "LoadImage":  # not of the video's size: scaled and centre-cropped
            node["inputs"]["image"] = put_input_image(host, "block_cascade_wan22_start.png", 48, 40)
        elif node["class_type"] == "BlockCascadeSampler":
            node["inputs"]["seed"] = random.randrange(1 << 30)
    final, msgs, pid = host.run(wf, timeout=600)
    errors = [(m["data"]["node_type"], m["data"]["exception_message"]) for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    (node,) = [k for k, n in wf.items() if n["class_type"] == "BlockCascadeSampler"]
    return wf, msgs, pid, node


def check_run(host, wf, msgs, pid, node: str, family: str, blocks: int, first_block: int) -> dict:
    """The run's events and outputs: the family named, every block's frames (``first_block`` latent frames in
    block 0, the family's in every later one: 1 + 4 (n - 1) frames of n latent frames), done without error, the
    SaveVideo node's file in the history and the output folder. -> the start event."""
    (start,) = events(msgs, "start", node)
    assert start["settings"].startswith(family), start["settings"]
    latent = first_block + FRAMES_PER_BLOCK[family] * (blocks - 1)
    frames = events(msgs, "frames", node)
    assert [f["block"] for f in frames] == list(range(blocks))
    assert [len(f["frames"]) for f in frames][:1] == [1 + 4 * (first_block - 1)]
    assert sum(len(f["frames"]) for f in frames) == start["frames_total"] == 1 + 4 * (latent - 1)
    (done,) = events(msgs, "done", node)
    assert "error" not in done and done["frames"] == start["frames_total"], done
    outputs = host.history(pid)["outputs"]
    (saver,) = [k for k, n in wf.items() if n["class_type"] == "SaveVideo"]
    files = [x for v in outputs.get(saver, {}).values() if isinstance(v, list)
             for x in v if isinstance(x, dict) and "filename" in x]
    assert files and all(os.path.isfile(os.path.join(host.base, "output", x["subfolder"], x["filename"]))
                         for x in files), outputs
    assert "Missing VAE keys" not in host.log_text()
    return start


@pytest.mark.parametrize("name", ["longlive2_text_to_video.json", "longlive2_image_to_video.json"])
def test_the_longlive2_workflows_run_to_success(host, name):
    wf, msgs, pid, node = run_shipped(host, name, 2, vae=WAN22_VAE)
    start = check_run(host, wf, msgs, pid, node, "longlive-2", 2, FRAMES_PER_BLOCK["longlive-2"])
    held = "start image as block 0's frame 0" in start["settings"]
    assert held == ("start_image" in wf[node]["inputs"]), start["settings"]


def test_the_causal_wan22_a14b_workflow_runs_to_success(host):
    wf, msgs, pid, node = run_shipped(host, "causal_wan22_a14b_text_to_video.json", 3)
    start = check_run(host, wf, msgs, pid, node, "causal-wan2.2-a14b", 3, 1)  # block 0: one latent frame
    assert "2 experts" in start["settings"], start["settings"]  # both experts ran
