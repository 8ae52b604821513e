"""The README's main job and the CLI's contract: JSON summary, reproducible noise, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_models

from cascade_core.cli import main
from cascade_core.safe_io import read_tensor_file, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--quiet", "--dtype", "fp32", "--device", "cpu"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cascade_core", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_main_job_runs_and_writes_latents(tmp_path):
    out = tmp_path / "lat.safetensors"
    r = run_cli("generate", "--blocks", "2", "--width", "128", "--height", "64", "--latents-out", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["model"].startswith("built-in untrained")
    assert summary["blocks"] == 2 and summary["ticks"] == summary["forwards"] == 10
    assert summary["latent_frames"] == 6 and "video_frames" not in summary  # no VAE: no video was made
    assert "2/2 [" in r.stderr and "block" in r.stderr  # the progress bar (tqdm)
    lat = read_tensor_file(str(out))["latents"]
    assert list(lat.shape) == summary["latent_shape"] == [1, 16, 6, 8, 16]


def test_noise_file_reproduces_a_run_exactly(tmp_path, capsys):
    noise = torch.randn(1, 16, 6, 4, 8)
    save_safetensors({"noise": noise}, str(tmp_path / "noise.safetensors"))
    outs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        path = str(tmp_path / f"{name}.safetensors")
        assert main(["generate", *SMALL, "--seed", str(seed), "--noise", str(tmp_path / "noise.safetensors"),
                     "--latents-out", path]) == 0
        outs.append(read_tensor_file(path)["latents"])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # the seed still drives the re-noising between steps


def test_parallel_levels_from_the_cli(tmp_path):
    for p in (1, 5):
        assert main(["generate", *SMALL, "--parallel", str(p), "--latents-out", str(tmp_path / f"{p}.safetensors")]) == 0
    a, b = (read_tensor_file(str(tmp_path / f"{p}.safetensors"))["latents"] for p in (1, 5))
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("args,message", [
    (["--width", "250"], "width must be a positive multiple of 16"),
    (["--blocks", "0"], "--blocks must be >= 1"),
    (["--parallel", "6"], "parallelism must lie in 1..5"),
    (["--window", "2"], "window must hold the sink and one block"),
    (["--steps", "500,750"], "strictly decrease"),
    (["--attention", "sideways"], "invalid choice"),
    (["--device", "cuda:7"], "not present"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert main(["generate", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    wrong = tmp_path / "wrong.safetensors"
    save_safetensors({"a": torch.zeros(2), "b": torch.zeros(2)}, str(wrong))
    for flag, path, message in (("--checkpoint", junk, "corrupt"), ("--embeds", wrong, "exactly one tensor"),
                                ("--noise", tmp_path / "missing.safetensors", "no such file")):
        assert main(["generate", *SMALL, flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and path.name in err, err


def test_vae_streams_frames_into_an_mp4_and_pngs(tmp_path):
    import av

    from cascade_core.taew import TinyWanDecoder

    for name, weights in (("wan", tiny_models().vae_state_dict("tiny")),
                          ("taew", TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict())):
        vae = tmp_path / f"{name}.safetensors"
        save_safetensors(weights, str(vae))
        video, pngs = tmp_path / f"{name}.mp4", tmp_path / f"{name}_frames"
        r = run_cli("generate", *SMALL, "--vae", str(vae), "--video-out", str(video), "--frames-dir", str(pngs))
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["video_frames"] == 21 and summary["latent_frames"] == 6
        assert sorted(os.listdir(pngs)) == [f"{i:05d}.png" for i in range(21)]
        with av.open(str(video)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 21 and (frames[0].width, frames[0].height) == (64, 32)


def test_video_flags_need_a_vae(capsys):
    assert main(["generate", *SMALL, "--video-out", "x.mp4"]) == 2
    assert "need --vae" in capsys.readouterr().err
