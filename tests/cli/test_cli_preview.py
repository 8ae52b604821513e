"""Two decoders at once on the command line (``generate --preview-vae``): the video's frames are those of a run
with --vae alone, the preview's are the preview decoder's own decode of the same latents, both streams get every
block, the preview MP4 can be read while it grows, both decoders' weights are in the one memory estimate, and every
refusal is one line before any model work."""
import json
import os

import numpy as np
import pytest
import test_cli_checks
import torch
from conftest import tiny_models

from cascade_core.cli import preview as cli_preview
from cascade_core.cli.command import main
from cascade_core.session.run_session import RunSession
from cascade_core.video.frames import VideoWriter, load_decoder, to_uint8_frames
from cascade_core.video.taew import TinyWanDecoder
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

no_model_work, one_line = test_cli_checks.no_model_work, test_cli_checks.one_line  # (a fixture, a helper)
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--quiet", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Wan2.1 VAE (the video's decoder) and a tiny taew2_1 (the preview's), and a file of neither."""
    folder = tmp_path_factory.mktemp("decoders")
    paths = {"wan": str(folder / "wan.safetensors"), "taew": str(folder / "taew2_1.safetensors"),
             "dit": str(folder / "dit.safetensors")}
    save_safetensors(tiny_models().vae_state_dict("tiny"), paths["wan"])
    torch.manual_seed(0)
    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(), paths["taew"])
    save_safetensors(tiny_models().tiny_dit_state_dict(), paths["dit"])
    return paths


@pytest.fixture
def written(monkeypatch):
    """What every VideoWriter is handed: {path: [(first_frame, pixels [F, H, W, 3] uint8), ...]}; and under
    ("live", path) whether it writes a live MP4."""
    seen, real = {}, VideoWriter.write_pixels

    def record(self, pixels, first_frame):
        seen.setdefault(self.path, []).append((first_frame, pixels.clone()))
        seen["live", self.path] = self.live
        return real(self, pixels, first_frame)

    monkeypatch.setattr(VideoWriter, "write_pixels", record)
    return seen


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _pngs(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))])


def test_the_video_is_the_single_decoder_runs_and_the_preview_its_own_decoders(tmp_path, files, written, capsys):
    import av

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["generate", *SMALL, "--vae", files["wan"], "--video-out", str(one / "v.mp4"),
                 "--frames-dir", str(one / "png"), "--latents-out", str(one / "lat.safetensors")]) == 0
    single = _summary(capsys)
    assert "preview_out" not in single and single["video_first_frame_seconds"] > 0
    preview = str(two / "p.mp4")
    assert main(["generate", *SMALL, "--vae", files["wan"], "--preview-vae", files["taew"],
                 "--video-out", str(two / "v.mp4"), "--frames-dir", str(two / "png"), "--preview-out", preview,
                 "--latents-out", str(two / "lat.safetensors")]) == 0
    s = _summary(capsys)
    latents = read_tensor_file(str(two / "lat.safetensors"))["latents"]
    assert torch.equal(latents, read_tensor_file(str(one / "lat.safetensors"))["latents"])
    # the video: exactly the frames of the run with --vae alone
    assert np.array_equal(_pngs(two / "png"), _pngs(one / "png")) and len(os.listdir(two / "png")) == 21
    # both streams got every block, in order: 9 frames of block 0, then 12
    assert [f for f, _ in written[str(two / "v.mp4")]] == [f for f, _ in written[preview]] == [0, 9]
    assert written["live", preview] and not written["live", str(two / "v.mp4")]  # the preview plays as it grows
    # the preview: exactly the preview decoder's own decode of the same latents, block by block
    stream = load_decoder(files["taew"], torch.float32, "cpu").stream(None)
    expected = torch.cat([to_uint8_frames(stream.decode(latents[:, :, b:b + 3])) for b in (0, 3)])
    assert torch.equal(torch.cat([p for _, p in written[preview]]), expected)
    assert not torch.equal(expected, torch.cat([p for _, p in written[str(two / "v.mp4")]]))  # another decoder
    assert s["preview_out"] == preview and s["preview_frames"] == s["video_frames"] == 21
    assert 0 < s["preview_first_frame_seconds"] and s["preview_frames_per_second"] > 0
    assert 0 < s["video_first_frame_seconds"] <= s["end_to_end_seconds"]
    with av.open(preview) as container:
        assert sum(1 for _ in container.decode(video=0)) == 21


def test_the_preview_goes_beside_the_video_by_default(tmp_path, files, written, capsys):
    video = tmp_path / "clip.mp4"
    assert main(["generate", *SMALL, "--vae", files["wan"], "--preview-vae", files["taew"],
                 "--video-out", str(video)]) == 0
    assert _summary(capsys)["preview_out"] == str(tmp_path / "clip.preview.mp4")
    assert (tmp_path / "clip.preview.mp4").stat().st_size > 0
    assert {k for k in written if isinstance(k, str)} == {str(video), str(tmp_path / "clip.preview.mp4")}


def test_the_preview_mp4_plays_every_frame_written_while_it_grows(tmp_path):
    import av

    writer = VideoWriter(str(tmp_path / "p.mp4"), live=True)
    frames = torch.randint(0, 256, (21, 32, 64, 3), dtype=torch.uint8)
    try:
        for at, end in ((0, 9), (9, 21)):  # two blocks' frames
            writer.write_pixels(frames[at:end], at)
            with av.open(str(tmp_path / "p.mp4")) as container:  # read while the writer still has it open
                readable = sum(1 for _ in container.decode(video=0))
            assert readable >= writer.count - 1, (readable, writer.count)  # all but the frame being muxed
    finally:
        writer.close()


def test_both_decoders_weights_are_in_the_one_memory_estimate(tmp_path, files, monkeypatch, capsys):
    asked = []
    real = RunSession.memory

    def memory(self, model_cfg, dtype, prompts, vae_bytes, *a, **k):
        asked.append(vae_bytes)
        return real(self, model_cfg, dtype, prompts, vae_bytes, *a, **k)

    monkeypatch.setattr(RunSession, "memory", memory)
    for extra in ([], ["--preview-vae", files["taew"]]):
        assert main(["generate", *SMALL, "--vae", files["wan"], "--video-out", str(tmp_path / "v.mp4"), *extra]) == 0
    sizes = [os.path.getsize(files[k]) for k in ("wan", "taew")]
    assert asked == [sizes[0], sizes[0] + sizes[1]]
    # decoders on a device of their own (a second CPU device stands in for another GPU): none on the DiT's
    asked.clear()
    monkeypatch.setattr(RunSession, "decode_device", lambda self, device, choice=None: torch.device("cpu", 1))
    assert main(["generate", *SMALL, "--vae", files["wan"], "--video-out", str(tmp_path / "v.mp4"),
                 "--preview-vae", files["taew"]]) == 0
    assert asked == [0]


def test_preview_refusals_are_one_line_before_model_work(tmp_path, files, capsys, no_model_work):
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    (tmp_path / "link").symlink_to(a_folder)  # the video's folder under another name
    wan, taew = ["--vae", files["wan"]], ["--preview-vae", files["taew"]]
    cases = [
        (taew, "--preview-vae is a second decoder beside --vae"),
        ([*wan, "--preview-out", str(tmp_path / "p.mp4")], "--preview-out needs --preview-vae"),
        ([*wan, "--preview-vae", str(tmp_path / "missing.pth")], "missing.pth: no such file"),
        ([*wan, "--preview-vae", files["wan"]], "--preview-vae is the --vae file"),
        ([*wan, "--preview-vae", files["dit"]], "--preview-vae dit.safetensors: not a"),
        ([*wan, *taew, "--video-out", str(tmp_path / "v.mp4"), "--preview-out", str(tmp_path / "v.mp4")],
         "is the video's file"),
        ([*wan, *taew, "--preview-out", str(a_folder)], "is a folder"),
        ([*wan, *taew, "--video-out", str(a_folder / "v.mp4"), "--preview-out", str(tmp_path / "link" / "v.mp4")],
         "is the video's file"),
        ([*wan, *taew, "--preview-out", str(tmp_path / "p.webm")], "the file written is MP4; give a name ending in"),
        ([*wan, *taew, "--preview-out", str(tmp_path / "p")], "the file written is MP4; give a name ending in"),
    ]
    for args, message in cases:
        assert main(["generate", *SMALL, *args]) == 2, args
        one_line(capsys, message)


def test_the_preview_path_rule():
    class Args:
        vae, preview_vae, preview_out, video_out, frames_dir = "v", "p", None, None, None

    args = Args()
    assert cli_preview.preview_path(args) == os.path.join("out", "video.preview.mp4")
    args.frames_dir = "pngs"  # PNGs alone: no video to sit beside
    assert cli_preview.preview_path(args) == os.path.join("out", "preview.mp4")
    args.preview_out = "x.mp4"
    assert cli_preview.preview_path(args) == "x.mp4"


@pytest.mark.parametrize("fails_at", ["write", "close"])
def test_a_failing_preview_is_one_warning_and_the_run_keeps_its_video_and_latents(tmp_path, files, capsys,
                                                                                 monkeypatch, fails_at):
    """The preview's writer failing (a full disk) while writing or when finalised: one ``warning:`` line, exit 0,
    the video's MP4 whole and the latents written; the summary says why the preview stopped."""
    import av

    preview = str(tmp_path / "p.mp4")
    real_write, real_close = VideoWriter.write_pixels, VideoWriter.close

    def full_disk(self, *args):
        if self.path == preview:
            raise OSError(28, "No space left on device")
        return (real_write if args else real_close)(self, *args)

    monkeypatch.setattr(VideoWriter, "write_pixels" if fails_at == "write" else "close", full_disk)
    video, latents = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    assert main(["generate", *SMALL, "--vae", files["wan"], "--video-out", str(video), "--preview-vae",
                 files["taew"], "--preview-out", preview, "--latents-out", str(latents)]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ["warning: the preview stopped (OSError: [Errno 28] No space left on device); "
                                        "the video goes on without it"], err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preview_stopped"].startswith("OSError") and summary["video_frames"] == 1 + 4 * 5
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 1 + 4 * 5
    assert read_tensor_file(str(latents))["latents"].shape[2] == 6
