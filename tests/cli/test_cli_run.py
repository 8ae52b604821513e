"""The command line's runs: help texts, the decode sub-command, Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cascade_core.cli.command import main
from cascade_core.cli.parser import build_parser
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--width", "64", "--height", "32", "--quiet", "--dtype", "fp32"]


def test_generate_help_has_a_text_and_the_default_of_every_option():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    entries = {}  # first flag -> its help text, read off the printed help
    for line in sub.format_help().split("options:")[1].splitlines():
        if line.startswith("  -"):
            head, _, rest = line.strip().partition("  ")
            flag = head.split()[0].rstrip(",")
            entries[flag] = rest.strip()
        elif line.strip():
            entries[flag] += " " + line.strip()
    for action in sub._actions:
        if action.dest == "help":
            continue
        text = entries[action.option_strings[0]]
        assert len(text) > 10, action.option_strings
        if action.default is not None and action.default is not False and action.default != []:  # ([]: repeatable)
            default = action.default if isinstance(action.default, str) else repr(action.default)
            assert text.endswith(f"(default: {default})"), (action.option_strings, text)


def test_decode_turns_latents_into_the_frames_of_a_direct_decode(tmp_path, capsys):
    import av
    from PIL import Image

    from cascade_core.video.vae import WanVAEDecoder

    decoder = WanVAEDecoder(dim=8)
    vae = tmp_path / "vae.safetensors"
    save_safetensors(decoder.state_dict(), str(vae))
    latents = torch.randn(1, 16, 5, 4, 8, generator=torch.Generator().manual_seed(1))
    save_safetensors({"latents": latents}, str(tmp_path / "lat.safetensors"))
    video, pngs = tmp_path / "v.mp4", tmp_path / "pngs"
    assert main(["decode", "--latents", str(tmp_path / "lat.safetensors"), "--vae", str(vae), "--video-out",
                 str(video), "--frames-dir", str(pngs), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["latent_frames"] == 5 and summary["video_frames"] == 17  # 1 + 4 * 4
    # the oracle: all latents through the decoder in one call, to pixels by rounding
    with torch.no_grad():
        direct = decoder.stream(None).decode(latents)[0]  # [3, 17, 32, 64] in [-1, 1]
    expected = ((direct.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
    got = np.stack([np.asarray(Image.open(pngs / f"{i:05d}.png")) for i in range(17)])
    assert sorted(os.listdir(pngs)) == [f"{i:05d}.png" for i in range(17)]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float rounding of the passes
    with av.open(str(video)) as container:
        mp4 = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert mp4.shape == got.shape
    # H.264 in yuv420 blurs the colour of these noise-like frames: each MP4 frame is nearest its own
    distance = np.abs(mp4[:, None].astype(float) - expected[None]).mean(axis=(2, 3, 4))  # [17, 17]
    assert (distance.argmin(axis=1) == np.arange(17)).all() and distance.diagonal().max() < 24, distance


def test_decode_refuses_latents_of_another_shape(tmp_path, capsys):
    save_safetensors({"x": torch.zeros(16, 5, 4, 8)}, str(tmp_path / "bad.safetensors"))
    assert main(["decode", "--latents", str(tmp_path / "bad.safetensors"), "--vae", "none.safetensors",
                 "--video-out", str(tmp_path / "v.mp4"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[1, 16, T, H/8, W/8]" in err, err


def _descendants(pid: int) -> set[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ctrl_c_once_pngs_are_written(cmd, pngs, count: int):
    """Run ``cmd`` in a session of its own; once ``count`` PNGs are in ``pngs``, SIGINT its process group
    (what Ctrl-C in a terminal does). Returns (process, stdout, stderr, pids of its descendants then)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (pngs.is_dir() and len(os.listdir(pngs)) >= count) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        family = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, out, err, family


@pytest.mark.parametrize("devices", [["--device", "cpu"], ["--devices", "cpu,cpu"]])
def test_ctrl_c_stops_with_one_line_a_playable_mp4_and_no_processes_left(tmp_path, devices):
    import av

    from cascade_core.video.taew import TinyWanDecoder

    vae = tmp_path / "taew.safetensors"
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), str(vae))
    video, pngs, lat = tmp_path / "v.mp4", tmp_path / "pngs", tmp_path / "lat.safetensors"
    cmd = [sys.executable, "-m", "cascade_core", "generate", *SMALL, *devices, "--blocks", "3000",
           "--window", "6", "--vae", str(vae), "--video-out", str(video), "--frames-dir", str(pngs),
           "--latents-out", str(lat)]
    proc, _, err, family = _ctrl_c_once_pngs_are_written(cmd, pngs, 9)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    match = re.fullmatch(r"interrupted: stopped at block (\d+) of 3000; (\S+) and \S+ hold (\d+) frames; "
                         r"(\S+) holds the latents of (\d+) blocks", lines[0])
    assert match and match.group(2) == str(video) and match.group(4) == str(lat), lines[0]
    count, stopped, kept_blocks = int(match.group(3)), int(match.group(1)), int(match.group(5))
    with av.open(str(video)) as container:
        assert len(list(container.decode(video=0))) == count >= 9
    assert len(os.listdir(pngs)) == count
    # whole blocks only (after Ctrl-C no new block is decoded; blocks finished before it are)
    assert (count + 3) % 12 == 0 and 1 <= (count + 3) // 12 <= stopped - 1
    # the latents of every block that finished before the stop are kept
    assert kept_blocks == stopped - 1
    assert read_tensor_file(str(lat))["latents"].shape[2] == 3 * kept_blocks
    if devices[0] == "--devices":
        assert family  # the worker processes
    deadline = time.monotonic() + 20
    while any(_running(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in family)


def test_ctrl_c_ends_an_endless_generate_normally_with_a_finalised_mp4(tmp_path):
    """A real SIGINT to a real process: exit 0, the summary line, the MP4 holding every final block."""
    from cascade_core.video.taew import TinyWanDecoder

    vae = tmp_path / "taew.safetensors"
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), str(vae))
    video, pngs = tmp_path / "v.mp4", tmp_path / "pngs"
    cmd = [sys.executable, "-m", "cascade_core", "generate", *SMALL, "--device", "cpu", "--blocks", "0",
           "--window", "6", "--vae", str(vae), "--video-out", str(video), "--frames-dir", str(pngs)]
    proc, out, err, _ = _ctrl_c_once_pngs_are_written(cmd, pngs, 21)
    assert proc.returncode == 0 and "Traceback" not in err, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["endless"] and summary["blocks"] >= 2
    assert summary["video_frames"] == 1 + 4 * (3 * summary["blocks"] - 1) == _mp4_frames(video) == len(os.listdir(pngs))


def test_package_exposes_the_main_entry_points_lazily():
    code = ("import sys, cascade_core; light = 'torch' not in sys.modules; "
            "from cascade_core import generate, CascadeConfig, PromptSchedule, load_dit; "
            "print(light, all('Raises' in f.__doc__ or 'raises' in f.__doc__ "
            "for f in (generate, CascadeConfig, PromptSchedule, load_dit)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "True"], r.stderr


def _slow_writer(monkeypatch):
    """Every block's frames are written 0.2 s late, on the FrameStream's writer thread."""
    from cascade_core.video.frames import VideoWriter

    write = VideoWriter.write

    def slow(self, event):
        time.sleep(0.2)
        write(self, event)

    monkeypatch.setattr(VideoWriter, "write", slow)


def _stop_after(monkeypatch, calls: int) -> None:
    """Ctrl-C as the run sees it: the stop request turns true at its ``calls``-th question."""
    from cascade_core.cli import run as cli_run

    asked = []
    monkeypatch.setattr(cli_run.StopRequest, "__call__", lambda self: asked.append(1) or len(asked) >= calls)


def _mp4_frames(path) -> int:
    import av

    with av.open(str(path)) as container:
        return len(list(container.decode(video=0)))


def test_a_stopped_generate_writes_every_decoded_frame_though_the_writer_lags(tmp_path, capsys, monkeypatch):
    import threading

    from cascade_core.video.taew import TinyWanDecoder

    vae = tmp_path / "taew.safetensors"
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), str(vae))
    _slow_writer(monkeypatch)
    _stop_after(monkeypatch, 13)  # at P1 a block takes 5 ticks: two blocks are done by then
    before = set(threading.enumerate())
    video, pngs = tmp_path / "v.mp4", tmp_path / "pngs"
    assert main(["generate", *SMALL, "--device", "cpu", "--blocks", "4", "--vae", str(vae), "--video-out",
                 str(video), "--frames-dir", str(pngs)]) == 130
    line = capsys.readouterr().err.strip()
    match = re.fullmatch(r"interrupted: stopped at block (\d+) of 4; \S+ and \S+ hold (\d+) frames", line)
    assert match, line
    count = int(match.group(2))
    assert count == 1 + 4 * (3 * (int(match.group(1)) - 1) - 1) and count >= 9  # every finished block
    assert _mp4_frames(video) == len(os.listdir(pngs)) == count  # a playable MP4 with all of them
    assert set(threading.enumerate()) == before


def test_a_stopped_decode_tells_the_frames_it_wrote(tmp_path, capsys, monkeypatch):
    import threading

    from cascade_core.video.vae import WanVAEDecoder

    vae = tmp_path / "vae.safetensors"
    save_safetensors(WanVAEDecoder(dim=8).state_dict(), str(vae))
    save_safetensors({"latents": torch.randn(1, 16, 5, 4, 8)}, str(tmp_path / "lat.safetensors"))
    _slow_writer(monkeypatch)
    _stop_after(monkeypatch, 4)  # before the fourth latent frame (one per pass)
    before = set(threading.enumerate())
    video, pngs = tmp_path / "v.mp4", tmp_path / "pngs"
    assert main(["decode", "--latents", str(tmp_path / "lat.safetensors"), "--vae", str(vae), "--video-out",
                 str(video), "--frames-dir", str(pngs), "--device", "cpu", "--frames-per-pass", "1"]) == 130
    line = capsys.readouterr().err.strip()
    assert line.endswith("and " + str(pngs) + " hold 9 frames") and "latent frame 3 of 5" in line, line
    assert _mp4_frames(video) == len(os.listdir(pngs)) == 9  # 1 + 4 + 4
    assert set(threading.enumerate()) == before


def test_a_stop_while_a_long_given_video_is_decoded_is_heard_and_keeps_everything(tmp_path, capsys, monkeypatch):
    """Ctrl-C before the first block: the given video is decoded a block's worth at a time and the
    stop is asked between, so it ends at once with the frames decoded so far; no block was made, so
    no latents file is written (the given one holds them)."""
    from cascade_core.video.taew import TinyWanDecoder

    vae = tmp_path / "taew.safetensors"
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), str(vae))
    given = torch.randn(1, 16, 30, 4, 8, generator=torch.Generator().manual_seed(2))
    save_safetensors({"latents": given}, str(tmp_path / "given.safetensors"))
    _stop_after(monkeypatch, 3)  # after two of the ten pushes of 3 latent frames
    out, video = tmp_path / "out.safetensors", tmp_path / "v.mp4"
    assert main(["generate", *SMALL, "--continue", str(tmp_path / "given.safetensors"), "--vae", str(vae),
                 "--video-out", str(video), "--latents-out", str(out)]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: stopped at block 1 of \d+; \S+ holds 21 frames", line), line
    assert _mp4_frames(video) == 1 + 4 * (6 - 1)  # the two pushed pieces, 6 latent frames
    assert not out.exists()


def test_a_second_ctrl_c_stops_at_once_and_says_so(capsys, monkeypatch):
    """The first Ctrl-C asks the run to stop at its next tick; a second stops it at once, and the
    message says that (not that the run had not started)."""
    from cascade_core.cli import run as cli_run

    with cli_run.StopRequest() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop()
        with pytest.raises(KeyboardInterrupt) as second:
            stop._handle(signal.SIGINT, None)

    def run_generate(args):
        raise second.value

    monkeypatch.setattr(cli_run, "run_generate", run_generate)
    assert main(["generate", *SMALL]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: a second Ctrl-C stopped the run at once; "
                                               "what was written is finalised")


def test_an_mp4_cut_off_while_it_is_written_plays_up_to_its_last_fragment(tmp_path):
    """The writer's file, copied as it is mid-run (what a killed process leaves), decodes its first frames
    exactly; the closed file decodes every frame."""
    import shutil

    from cascade_core.video.frames import FramesEvent, VideoWriter

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(1, 3, 120, 32, 64, generator=g) * 2 - 1  # [1, 3, F, H, W] in [-1, 1]
    path, cut = tmp_path / "v.mp4", tmp_path / "cut.mp4"
    writer = VideoWriter(str(path))
    for at in range(0, 120, 12):
        writer.write(FramesEvent(at // 12, at, frames[:, :, at:at + 12], 0.0))
    shutil.copy(path, cut)
    writer.close()
    import av

    def decoded(p):
        with av.open(str(p)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    whole, kept = decoded(path), decoded(cut)
    assert len(whole) == 120
    # the encoder still holds its look-ahead; the whole fragments before it (one per keyframe) are in the file
    assert VideoWriter.KEYFRAME_SECONDS * 16 <= len(kept) < 120
    assert all(np.array_equal(a, b) for a, b in zip(kept, whole))


def test_an_endless_generate_ends_at_ctrl_c_with_its_video_and_last_window(tmp_path, capsys, monkeypatch):
    from cascade_core.video.taew import TinyWanDecoder

    vae = tmp_path / "taew.safetensors"
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), str(vae))
    _stop_after(monkeypatch, 23)  # at P1 a block takes 5 ticks: four blocks are final by then
    video, lat = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    assert main(["generate", *SMALL, "--device", "cpu", "--blocks", "0", "--window", "6", "--vae", str(vae),
                 "--video-out", str(video), "--latents-out", str(lat)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    blocks = summary["blocks"]
    assert blocks == 4 and summary["endless"] and summary["stopped"] == "Ctrl-C"
    assert summary["video_frames"] == 1 + 4 * (3 * blocks - 1) == _mp4_frames(video)  # every final block's
    assert summary["latents_first_frame"] == 3 * blocks - 6 and summary["latent_shape"] == [1, 16, 6, 4, 8]
    assert read_tensor_file(str(lat))["latents"].shape == (1, 16, 6, 4, 8)
    assert "Traceback" not in out.err


@pytest.mark.parametrize("extra,message", [
    ([], "endless video .* needs a local window"),
    (["--window", "6", "--noise", "n.safetensors"], "an endless one .* leave --noise out"),
    (["--window", "6", "--devices", "cpu,cpu"], "endless video .* one device"),
    (["--window", "6", "--blocks", "-1"], "--blocks must be >= 1 .0: endless")])
def test_an_endless_generate_refuses_in_one_line(capsys, extra, message):
    assert main(["generate", *SMALL, "--blocks", "0", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_an_endless_generate_stopped_before_its_first_block_made_nothing(tmp_path, capsys, monkeypatch):
    _stop_after(monkeypatch, 1)
    lat = tmp_path / "lat.safetensors"
    assert main(["generate", *SMALL, "--device", "cpu", "--blocks", "0", "--window", "6",
                 "--latents-out", str(lat)]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: stopped before the endless video's first block was "
                                               "final; no frames were decoded yet")
    assert not lat.exists()


def test_an_endless_continuation_says_where_its_window_lies_in_the_output_video(tmp_path, capsys, monkeypatch):
    first = tmp_path / "first.safetensors"
    assert main(["generate", *SMALL, "--device", "cpu", "--blocks", "4", "--latents-out", str(first)]) == 0
    capsys.readouterr()
    _stop_after(monkeypatch, 16)  # three blocks final (5 ticks each at P1), after the context's pass
    lat = tmp_path / "lat.safetensors"
    assert main(["generate", *SMALL, "--device", "cpu", "--blocks", "0", "--window", "6", "--continue", str(first),
                 "--latents-out", str(lat)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 12 given latent frames, the last 6 the context (the window); then the generated blocks
    assert (summary["given_frames"], summary["prefix_frames"]) == (12, 6)
    made = 12 + summary["generated_latent_frames"]
    assert summary["latents_first_frame"] == made - 6 and summary["latent_shape"][2] == 6
