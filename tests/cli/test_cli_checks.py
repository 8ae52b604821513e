"""The command line fails early and cleanly: every refusal is one line, exit code 2, before any model work."""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from cascade_core.cli import run as cli_run
from cascade_core.cli.command import main
from cascade_core.model.attention_libraries import LIBRARY_KERNELS
from cascade_core.weights.safe_io import read_tensor_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--quiet", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if the run gets as far as building the model."""
    def refuse(*_a, **_k):
        raise AssertionError("model work started before the check")
    monkeypatch.setattr(cli_run, "build_model", refuse)


def one_line(capsys, message):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    return err


def _unwritable_folder():
    """A folder that refuses new files even to root (sysfs), or None where there is none."""
    for folder in ("/sys", "/proc"):
        if os.path.isdir(folder):
            try:
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError:
                return folder
    return None


def test_output_paths_are_checked_before_the_run(tmp_path, capsys, no_model_work):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    vae = ["--vae", str(tmp_path / "vae.safetensors")]  # never read: the path check comes first
    cases = [
        (["--latents-out", str(a_file / "lat.safetensors")], "is a file, not a folder"),
        (["--latents-out", str(tmp_path)], "is a folder"),
        ([*vae, "--video-out", str(tmp_path)], "is a folder"),
        ([*vae, "--video-out", str(tmp_path / "v.webm")], "the file written is MP4; give a name ending in .mp4"),
        ([*vae, "--video-out", str(a_file / "sub" / "v.mp4")], "is a file, not a folder"),
        ([*vae, "--frames-dir", str(a_file)], "is a file, not a folder"),
        ([*vae, "--frames-dir", str(a_file / "frames")], "is a file, not a folder"),
    ]
    if os.path.exists("/proc/version"):  # an existing file that refuses writing even to root
        cases.append((["--latents-out", "/proc/version"], "cannot write it"))
    folder = _unwritable_folder()
    if folder is not None:
        cases.append((["--latents-out", f"{folder}/lat.safetensors"], f"cannot write into {folder}"))
        cases.append(([*vae, "--frames-dir", f"{folder}/frames"], f"cannot write into {folder}"))
    for args, message in cases:
        assert main(["generate", *SMALL, *args]) == 2, args
        one_line(capsys, message)


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "0..2^64-1"),
    (["--seed", str(2 ** 64)], "0..2^64-1"),
    (["--seed", "x"], "--seed"),
    (["--attention-backend", "cudnn"], "not available on cpu"),
    (["--attention-backend", "efficient"], "not available on cpu"),
    (["--sink", "3"], "set a window (e.g. window 12 with sink 3) or sink 0"),
    (["--fold-clean", "--parallel", "2"], "fold-clean works at parallel 1 only"),
    (["--shift", "nan"], "shift must be a positive finite number"),
    (["--context-noise", "nan"], "context noise must lie in 0..1000"),
    (["--steps", "1000,,500"], "--steps"),
    (["--attention", "bidirectional"], "needs parallel 2 or more"),
])
def test_bad_settings_give_one_line_and_exit_2(args, message, capsys, no_model_work):
    assert main(["generate", *SMALL, *args]) == 2
    one_line(capsys, message)


@pytest.mark.parametrize("installed", [True, False])
def test_flash4_on_the_cpu_gives_one_line_and_exit_2(capsys, no_model_work, monkeypatch, installed):
    monkeypatch.setattr(LIBRARY_KERNELS["flash4"], "loaded", (lambda *a, **k: None) if installed else False)
    assert main(["generate", *SMALL, "--attention-backend", "flash4"]) == 2
    one_line(capsys, "flash4 runs only on NVIDIA Hopper and Blackwell GPUs (CUDA) in float16 or bfloat16; "
                     "this run is on cpu in float32: run on a CUDA GPU, or use auto")


def test_largest_seed_runs(tmp_path, capsys):
    assert main(["generate", *SMALL, "--seed", str(2 ** 64 - 1), "--latents-out", str(tmp_path / "a.safetensors")]) == 0
    assert torch.isfinite(read_tensor_file(str(tmp_path / "a.safetensors"))["latents"]).all()


def test_a_run_that_cannot_fit_is_refused_first(monkeypatch, capsys, no_model_work):
    # the device's available memory is what the check compares with: 1 MiB holds no run
    monkeypatch.setattr("cascade_core.cli.checks.available_bytes", lambda device: 1 << 20)
    assert main(["generate", *SMALL]) == 2
    one_line(capsys, "needs about")
    # the real available memory of the CPU: no machine holds a 65536 x 65536 video's KV cache (>1 TB)
    monkeypatch.undo()
    monkeypatch.setattr(cli_run, "build_model", lambda *a, **k: pytest.fail("model work started"))
    assert main(["generate", *SMALL, "--width", "65536", "--height", "65536", "--blocks", "7"]) == 2
    one_line(capsys, "GiB are available")


def test_a_run_that_fits_is_not_refused(monkeypatch, tmp_path):
    monkeypatch.setattr("cascade_core.cli.checks.available_bytes", lambda device: 1 << 40)
    assert main(["generate", *SMALL, "--latents-out", str(tmp_path / "a.safetensors")]) == 0


def test_a_video_past_the_trained_length_warns_once(capsys):
    assert main(["generate", *SMALL, "--blocks", "8"]) == 0  # 24 latent frames > 21
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--window" in warnings[0] and "21" in warnings[0], err
    assert main(["generate", *SMALL, "--blocks", "8", "--window", "12", "--sink", "3"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["generate", *SMALL, "--blocks", "7"]) == 0  # exactly the trained 21
    assert "warning" not in capsys.readouterr().err


def test_frames_dir_alone_writes_pngs_and_no_mp4(tmp_path, monkeypatch, capsys):
    from cascade_core.video.vae import WanVAEDecoder
    from cascade_core.weights.safe_io import save_safetensors

    vae = tmp_path / "vae.safetensors"
    save_safetensors(WanVAEDecoder(dim=8).state_dict(), str(vae))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *SMALL, "--vae", str(vae), "--frames-dir", "pngs"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(os.listdir(tmp_path / "pngs")) == [f"{i:05d}.png" for i in range(21)]
    assert summary["video_frames"] == 21 and summary["video_out"] is None
    assert not any(name.endswith(".mp4") for _, _, files in os.walk(tmp_path) for name in files)


def test_torchrun_bad_argument_one_line_from_rank_0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cascade_core", "generate", *SMALL[:-2], "--devices", "torchrun", "--seed", "-5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--seed" in errors[0], r.stderr[-3000:]



def test_torchrun_file_rank_0_cannot_read_ends_every_rank_at_once(tmp_path):
    """Only rank 0 reads the checkpoint: when it cannot, the job ends at once with one line from rank 0
    (the other ranks are told through refuse_collective and end quietly; no rank waits for the
    collective timeout)."""
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cascade_core", "generate", *SMALL[:-2], "--devices", "torchrun", "--checkpoint", str(junk)]
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert time.monotonic() - start < 120  # the collective timeout is 600 s
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0], r.stderr[-3000:]


def test_a_missing_vae_is_one_line_before_model_work(tmp_path, capsys, no_model_work):
    assert main(["generate", *SMALL, "--vae", str(tmp_path / "nothere.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: --vae {tmp_path / 'nothere.safetensors'}: no such file or folder"], err


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_decode_frames_per_pass_must_be_positive(value, tmp_path, capsys):
    assert main(["decode", "--latents", "l.safetensors", "--vae", "v.safetensors", "--frames-per-pass", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--frames-per-pass" in err[0] and ">= 1" in err[0], err


def test_fp8_without_fp8_units_is_warned_and_named_in_the_summary(capsys):
    """--fp8 is --weight-dtype fp8_e4m3fn_fast; without fp8 units each weight is widened for its product."""
    assert main(["generate", *SMALL, "--blocks", "1"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert full["weight_dtype"] == "float32" and full["swapped_blocks"] == 0 and full["kv_dtype"] == "default"
    assert full["compiled"] is False
    assert main(["generate", *SMALL, "--fp8", "--blocks", "1"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: fp8 products")]
    assert len(warnings) == 1 and "no fp8 matrix units" in warnings[0], captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["weight_dtype"] == "fp8_e4m3fn_fast" and summary["weight_bytes"] < 0.7 * full["weight_bytes"]  # the blocks: 1 byte of 4
    assert main(["generate", *SMALL, "--fp8", "--weight-dtype", "fp8_e5m2"]) == 2
    one_line(capsys, "--fp8 is --weight-dtype fp8_e4m3fn_fast; it excludes --weight-dtype fp8_e5m2")


def test_forced_block_swap_gives_the_resident_latents(tmp_path, capsys):
    paths = [str(tmp_path / f"{n}.safetensors") for n in ("resident", "swapped")]
    assert main(["generate", *SMALL, "--latents-out", paths[0]]) == 0
    assert main(["generate", *SMALL, "--latents-out", paths[1], "--swap-blocks", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["swapped_blocks"] == 2
    a, b = (read_tensor_file(p)["latents"] for p in paths)
    assert torch.equal(a, b)
    assert main(["generate", *SMALL, "--swap-blocks", "99"]) == 2
    one_line(capsys, "--swap-blocks: the model has 2 transformer blocks; give 0..2")
    assert main(["generate", *SMALL, "--swap-blocks", "-5"]) == 2
    one_line(capsys, "got -5")
    pooled = [a for a in SMALL if a not in ("--device", "cpu")]
    assert main(["generate", *pooled, "--swap-blocks", "1", "--devices", "cpu,cpu"]) == 2
    one_line(capsys, "--swap-blocks streams weights to one device")


def test_an_output_that_is_no_regular_file_is_refused(tmp_path, capsys, no_model_work):
    """A device or a FIFO would be replaced by a file (writers write a temporary file and rename it)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["generate", *SMALL, "--latents-out", str(fifo)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: --latents-out {fifo} is not a regular file; give a file name"], err
    assert not fifo.is_file()  # still the FIFO


def test_non_finite_noise_is_refused_in_one_line(tmp_path, capsys):
    from cascade_core.weights.safe_io import save_safetensors

    noise = torch.randn(1, 16, 6, 4, 8)
    noise[0, 3, 2, 1, 1] = float("nan")
    save_safetensors({"noise": noise}, str(tmp_path / "noise.safetensors"))
    path = str(tmp_path / "noise.safetensors")
    assert main(["generate", *SMALL, "--noise", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: --noise {path}: the initial noise holds NaN or infinite values"], err


def test_noise_of_another_shape_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, monkeypatch):
    """The initial noise is checked against the run's plan as soon as the plan is made: a wrong shape costs no
    weight read (the checkpoint's loader is never called)."""
    from cascade_core.weights.safe_io import save_safetensors

    monkeypatch.setattr(cli_run, "load_weights", lambda *a, **k: pytest.fail("the weights were read"))
    path = str(tmp_path / "noise.safetensors")
    save_safetensors({"noise": torch.randn(1, 16, 5, 4, 8)}, path)
    assert main(["generate", *SMALL, "--noise", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --noise {path}: the initial noise must be [1, 16, 6, 4, 8]"), err


def test_bad_start_images_and_continuations_give_one_line_before_the_model(tmp_path, capsys, no_model_work):
    from conftest import tiny_models

    from cascade_core.weights.safe_io import save_safetensors

    vae = tmp_path / "vae.safetensors"
    save_safetensors(tiny_models().vae_state_dict("tiny"), str(vae))
    decoder_only = tmp_path / "decoder_only.safetensors"
    save_safetensors({k: v for k, v in tiny_models().vae_state_dict("tiny").items()
                      if not k.startswith(("encoder.", "conv1."))}, str(decoder_only))
    png, mp4, junk_png, junk_mp4 = (tmp_path / n for n in ("a.png", "a.mp4", "junk.png", "junk.mp4"))
    from PIL import Image
    Image.new("RGB", (64, 32)).save(png)
    mp4.write_bytes(b"\x00")  # never read: the missing --vae is said first
    junk_png.write_bytes(b"not an image")
    junk_mp4.write_bytes(b"\x00" * 64)
    wide = tmp_path / "wide.safetensors"
    save_safetensors({"latents": torch.zeros(1, 16, 4, 8, 16)}, str(wide))
    flat = tmp_path / "flat.safetensors"
    save_safetensors({"latents": torch.zeros(16, 4, 4, 8)}, str(flat))
    nan = tmp_path / "nan.safetensors"
    save_safetensors({"latents": torch.full((1, 16, 2, 4, 8), float("nan"))}, str(nan))
    nan_first = tmp_path / "nan_first.safetensors"  # frame 0 is not in the context but in the outputs
    save_safetensors({"latents": torch.zeros(1, 16, 6, 4, 8).index_fill_(2, torch.tensor([0]), float("nan"))},
                     str(nan_first))
    big = tmp_path / "big.safetensors"
    save_safetensors({"latents": torch.full((1, 16, 2, 4, 8), 1e5)}, str(big))
    cases = [
        (["--image", str(png)], "--image " + str(png) + " needs --vae FILE"),
        (["--continue", str(mp4)], "needs --vae FILE (the complete Wan2.1 VAE) to encode a video"),
        (["--image", str(png), "--continue", str(wide)], "not allowed with argument"),
        (["--context-frames", "2"], "--context-frames needs --continue FILE"),
        (["--continue", str(wide), "--context-frames", "-1"], "--context-frames must be >= 0"),
        (["--continue", str(tmp_path / "missing.safetensors")], "no such file"),
        (["--image", str(tmp_path / "missing.png"), "--vae", str(vae)], "no such file"),
        (["--continue", str(wide)], "its latents are 8x16 (a 128x64 video) but --width 64 --height 32 needs 4x8"),
        (["--continue", str(flat)], "expected latents [1, 16, T, H/8, W/8], got [16, 4, 4, 8]"),
        (["--continue", str(nan)], "NaN or infinite"),
        (["--continue", str(nan_first), "--context-frames", "2"], "NaN or infinite"),
        (["--continue", str(big), "--dtype", "fp16"], "(up to 1e+05) overflow the run's float16"),
        (["--image", str(junk_png), "--vae", str(vae)], "junk.png: not a readable image"),
        (["--continue", str(junk_mp4), "--vae", str(vae)], "junk.mp4: not a readable video"),
        (["--image", str(png), "--vae", str(vae), "--family", "reward-forcing"], "not defined with slot RoPE"),
        (["--image", str(png), "--vae", str(decoder_only)], "decoder_only.safetensors: holds only the decoder half"),
    ]
    for args, message in cases:
        assert main(["generate", *SMALL, *args]) == 2, args
        one_line(capsys, message)


def test_the_memory_check_counts_the_context_prefix(tmp_path, monkeypatch, capsys, no_model_work):
    """The frames of a continued video's context are in the estimate the memory check compares."""
    from cascade_core.cli import checks as cli_checks
    from cascade_core.session import run_session
    from cascade_core.weights.safe_io import save_safetensors

    given = tmp_path / "given.safetensors"
    save_safetensors({"latents": torch.zeros(1, 16, 5, 4, 8)}, str(given))
    seen = []
    estimate = run_session.estimate_run_bytes
    monkeypatch.setattr(run_session, "estimate_run_bytes",
                        lambda plan, *a, **k: seen.append(plan.grid.offset) or estimate(plan, *a, **k))
    monkeypatch.setattr(cli_checks, "available_bytes", lambda device: 1 << 20)  # refused after the estimate
    assert main(["generate", *SMALL, "--continue", str(given), "--context-frames", "4"]) == 2
    one_line(capsys, "needs about")
    assert seen == [4]


def test_the_trained_length_warning_counts_the_context(tmp_path, capsys):
    from cascade_core.weights.safe_io import save_safetensors

    given = tmp_path / "given.safetensors"
    save_safetensors({"latents": torch.zeros(1, 16, 18, 4, 8)}, str(given))
    run = ["generate", *SMALL, "--blocks", "1", "--continue", str(given)]
    assert main(run) == 0  # 18 frames of context + 3 new ones = 21: no warning
    assert "warning" not in capsys.readouterr().err
    assert main([*run, "--blocks", "2"]) == 0  # 18 + 6 = 24
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "24 latent frames" in warnings[0] and "--context-frames" in warnings[0]
    assert main([*run, "--blocks", "2", "--context-frames", "4"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_decode_device_places_the_decoders_and_needs_a_vae(tmp_path, monkeypatch, capsys, no_model_work):
    """--decode-device without --vae is refused in one line, an absent GPU too; given, the device it names is
    where the session decides the decoders run (RunSession.decode_device) and open_video builds them."""
    from cascade_core.session.run_session import RunSession
    from cascade_core.video.vae import WanVAEDecoder
    from cascade_core.weights.safe_io import save_safetensors

    assert main(["generate", *SMALL, "--decode-device", "cpu"]) == 2
    one_line(capsys, "--decode-device places the decoders of --vae and --preview-vae; add --vae")
    vae = tmp_path / "vae.safetensors"
    save_safetensors(WanVAEDecoder(dim=8).state_dict(), str(vae))
    assert main(["generate", *SMALL, "--vae", str(vae), "--decode-device", "cuda:7"]) == 2
    one_line(capsys, "--decode-device: devices: cuda:7 is not present")
    assert main(["generate", *SMALL, "--vae", str(vae), "--decode-device", "cpu,cpu"]) == 2
    one_line(capsys, "--decode-device takes one device, got cpu,cpu")
    asked, placed = [], []
    real = RunSession.decode_device
    monkeypatch.setattr(RunSession, "decode_device", lambda self, device, choice=None: asked.append(choice)
                        or real(self, device, choice))

    def open_video(vae, video_out, frames_dir, device, *rest):
        placed.append(device)
        raise SystemExit(0)

    monkeypatch.setattr(cli_run, "load", lambda *a: None)
    monkeypatch.setattr(cli_run, "print_notes", lambda *a: None)
    monkeypatch.setattr(cli_run, "open_video", open_video)
    with pytest.raises(SystemExit):
        main(["generate", *SMALL, "--vae", str(vae), "--decode-device", "cpu"])
    assert asked == [torch.device("cpu")] and placed == [torch.device("cpu")]
