"""The command line with a Wan2.2 model (LongLive 2.0, Wan2.2-TI2V-5B's 48-channel latents) and the Wan2.2 VAE, on
tiny random weights: image-to-video (``--image`` with ``--family longlive-2``: the image latent is block 0's frame
0), ``--continue`` of Wan2.2 latents, the ``decode`` sub-command of Wan2.2 latents, and the one-line refusals.

Oracles: the image latent is diffusers' encode of the image's pixels (normalised in test_vae22_encode); the run is
:func:`sampling.loop.generate` called here with the same weights, noise and prompt (``image_latent=`` / ``prefix=``);
the decode is the streaming decoder's one decode of all latents.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_vae22_encode import original_layout, their_latents, tiny_wan22_vae
from test_wan22_files import wan22_vae

from cascade_core.cli.command import main
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.video.frames import load_decoder
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

# one head of 64: what the loader assumes for a dim-64 file without a config (dim / 128, at least one)
TINY_5B = WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=2, in_dim=48, out_dim=48, text_dim=32)
W, H, BLOCKS, FRAMES = 64, 32, 2, 8  # latents 2 x 4; LongLive 2.0: 8 latent frames a block
BASE = ["--width", str(W), "--height", str(H), "--quiet", "--dtype", "fp32", "--device", "cpu", "--compile", "off",
        "--family", "longlive-2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny 5B DiT, a prompt embedding, the initial noise of 2 blocks, the complete tiny Wan2.2 VAE (original
    layout) and diffusers' model of it, and a start image of the run's size."""
    folder = tmp_path_factory.mktemp("wan22_cli")
    model = WanModel.random(TINY_5B, seed=0)
    g = torch.Generator().manual_seed(1)
    paths = {"dit": folder / "dit.safetensors", "embeds": folder / "prompt.safetensors",
             "noise": folder / "noise.safetensors", "vae": folder / "wan2.2_vae.safetensors",
             "image": folder / "start.png"}
    save_safetensors(model.state_dict(), str(paths["dit"]))
    embeds = torch.randn(7, TINY_5B.text_dim, generator=g)
    save_safetensors({"embeds": embeds}, str(paths["embeds"]))
    noise = torch.randn(1, 48, BLOCKS * FRAMES, H // 16, W // 16, generator=g)
    save_safetensors({"noise": noise}, str(paths["noise"]))
    vae = tiny_wan22_vae()
    save_safetensors(original_layout(vae), str(paths["vae"]))
    image = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(paths["image"])
    paths = {k: str(v) for k, v in paths.items()}
    return paths, model, embeds, noise, vae, image


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def direct(model, embeds, noise, blocks=BLOCKS, **kw) -> torch.Tensor:
    """generate() of LongLive 2.0's family settings, called here."""
    return generate(model, PromptSchedule([(0, embeds)]), family_config("longlive-2"), blocks=blocks, width=W,
                    height=H, noise=noise, **kw).latents


def test_image_to_video_holds_the_image_as_block_0s_frame_0(files, tmp_path, capsys):
    paths, model, embeds, noise, vae, image = files
    out, video = str(tmp_path / "out.safetensors"), str(tmp_path / "out.mp4")
    assert main(["generate", *BASE, "--blocks", str(BLOCKS), "--checkpoint", paths["dit"], "--embeds",
                 paths["embeds"], "--noise", paths["noise"], "--image", paths["image"], "--vae", paths["vae"],
                 "--latents-out", out, "--video-out", video]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    s = json.loads(captured.out.strip().splitlines()[-1])
    assert "note: the start image is block 0's frame 0" in captured.err
    pixels = torch.from_numpy(image).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None]  # [1, 3, 1, H, W]
    image_latent = their_latents(vae, pixels)  # diffusers' encode, normalised with Wan2.2's statistics
    latents = read_tensor_file(out)["latents"]
    assert latents.shape == (1, 48, BLOCKS * FRAMES, H // 16, W // 16) and s["latent_frames"] == BLOCKS * FRAMES
    assert (s["prefix_source"], s["prefix_frames"], s["image_latent"]) == ("image", 0, "block 0's frame 0")
    torch.testing.assert_close(latents[:, :, :1], image_latent, atol=1e-5, rtol=0)
    expected = direct(model, embeds, noise, image_latent=image_latent)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(latents[:, :, 1:], direct(model, embeds, noise)[:, :, 1:], atol=1e-3)  # it matters
    assert s["video_frames"] == 1 + 4 * (BLOCKS * FRAMES - 1)


@pytest.mark.parametrize("extra, message", [
    ([], "--image {image} needs --vae FILE (the complete Wan2.2 VAE) to encode an image"),
    (["--vae", "{vae}", "--frames-per-block", "1", "--sink", "1", "--window", "4"],
     "--image: an image latent is frame 0 of block 0, which holds 1 frame here"),
    (["--vae", "{vae}", "--devices", "cpu,cpu"], "--image: LongLive 2.0's start image (block 0's frame 0) runs on one "
                                                 "device for now"),
    (["--vae", "{decoder_only}"], "holds only the decoder half of the Wan2.2 VAE"),
])
def test_image_to_video_refusals_are_one_line(files, tmp_path, capsys, extra, message):
    paths = dict(files[0], decoder_only=wan22_vae(tmp_path / "decoder_only.safetensors"))
    args = ["generate", *[a for a in BASE if a not in ("--device", "cpu")], "--blocks", "1", "--checkpoint",
            paths["dit"], "--image", paths["image"], *[a.format(**paths) for a in extra]]
    assert main(args if "--devices" in extra else [*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(**paths) in err, err


def test_continuing_wan22_latents_then_decoding_them(files, tmp_path, capsys):
    paths, model, embeds, noise, _, _ = files
    first, more = str(tmp_path / "first.safetensors"), str(tmp_path / "more.safetensors")
    common = ["generate", *BASE, "--checkpoint", paths["dit"], "--embeds", paths["embeds"]]
    assert main([*common, "--blocks", "1", "--latents-out", first]) == 0, capsys.readouterr().err
    capsys.readouterr()
    given = read_tensor_file(first)["latents"]
    save_safetensors({"noise": noise[:, :, :FRAMES]}, str(tmp_path / "noise1.safetensors"))
    assert main([*common, "--blocks", "1", "--continue", first, "--noise", str(tmp_path / "noise1.safetensors"),
                 "--latents-out", more]) == 0, capsys.readouterr().err
    s = summary(capsys)
    latents = read_tensor_file(more)["latents"]
    assert latents.shape[2] == 2 * FRAMES and s["prefix_frames"] == FRAMES and torch.equal(latents[:, :, :FRAMES],
                                                                                            given)
    expected = direct(model, embeds, noise[:, :, :FRAMES], blocks=1, prefix=given, include_prefix=False)
    torch.testing.assert_close(latents[:, :, FRAMES:], expected, atol=1e-4, rtol=0)
    # decode: the Wan2.2 latents through --vae (the Wan2.2 VAE's decoder), as one decode of them all
    frames_dir = tmp_path / "pngs"
    assert main(["decode", "--latents", more, "--vae", paths["vae"], "--frames-dir", str(frames_dir), "--device",
                 "cpu", "--quiet", "--frames-per-pass", "3"]) == 0, capsys.readouterr().err
    s = summary(capsys)
    assert s["latent_frames"] == 2 * FRAMES and s["video_frames"] == 1 + 4 * (2 * FRAMES - 1)
    decoder = load_decoder(paths["vae"], torch.float32, "cpu", latent_space=None)
    with torch.no_grad():
        once = decoder.stream(None).decode(latents)[0]  # [3, F, H, W] in [-1, 1]
    expected_png = ((once[:, -1].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
    last = np.asarray(Image.open(frames_dir / f"{s['video_frames'] - 1:05d}.png")).astype(int)
    assert np.abs(last - expected_png.astype(int)).max() <= 1


def test_latents_of_the_other_space_are_refused_naming_both(files, tmp_path, capsys):
    paths = files[0]
    wan21 = str(tmp_path / "wan21.safetensors")
    save_safetensors({"latents": torch.zeros(1, 16, 3, 2, 4)}, wan21)
    assert main(["generate", *BASE, "--blocks", "1", "--checkpoint", paths["dit"], "--continue", wan21]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--continue {wan21} holds Wan2.1 latents (16 channels, 8x smaller) but the model makes "
                        f"Wan2.2 latents (48 channels, 16x smaller): give Wan2.2 latents"), err
    assert main(["decode", "--latents", wan21, "--vae", paths["vae"], "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds Wan2.1 latents (16 channels, 8x smaller) but --vae " \
        "wan2.2_vae.safetensors decodes Wan2.2 latents (48 channels, 16x smaller)" in err, err
