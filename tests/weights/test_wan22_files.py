"""The loader on Wan2.2 TI2V-5B files: tiny random weights of its architecture (48 latent channels in and out)
written in each real key layout (the original Wan2.2 names, ComfyUI's repacks, diffusers' names in a file and a
folder, LongLive 2.0's ``{"generator": {"model.<key>": ...}}`` .pt and the same tensors as .safetensors), its peft
LoRA (rank 128, alpha 128, every Linear of a block) merged, the one-line refusals, the probe that tells a file's
latent space before it is loaded, and a decoder of the other latent space refused at the CLI's entry naming both."""
import json
import os

import pytest
import torch
from conftest import TINY_5B, tiny_models

from cascade_core.cli.command import main
from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.config import CascadeConfig
from cascade_core.session.run_session import RunSession
from cascade_core.video.vae22 import Wan22VAEDecoder
from cascade_core.weights.checkpoint import load_dit
from cascade_core.weights.dit_names import diffusers_name
from cascade_core.weights.probe import stored_decoder_space, stored_latent_space
from cascade_core.weights.safe_io import CheckpointError, read_tensor_file, save_safetensors

# a 48-channel DiT without --family runs as longlive-2 (UniPC: its timesteps follow from the count, 2 -> 999,833)
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--steps", "999,833", "--quiet", "--dtype", "fp32",
         "--device", "cpu", "--compile", "off"]
LL2_SMALL = ["--frames-per-block", "3", "--window", "9", "--sink", "3"]  # longlive-2's multi-shot sink at 3 frames
# LongLive 2.0's LoRA: every nn.Linear inside each attention block (NVlabs/LongLive utils/lora_utils.py:19-66)
LORA_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
RANK = ALPHA = 128  # configs/inference.yaml: adapter rank 128, alpha 128


@pytest.fixture(scope="module")
def ref():
    return WanModel.random(TINY_5B, seed=0).state_dict()


def write(layout: str, sd: dict, path):
    """``sd`` (original Wan2.2 names) saved as ``layout`` at ``path`` (a folder for "diffusers folder")."""
    path = str(path)
    if layout == "original":  # Wan-AI/Wan2.2-TI2V-5B diffusion_pytorch_model*.safetensors: the bare names
        save_safetensors(sd, path)
    elif layout == "comfyui fp16":  # Comfy-Org's repack, the DiT under model.diffusion_model.
        save_safetensors({"model.diffusion_model." + k: v.half() for k, v in sd.items()}, path)
    elif layout == "comfyui bf16 diffusion_model.":
        save_safetensors({"diffusion_model." + k: v.bfloat16() for k, v in sd.items()}, path)
    elif layout == "diffusers":
        save_safetensors({diffusers_name(k): v for k, v in sd.items()}, path)
    elif layout == "diffusers folder":  # Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/
        os.makedirs(path)
        save_safetensors({diffusers_name(k): v for k, v in sd.items()},
                         os.path.join(path, "diffusion_pytorch_model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"_class_name": "WanTransformer3DModel", "in_channels": 48, "out_channels": 48,
                       "num_attention_heads": 4, "attention_head_dim": 16}, f)
    elif layout == "longlive .pt":  # scripts/merge_lora_generator.py: the wrapper's state dict under "generator"
        torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, path)
    elif layout == "longlive .safetensors":
        save_safetensors({"model." + k: v for k, v in sd.items()}, path)
    else:
        raise AssertionError(layout)
    return path


LAYOUTS = {"original": ("w.safetensors", "safetensors"), "comfyui fp16": ("w.safetensors", "comfyui safetensors"),
           "comfyui bf16 diffusion_model.": ("w.safetensors", "comfyui safetensors"),
           "diffusers": ("w.safetensors", "diffusers"), "diffusers folder": ("transformer", "diffusers folder"),
           "longlive .pt": ("model_bf16.pt", "LongLive 2.0 .pt (generator)"),
           "longlive .safetensors": ("w.safetensors", "safetensors (prefix model.)")}


def rounded(sd: dict, layout: str) -> dict:
    dtype = torch.float16 if "fp16" in layout else torch.bfloat16 if "bf16" in layout else None
    return sd if dtype is None else {k: v.to(dtype).float() for k, v in sd.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_the_5b_architecture(layout, ref, tmp_path):
    name, label = LAYOUTS[layout]
    path = write(layout, ref, tmp_path / name)
    assert stored_latent_space(path) is WAN22_LATENTS  # told from names and shapes, before loading
    sd, info = load_dit(path, dtype=torch.float32, num_heads=4)
    want = rounded(ref, layout)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], want[k]) for k in ref)
    assert info.source_format == label and info.latent_space is WAN22_LATENTS
    assert info.config == TINY_5B and list(sd["patch_embedding.weight"].shape) == [64, 48, 1, 2, 2]
    line = info.describe()
    assert "\n" not in line and "Wan2.2-style TI2V DiT (dim 64, 2 layers, 4 heads, ffn 128)" in line
    assert "assumed Wan2.2 TI2V-5B architecture (48 latent channels in and out: Wan2.2 latents (48 channels, " \
           "16x smaller), decoded by the Wan2.2 VAE)" in line
    model = WanModel.from_state_dict(sd, num_heads=info.num_heads)
    assert model.cfg.latent_space is WAN22_LATENTS


def test_the_head_count_is_said_to_be_assumed_where_no_config_gives_it(ref, tmp_path):
    path = write("original", ref, tmp_path / "w.safetensors")
    _, info = load_dit(path, dtype=torch.float32)  # dim 64 // 128 -> 1 head of 64
    assert info.num_heads == 1 and "1 heads of 64 (dim / 128: not stored in the weights)" in info.describe()
    _, folder = load_dit(write("diffusers folder", ref, tmp_path / "t"), dtype=torch.float32)
    assert folder.num_heads == 4 and "not stored" not in folder.describe()  # its config.json says


def test_wan21_files_describe_as_before(tmp_path):
    sd = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32), seed=0).state_dict()
    path = write("longlive .pt", sd, tmp_path / "w.pt")
    assert stored_latent_space(path) is WAN21_LATENTS
    _, info = load_dit(path, dtype=torch.float32, num_heads=4)
    assert info.assumed is None and "assumed" not in info.describe() and info.latent_space is WAN21_LATENTS
    assert info.source_format == "self-forcing .pt (generator)"


def peft_lora(sd: dict, seed: int = 1) -> dict:
    """LongLive 2.0's LoRA in peft's names (get_peft_model_state_dict of the generator's model): lora_A [r, in],
    lora_B [out, r] on every Linear of each block; B drawn non-zero so the merge shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(TINY_5B.num_layers):
        for layer in LORA_LAYERS:
            w = sd[f"blocks.{b}.{layer}.weight"]
            key = f"base_model.model.blocks.{b}.{layer}"
            out[f"{key}.lora_A.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.02
            out[f"{key}.lora_B.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.02
    return out


@pytest.mark.parametrize("container", [True, False])
def test_longlive2_lora_merges_into_every_block_linear(ref, tmp_path, container):
    base = write("longlive .pt", ref, tmp_path / "base.pt")
    lora = peft_lora(ref)
    path = str(tmp_path / "lora.pt")
    torch.save({"generator_lora": lora} if container else lora, path)
    sd, info = load_dit(base, dtype=torch.float32, num_heads=4, lora=path)
    assert info.lora_layers == TINY_5B.num_layers * len(LORA_LAYERS) == 20
    for k, v in ref.items():
        layer = k.removesuffix(".weight")
        if k.endswith(".weight") and layer.split(".", 2)[-1] in LORA_LAYERS:
            a, b = lora[f"base_model.model.{layer}.lora_A.weight"], lora[f"base_model.model.{layer}.lora_B.weight"]
            assert torch.equal(sd[k], v + (ALPHA / RANK) * (b @ a)), k  # W + alpha/r * B A, strength 1
        else:
            assert torch.equal(sd[k], v), k  # biases, norms, embeddings, modulations, head: untouched


def test_refusals_are_one_line_naming_the_file(ref, tmp_path):
    def refused(tensors, message, name="bad.safetensors"):
        path = str(tmp_path / name)
        save_safetensors(tensors, path)
        with pytest.raises(CheckpointError) as e:
            load_dit(path, dtype=torch.float32)
        text = str(e.value)
        assert text.startswith(f"{name}: ") and message in text and "\n" not in text, text
        return text

    z = torch.zeros
    refused({**ref, "head.head.weight": z(64, 64), "head.head.bias": z(64)},
            "taking 48 latent channels (Wan2.2 TI2V-5B's) but making 16")
    refused({**ref, "patch_embedding.weight": z(64, 32, 1, 2, 2)}, "32 input channels")
    refused({**ref, "img_emb.proj.0.weight": z(3)}, "not a Wan2.1 T2V or Wan2.2 TI2V-5B DiT: it is a Wan image-to-video")
    # the 5B's LoRA given a Wan2.1 base of another FFN width (as 14336 is not the 1.3B's 8960)
    wan21 = WanModel.random(WanConfig(dim=64, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32)).state_dict()
    lora = str(tmp_path / "lora.safetensors")
    save_safetensors(peft_lora(ref), lora)
    base21 = str(tmp_path / "wan21.safetensors")
    save_safetensors(wan21, base21)
    with pytest.raises(CheckpointError, match=r"lora.safetensors: blocks.0.ffn.0: LoRA shapes \[128, 128\] x "
                                              r"\[128, 64\] do not fit the weight \[256, 64\]"):
        load_dit(base21, dtype=torch.float32, lora=lora)


def test_the_probe_says_nothing_of_what_it_cannot_tell(tmp_path):
    junk = str(tmp_path / "junk.safetensors")
    save_safetensors({"foo": torch.zeros(3)}, junk)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a file")
    odd = str(tmp_path / "odd.pt")
    torch.save({"generator": {"model.patch_embedding.weight": torch.zeros(8, 36, 1, 2, 2)}}, odd)
    assert stored_latent_space(junk) is stored_latent_space(str(broken)) is stored_latent_space(odd) is None
    assert stored_latent_space(str(tmp_path / "missing.safetensors")) is None


# ---- a decoder of the other latent space, refused where the run enters ------------------------------------------

def wan22_vae(path):
    """A Wan2.2 VAE file (decoder half, original names, base width 8), seeded."""
    with torch.device("meta"):
        names = Wan22VAEDecoder(8).state_dict()
    g = torch.Generator().manual_seed(0)
    save_safetensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in names.items()}, str(path))
    return str(path)


def test_the_probe_tells_a_decoders_space_from_its_header(tmp_path):
    vae21 = str(tmp_path / "wan_2.1_vae.safetensors")
    save_safetensors(tiny_models().vae_state_dict("tiny"), vae21)
    vae22 = wan22_vae(tmp_path / "wan2.2_vae.safetensors")
    pth = str(tmp_path / "Wan2.2_VAE.pth")
    torch.save(read_tensor_file(vae22), pth)
    assert stored_decoder_space(vae21) is WAN21_LATENTS
    assert stored_decoder_space(vae22) is stored_decoder_space(pth) is WAN22_LATENTS
    assert stored_decoder_space(write("original", {"x": torch.zeros(2)}, tmp_path / "x.safetensors")) is None


def test_session_refuses_a_decoder_of_the_other_space():
    session = RunSession(CascadeConfig(), blocks=1, width=64, height=32, devices=[torch.device("cpu")],
                         latent_space=WAN22_LATENTS)
    session.check_decoder(WAN22_LATENTS, "the decoder")  # the same space: nothing
    with pytest.raises(ValueError, match=r"^the decoder decodes Wan2.1 latents \(16 channels, 8x smaller\) but the "
                                         r"model makes Wan2.2 latents \(48 channels, 16x smaller\): give a Wan2.2 VAE"):
        session.check_decoder(WAN21_LATENTS, "the decoder")


def test_cli_refuses_the_other_spaces_vae_in_one_line_naming_both(ref, tmp_path, capsys):
    dit22 = write("longlive .pt", ref, tmp_path / "model_bf16.pt")
    vae21 = str(tmp_path / "wan_2.1_vae.safetensors")
    save_safetensors(tiny_models().vae_state_dict("tiny"), vae21)
    vae22 = wan22_vae(tmp_path / "wan2.2_vae.safetensors")
    video = ["--video-out", str(tmp_path / "v.mp4")]
    assert main(["generate", *SMALL, "--checkpoint", dit22, "--vae", vae21, *video]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --vae wan_2.1_vae.safetensors decodes Wan2.1 latents (16 channels, 8x smaller) but the "
                   "model makes Wan2.2 latents (48 channels, 16x smaller): give a Wan2.2 VAE or decoder"), err
    assert main(["generate", *SMALL, "--vae", vae22, *video]) == 2  # the built-in model: Wan2.1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --vae wan2.2_vae.safetensors decodes Wan2.2 latents (48 channels, 16x smaller) but the "
                   "model makes Wan2.1 latents (16 channels, 8x smaller): give a Wan2.1 VAE or decoder"), err
    assert main(["generate", *SMALL, "--width", "48", "--checkpoint", dit22]) == 2  # Wan2.2's size rule: 32 px
    assert "width must be a positive multiple of 32, got 48" in capsys.readouterr().err


def test_cli_runs_the_5b_architecture_with_its_vae(ref, tmp_path, capsys):
    dit22 = write("longlive .pt", ref, tmp_path / "model_bf16.pt")
    out = str(tmp_path / "lat.safetensors")
    assert main(["generate", *SMALL, *LL2_SMALL, "--checkpoint", dit22, "--latents-out", out, "--vae",
                 wan22_vae(tmp_path / "wan2.2_vae.safetensors"), "--video-out", str(tmp_path / "v.mp4")]) == 0, \
        capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(read_tensor_file(out)["latents"].shape) == summary["latent_shape"] == [1, 48, 6, 2, 4]
    assert summary["video_frames"] == 1 + 4 * 5 and os.path.getsize(tmp_path / "v.mp4") > 0
