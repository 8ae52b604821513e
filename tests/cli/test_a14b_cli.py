"""The command line runs a causal Wan2.2-A14B pair: ``--checkpoint FOLDER`` with transformer/ (high-noise) and
transformer_2/ (low-noise) in diffusers layout (written here from two tiny random experts) gives, through
--latents-out, the latents of sampling.loop.generate on an ExpertPair built here from the same experts at the
folder's boundary; block swap keeps them; what a pair does not run is refused in one line before any weight is read."""
import json
import os

import pytest
import torch
from conftest import TINY
from test_experts import write_pipeline

from cascade_core.cli.command import main
from cascade_core.model.experts import ExpertPair
from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

W, H, BLOCKS, SEED = 64, 32, 2, 7
SMALL = ["--width", str(W), "--height", str(H), "--quiet", "--dtype", "fp32"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny forwards: one thread is faster on a busy machine."""


@pytest.fixture(scope="module")
def files(experts, tmp_path_factory):
    """(pipeline folder with boundary_ratio 0.9, prompt embedding file, the embedding)."""
    root = tmp_path_factory.mktemp("a14b")
    folder = write_pipeline(str(root / "pair"), experts, {"_class_name": "WanPipeline", "boundary_ratio": 0.9,
                                                          "transformer": ["diffusers", "W"],
                                                          "transformer_2": ["diffusers", "W"]})
    embeds = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))
    save_safetensors({"e": embeds}, str(root / "embeds.safetensors"))
    return folder, str(root / "embeds.safetensors"), embeds


def _generate(files, tmp_path, *extra):
    folder, embeds_file, _ = files
    out = str(tmp_path / "latents.safetensors")
    code = main(["generate", *SMALL, "--checkpoint", folder, "--embeds", embeds_file, "--blocks", str(BLOCKS),
                 "--seed", str(SEED), "--latents-out", out, *([] if "--devices" in extra else ["--device", "cpu"]),
                 *extra])
    return code, out


def test_a_pair_folder_runs_end_to_end_as_generate_on_its_expert_pair(experts, files, tmp_path, capsys):
    code, out = _generate(files, tmp_path)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    got = read_tensor_file(out)["latents"]
    # the oracle: the pair built here at the folder's boundary (0.9 -> 900, not the 875 default), the family's
    # settings, the same seed
    pair = ExpertPair(*experts, boundary=900)
    expected = generate(pair, PromptSchedule.single(files[2]), family_config("causal-wan2.2-a14b"), blocks=BLOCKS,
                        width=W, height=H, seed=SEED)
    assert torch.equal(got, expected.latents)
    assert got.shape == (1, 16, 1 + 3, H // 8, W // 8)  # block 0 one latent frame, then blocks of 3
    assert pair.forwards == {"high": BLOCKS * 5, "low": BLOCKS * 5} and summary["forwards"] == BLOCKS * 10
    assert summary["family"] == "causal-wan2.2-a14b" and "two experts" in summary["family_assumed"]
    assert "two experts" in summary["model"] and "boundary timestep 900 (model_index.json)" in summary["model"]
    assert "note: weights float32, 2 experts resident on cpu (the estimate: KV cache" in captured.err
    assert "2 experts' pools" in captured.err
    assert summary["weight_bytes"] == sum(t.numel() * 4 for e in experts for t in e.state_dict().values())
    # the 875 default would be another video: the folder's boundary is what ran
    other = generate(ExpertPair(*experts), PromptSchedule.single(files[2]), family_config("causal-wan2.2-a14b"),
                     blocks=BLOCKS, width=W, height=H, seed=SEED)
    assert not torch.equal(got, other.latents)


def test_every_block_of_both_experts_swapped_gives_the_same_latents(files, tmp_path, capsys):
    code, resident = _generate(files, tmp_path / "a")
    assert code == 0
    capsys.readouterr()
    code, swapped = _generate(files, tmp_path / "b", "--swap-blocks", str(TINY.num_layers))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert torch.equal(read_tensor_file(swapped)["latents"], read_tensor_file(resident)["latents"])
    assert json.loads(captured.out.strip().splitlines()[-1])["swapped_blocks"] == TINY.num_layers
    assert f"{TINY.num_layers} of each expert's {TINY.num_layers} blocks swapped, the idle expert off the GPU" \
        in captured.err


@pytest.mark.parametrize("extra,words", [
    (["--devices", "cpu,cpu"], "cannot run with several devices"),
    (["--flashblock", "reuse"], "cannot run with flashblock reuse"),
    (["--parallel", "2", "--attention", "bidirectional", "--no-independent-first-frame"],
     "two-expert model (Wan2.2 A14B) cannot run with bidirectional in-flight attention"),
    (["--lora", "x.safetensors"], "--lora: "),
])
def test_what_a_pair_does_not_run_is_refused_in_one_line_before_any_weight_is_read(files, tmp_path, capsys,
                                                                                    monkeypatch, extra, words):
    import cascade_core.cli.inputs as inputs

    monkeypatch.setattr(inputs, "load_expert_pair", lambda *a, **k: pytest.fail("weights read"))
    code, out = _generate(files, tmp_path, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not os.path.exists(out)


def test_a_pair_folder_with_a_half_missing_is_refused_naming_it(experts, files, tmp_path, capsys):
    half = write_pipeline(str(tmp_path / "half"), experts[:1], {"boundary_ratio": 0.875, "transformer_2": ["x", "y"]})
    assert main(["generate", *SMALL, "--device", "cpu", "--checkpoint", half, "--embeds", files[1], "--blocks", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "half" in err and "without transformer_2/" in err, err


def test_a_one_frame_context_runs_through_both_experts_as_the_references_image_pass(experts, files, tmp_path,
                                                                                    capsys):
    """FastVideo's image-to-video (the note's l.147-203): the clean latent frame through both experts at t = 0, then
    blocks of 3 from frame 1 (no independent first frame). The CLI's --image takes the same path after encoding."""
    given = torch.randn(1, 16, 1, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    save_safetensors({"latents": given}, str(tmp_path / "given.safetensors"))
    code, out = _generate(files, tmp_path, "--continue", str(tmp_path / "given.safetensors"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    pair = ExpertPair(*experts, boundary=900)
    expected = generate(pair, PromptSchedule.single(files[2]),
                        family_config("causal-wan2.2-a14b", independent_first_frame=False), blocks=BLOCKS, width=W,
                        height=H, seed=SEED, prefix=given)
    assert torch.equal(read_tensor_file(out)["latents"], expected.latents)
    assert pair.forwards == {"high": 1 + BLOCKS * 5, "low": 1 + BLOCKS * 5}
