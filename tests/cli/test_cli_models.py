"""``generate`` and the model it is given: a file inside a two-expert folder's transformer/ runs the pair (said in
a note), one shard of a sharded model names its folder, a broken pair folder is refused naming model_index.json,
and a family the model is not made for (Wan2.2 on Wan2.1 latents and the reverse, a pair's family on one DiT, any
family on a pair but its own) is refused in one line before any weight is read; a 48-channel DiT whose family
nothing names runs as longlive-2, said in a note."""
import json
import os

import pytest
import torch
from conftest import TINY, TINY_5B
from test_experts import write_pipeline

import cascade_core.cli.inputs as cli_inputs
from cascade_core.cli.command import main
from cascade_core.model.dit import WanModel
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = ["--width", "64", "--height", "32", "--quiet", "--dtype", "fp32", "--device", "cpu", "--compile", "off"]
FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"pair": a two-expert folder (boundary 0.9), "dit16"/"dit48": one Wan2.1 / Wan2.2 DiT file, "embeds"}."""
    root = tmp_path_factory.mktemp("models")
    out = {"pair": write_pipeline(str(root / "pair"), (WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1)),
                                  {"boundary_ratio": 0.9}),
           "dit16": str(root / "dit16.safetensors"), "dit48": str(root / "dit48.safetensors"),
           "embeds": str(root / "embeds.safetensors")}
    save_safetensors(WanModel.random(TINY, seed=2).state_dict(), out["dit16"])
    save_safetensors(WanModel.random(TINY_5B, seed=3).state_dict(), out["dit48"])
    save_safetensors({"e": torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(4))}, out["embeds"])
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """A refusal must come before any weight is read: loading fails the test."""
    def loaded(*a, **k):
        raise AssertionError("weights were read before the refusal")
    monkeypatch.setattr(cli_inputs, "load_dit", loaded)
    monkeypatch.setattr(cli_inputs, "load_expert_pair", loaded)


def _run(capsys, *argv):
    code = main(["generate", *CPU, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_a_file_inside_a_pair_folder_runs_the_pair_with_a_note(files, tmp_path, capsys):
    common = ["--embeds", files["embeds"], "--blocks", "2", "--seed", "5"]
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    assert _run(capsys, "--checkpoint", files["pair"], "--latents-out", whole, *common)[0] == 0
    inside = os.path.join(files["pair"], "transformer", FILE)
    code, out, err = _run(capsys, "--checkpoint", inside, "--latents-out", part, *common)
    assert code == 0, err
    assert any(line.startswith(f"note: --checkpoint {inside} is a file of the high-noise expert of a two-expert")
               and line.endswith(f"both experts are read from its folder, {os.path.abspath(files['pair'])}")
               for line in err), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["family"] == "causal-wan2.2-a14b" and "two experts" in summary["model"]
    assert torch.equal(read_tensor_file(part)["latents"], read_tensor_file(whole)["latents"])
    low = os.path.join(files["pair"], "transformer_2")  # an expert's folder: the pair too
    code, out, err = _run(capsys, "--checkpoint", low, "--latents-out", part, *common)
    assert code == 0 and any(f"note: --checkpoint {low} is the folder of the low-noise expert" in e for e in err), err
    assert torch.equal(read_tensor_file(part)["latents"], read_tensor_file(whole)["latents"])


def test_one_shard_of_a_single_model_names_its_folder(files, tmp_path, capsys, no_loading):
    folder = tmp_path / "sharded"
    folder.mkdir()
    shard = str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_safetensors({"x": torch.zeros(1)}, shard)
    code, _, err = _run(capsys, "--checkpoint", shard, "--embeds", files["embeds"])
    assert code == 2 and err == [f"error: --checkpoint {shard} is shard 1 of 2 of a sharded model: give the folder "
                                 f"that holds them all, {folder}"], err


@pytest.mark.parametrize("index, words", [
    ('{"boundary_ratio": 0.9,}', "pair: its model_index.json is not valid JSON"),
    ('{"boundary_ratio": 0.9996}', "pair: its model_index.json gives boundary_ratio 0.9996; a number in (0, 1) "
                                   "whose timestep (ratio x 1000, rounded) lies in 1..999 is needed"),
])
def test_a_broken_pair_folder_is_refused_naming_model_index_before_loading(tmp_path, capsys, no_loading, index,
                                                                           words):
    root = write_pipeline(str(tmp_path / "pair"), (WanModel.random(TINY, seed=0), WanModel.random(TINY, seed=1)))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        f.write(index)
    code, _, err = _run(capsys, "--checkpoint", root)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {words}"), err


@pytest.mark.parametrize("model, family, words", [
    ("dit16", "longlive-2", "family longlive-2 samples a Wan2.2 TI2V-5B DiT (48 latent channels); dit16.safetensors "
                            "is a Wan2.1 DiT (16 latent channels): use the family self-forcing or causvid"),
    ("dit16", "longlive-2-2step", "family longlive-2-2step samples a Wan2.2 TI2V-5B DiT (48 latent channels); "
                                  "dit16.safetensors is a Wan2.1 DiT (16 latent channels)"),
    ("dit48", "self-forcing", "family self-forcing samples a Wan2.1 DiT (16 latent channels); dit48.safetensors is "
                              "a Wan2.2 TI2V-5B DiT (48 latent channels): use the family longlive-2 or longlive-2-2step"),
    ("dit48", "causvid", "family causvid samples a Wan2.1 DiT (16 latent channels); dit48.safetensors is a Wan2.2"),
    ("dit16", "causal-wan2.2-a14b", "family causal-wan2.2-a14b samples a two-expert Wan2.2 A14B model (16 latent "
                                    "channels); dit16.safetensors is a Wan2.1 DiT (16 latent channels)"),
    ("pair", "self-forcing", "family self-forcing samples a Wan2.1 DiT (16 latent channels); pair is a two-expert "
                             "Wan2.2 A14B model (16 latent channels): use the family causal-wan2.2-a14b"),
    (None, "longlive-2", "family longlive-2 samples a Wan2.2 TI2V-5B DiT (48 latent channels); the built-in "
                         "untrained model is a Wan2.1 DiT (16 latent channels)"),
])
def test_a_family_the_model_is_not_made_for_is_refused_before_loading(files, capsys, no_loading, model, family,
                                                                      words):
    checkpoint = ["--checkpoint", files[model]] if model else []
    code, _, err = _run(capsys, *checkpoint, "--family", family, "--embeds", files["embeds"])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {words}"), err


def test_a_family_the_path_names_is_refused_on_another_model_saying_it_was_assumed(tmp_path, capsys, files,
                                                                                  no_loading):
    named = str(tmp_path / "self_forcing_dmd.safetensors")
    save_safetensors(WanModel.random(TINY_5B, seed=3).state_dict(), named)
    code, _, err = _run(capsys, "--checkpoint", named, "--embeds", files["embeds"])
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "error: family self-forcing (assumed: the checkpoint path") and "is a Wan2.2 TI2V-5B DiT" in err[0], err


def test_a_48_channel_dit_nothing_names_runs_as_longlive_2_with_a_note(files, capsys):
    code, out, err = _run(capsys, "--checkpoint", files["dit48"], "--embeds", files["embeds"], "--blocks", "1")
    assert code == 0, err
    assert err[0] == ("note: family longlive-2 assumed (dit48.safetensors is a Wan2.2 TI2V-5B DiT (48 latent "
                      "channels)); --family sets another"), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["family"] == "longlive-2" and summary["settings"]["solver"] == "unipc"
