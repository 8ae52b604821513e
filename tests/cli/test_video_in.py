"""``generate --family streamdiffusionv2 --video-in FILE`` end to end on the built-in tiny model: raw latents in a
.safetensors, and a video file resized, encoded by the tiny Wan2.1 VAE chunk by chunk and restyled; one-line
refusals. The oracle: the engine run on what the test reads and encodes itself (diffusers' whole-video encode,
the resize rule of torchvision's uint8 resize written here). The streaming encoder's own test:
tests/video/test_stream_encoder.py."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_5B, tiny_models
from test_experts import write_pipeline
from test_vae_encode import diffusers_vae, write_mp4

from cascade_core.cli.command import main
from cascade_core.cli.inputs import BUILTIN
from cascade_core.model.dit import WanModel
from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import V2VConfig, video_chunks
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 64, 32
CPU = ["--quiet", "--dtype", "fp32", "--device", "cpu", "--compile", "off"]


def engine_run(latents, pixels, seed, **settings):
    """The engine on the built-in model with the CLI's default prompt (randn(16, text_dim) from the seed)."""
    model = WanModel.random(BUILTIN, seed=0)
    embeds = torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    return video_to_video(model, PromptSchedule.single(embeds), V2VConfig(**settings), video_chunks(latents, pixels),
                          seed=seed, chunks=latents.shape[2] - 1).latents


def summary_of(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_raw_latents_in_restyle_as_the_engine_does(tmp_path, capsys):
    latents = torch.randn(1, 16, 5, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    save_safetensors({"latents": latents}, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    code = main(["generate", "--video-in", str(tmp_path / "in.safetensors"), "--latents-out", str(out), "--seed", "3",
                 "--noise-scale", "0.8", "--parallel", "2", *CPU])
    assert code == 0
    summary = summary_of(capsys)
    assert summary["family"] == "streamdiffusionv2" and summary["chunks"] == 4
    assert summary["latent_shape"] == [1, 16, 5, H // 8, W // 8] and summary["settings"]["steps"] == [700, 500]
    assert summary["forwards"] == 1 + 2 + 3 and summary["ticks"] == 5
    expected = engine_run(latents, None, 3, noise_scale=0.8, parallel=2)
    assert torch.equal(read_tensor_file(str(out))["latents"], expected)


def test_a_video_file_is_resized_encoded_chunk_by_chunk_and_restyled(tmp_path, capsys):
    """13 frames at 80x48: 3 chunks (1 + 4*3 = 13, none dropped) of the frames resized to 64x32; 14 frames: the
    last is dropped. The decoded output has 1 + 4*3 frames."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (14, 48, 80, 3), dtype=np.uint8)
    write_mp4(tmp_path / "in.mp4", frames)
    sd = tiny_models().vae_state_dict("tiny")
    save_safetensors(sd, str(tmp_path / "vae.safetensors"))
    out = tmp_path / "out.safetensors"
    code = main(["generate", "--family", "streamdiffusionv2", "--video-in", str(tmp_path / "in.mp4"),
                 "--vae", str(tmp_path / "vae.safetensors"), "--width", str(W), "--height", str(H),
                 "--latents-out", str(out), "--video-out", str(tmp_path / "out.mp4"), "--seed", "5", *CPU])
    assert code == 0
    summary = summary_of(capsys)
    assert summary["chunks"] == 3 and summary["video_frames"] == 13

    import av  # the oracle: the file's frames, resized as torchvision resizes uint8 tensors, encoded whole
    with av.open(str(tmp_path / "in.mp4")) as container:
        decoded = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)][:13]
    x = torch.stack(decoded).permute(0, 3, 1, 2).float()  # [T, 3, 48, 80]
    x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True).round()
    pixels = (x / 127.5 - 1).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, 13, H, W]
    with torch.no_grad():
        latents = diffusers_vae(sd).encode(pixels).latent_dist.mode()
    expected = engine_run(latents, pixels, 5)
    torch.testing.assert_close(read_tensor_file(str(out))["latents"], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (["--family", "streamdiffusionv2"], "give it with --video-in FILE"),
    (["--family", "self-forcing", "--video-in", "LAT"], "it takes --family streamdiffusionv2"),
    (["--video-in", "LAT", "--window", "12"], "it takes no --window"),
    (["--video-in", "LAT", "--kv-dtype", "fp8"], "it takes no --kv-dtype"),
    (["--video-in", "LAT", "--parallel", "3"], "parallelism must lie in 1..2"),
    (["--video-in", "LAT", "--parallel", "4"], "parallelism must lie in 1..2 (the steps: chunks in flight)"),
    (["--video-in", "ZERO"], "H/8, W/8 positive multiples of the DiT's patch 2x2, got [1, 16, 3, 4, 0]"),
    (["--video-in", "LAT", "--checkpoint", "DIT5B"], "--video-in runs StreamDiffusionV2's video-to-video on a "
                                                     "Wan2.1 DiT (16 latent channels); dit5b.safetensors is a "
                                                     "Wan2.2 TI2V-5B DiT (48 latent channels)"),
    (["--video-in", "LAT", "--checkpoint", "PAIR"], "--video-in runs StreamDiffusionV2's video-to-video on a "
                                                    "Wan2.1 DiT (16 latent channels); pair is a two-expert Wan2.2 "
                                                    "A14B model"),
    (["--video-in", "LAT", "--checkpoint", "PAIR_FILE"], "; pair is a two-expert Wan2.2 A14B model"),
    (["--video-in", "LAT", "--noise-scale", "1.5"], "noise scale"),
    (["--video-in", "LAT", "--warp", "on"], "it takes no --warp"),
    (["--video-in", "BAD"], "expected raw latents [1, 16, T, H/8, W/8] with T >= 2"),
    (["--video-in", "VIDEO"], "give --vae FILE"),
    (["--noise-scale", "0.5"], "it needs --video-in"),
])
def test_what_video_to_video_cannot_take_is_refused_in_one_line(tmp_path, capsys, extra, message):
    save_safetensors({"latents": torch.zeros(1, 16, 3, 4, 8)}, str(tmp_path / "lat.safetensors"))
    save_safetensors({"latents": torch.zeros(1, 16, 1, 4, 8)}, str(tmp_path / "bad.safetensors"))
    save_safetensors({"latents": torch.zeros(1, 16, 3, 4, 0)}, str(tmp_path / "zero.safetensors"))
    (tmp_path / "v.mp4").write_bytes(b"")
    paths = {"LAT": tmp_path / "lat.safetensors", "BAD": tmp_path / "bad.safetensors", "VIDEO": tmp_path / "v.mp4",
             "ZERO": tmp_path / "zero.safetensors"}
    if "DIT5B" in extra:
        paths["DIT5B"] = tmp_path / "dit5b.safetensors"
        save_safetensors(WanModel.random(TINY_5B, seed=0).state_dict(), str(paths["DIT5B"]))
    if "PAIR" in extra or "PAIR_FILE" in extra:
        paths["PAIR"] = write_pipeline(str(tmp_path / "pair"), (WanModel.random(TINY, seed=0),
                                                                WanModel.random(TINY, seed=1)), {"boundary_ratio": 0.9})
        paths["PAIR_FILE"] = os.path.join(paths["PAIR"], "transformer", "diffusion_pytorch_model.safetensors")
    assert main(["generate", *[str(paths.get(a, a)) for a in extra], *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
