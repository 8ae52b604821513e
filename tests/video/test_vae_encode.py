"""The Wan2.1 VAE encoder (diffusers' AutoencoderKLWan read from the decoder's files) and the start
image / video frames it encodes, on the tiny complete Wan2.1 VAE fixture.

The oracle is diffusers itself: the test builds AutoencoderKLWan, converts the original names with
diffusers' converter, loads strictly, and prepares the pixels with numpy (a crop it computes itself).
"""
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import tiny_models
from PIL import Image

from cascade_core.video.latents import LATENT_MEAN, LATENT_STD
from cascade_core.video.vae_encode import encode, load_encoder, load_image, load_video
from cascade_core.weights.safe_io import CheckpointError, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 64, 32  # the run's pixel size


def diffusers_vae(sd):
    """The oracle: diffusers' AutoencoderKLWan with the fixture's weights, names converted by diffusers."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    vae = AutoencoderKLWan(base_dim=8)
    vae.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)), strict=True)
    return vae.eval()


def their_latents(vae, pixels):
    """diffusers' encode, the distribution's mode, normalised per channel as the DiT reads it."""
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (LATENT_MEAN, LATENT_STD))
    return (raw - mean) / std


def as_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, H, W] on the [-1, 1] scale."""
    return torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2).unsqueeze(0)


def noise_image(h, w, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """The tiny complete Wan2.1 VAE in the original layout (safetensors, .pt, prefixed) and as diffusers saves it."""
    folder = tmp_path_factory.mktemp("vae")
    sd = tiny_models().vae_state_dict("tiny")
    paths = {"original": folder / "wan_2.1_vae.safetensors", "pt": folder / "Wan2.1_VAE.pth",
             "prefixed": folder / "prefixed.safetensors", "diffusers folder": folder / "vae"}
    save_safetensors(sd, str(paths["original"]))
    torch.save(sd, paths["pt"])
    save_safetensors({f"first_stage_model.{k}": v for k, v in sd.items()}, str(paths["prefixed"]))
    diffusers_vae(sd).save_pretrained(paths["diffusers folder"])
    paths["diffusers file"] = paths["diffusers folder"] / "diffusion_pytorch_model.safetensors"
    return sd, paths


@pytest.mark.parametrize("layout", ["original", "pt", "prefixed", "diffusers folder", "diffusers file"])
def test_an_image_encodes_to_the_latent_diffusers_gives(tmp_path, vae_files, layout):
    sd, paths = vae_files
    exact = noise_image(H, W)  # already the run's size
    tall = noise_image(48, W, channels=4, seed=1)  # RGBA, cover scale 1: rows 8..39 kept, alpha dropped
    Image.fromarray(exact).save(tmp_path / "exact.png")
    Image.fromarray(tall).save(tmp_path / "tall.png")
    ours = load_encoder(paths[layout])
    theirs = diffusers_vae(sd)
    for name, expected_pixels in (("exact.png", exact), ("tall.png", tall[8:40, :, :3])):
        pixels = load_image(str(tmp_path / name), W, H)
        assert torch.equal(pixels, as_pixels(expected_pixels[None])), name
        got = encode(ours, pixels)
        assert got.shape == (1, 16, 1, H // 8, W // 8)
        torch.testing.assert_close(got, their_latents(theirs, as_pixels(expected_pixels[None])), atol=1e-5, rtol=0)


def test_a_wide_image_is_scaled_to_cover_then_centre_cropped(tmp_path):
    # 128 x 32 onto 64 x 32: halved to 64 x 16 would not cover; scaled to 128 x 32 (scale 1) and the
    # middle 64 columns kept. Left and right quarters are black, the middle white.
    image = np.zeros((32, 128, 3), dtype=np.uint8)
    image[:, 32:96] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    assert torch.equal(load_image(str(tmp_path / "wide.png"), W, H), torch.ones(1, 3, 1, H, W))
    # 32 x 16 onto 64 x 32: scaled 2x, nothing cropped; a flat colour stays that colour
    Image.fromarray(np.full((16, 32, 3), (255, 0, 255), dtype=np.uint8)).save(tmp_path / "small.png")
    pixels = load_image(str(tmp_path / "small.png"), W, H)
    assert pixels.shape == (1, 3, 1, H, W) and torch.equal(pixels[0, :, 0, 0, 0], torch.tensor([1.0, -1.0, 1.0]))


def write_mp4(path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qp": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_video_keeps_its_last_frames_for_the_context(tmp_path):
    # 11 flat frames, frame i of grey level 20 i: 2 latent frames keep the last 5, 3 the last 9,
    # 4 (more than it holds) the largest 1 + 4k it has: 9; None every 1 + 4k of its last frames
    levels = 20 * np.arange(11)
    frames = np.broadcast_to(levels[:, None, None, None], (11, H, W, 3)).astype(np.uint8).copy()
    write_mp4(tmp_path / "v.mp4", frames)
    for asked, kept in ((2, 5), (3, 9), (4, 9), (None, 9)):
        pixels = load_video(str(tmp_path / "v.mp4"), W, H, asked)
        assert pixels.shape == (1, 3, kept, H, W), asked
        got = ((pixels[0, 0, :, H // 2, W // 2] + 1) * 127.5).round()
        assert (got - torch.tensor(levels[11 - kept:], dtype=torch.float32)).abs().max() <= 2, (asked, got)


def test_encode_takes_1_plus_4k_frames_and_gives_one_latent_per_4(vae_files):
    sd, paths = vae_files
    ours = load_encoder(paths["original"])
    pixels = torch.rand(1, 3, 9, H, W, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = encode(ours, pixels)
    assert got.shape == (1, 16, 3, H // 8, W // 8)
    torch.testing.assert_close(got, their_latents(diffusers_vae(sd), pixels), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        encode(ours, pixels[:, :, :4])
    with pytest.raises(ValueError, match=r"\[1, 3, T, H, W\]"):
        encode(ours, pixels[0])


def test_files_without_the_encoder_or_of_another_kind_are_refused(tmp_path, vae_files):
    sd, _ = vae_files
    decoder_only = tmp_path / "decoder_only.safetensors"
    save_safetensors({k: v for k, v in sd.items() if k.startswith(("decoder.", "conv2."))}, str(decoder_only))
    dit = tmp_path / "dit.safetensors"
    save_safetensors({"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2),
                      "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(dit))
    broken = tmp_path / "broken.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("encoder.middle.1.")}, str(broken))
    for path, reason in ((decoder_only, "encoder half (encoder.*) that encodes images and videos is missing"),
                         (dit, "not a Wan2.1 VAE: it looks like a Wan DiT"),
                         (broken, "missing VAE keys: encoder.mid_block.attentions.0")):
        with pytest.raises(CheckpointError) as err:
            load_encoder(path)
        assert path.name in str(err.value) and reason in str(err.value), str(err.value)


def test_unreadable_images_and_videos_give_one_line_naming_the_file(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    for load, path, reason in ((load_image, junk, "not a readable image"),
                               (load_image, tmp_path / "missing.png", "no such file"),
                               (load_video, tmp_path / "junk.mp4", "not a readable video"),
                               (load_video, tmp_path / "missing.mp4", "no such file")):
        if path.suffix == ".mp4" and path.name.startswith("junk"):
            path.write_bytes(b"\x00" * 64)
        with pytest.raises(CheckpointError) as err:
            load(str(path), W, H)
        text = str(err.value)
        assert path.name in text and reason in text and len(text.splitlines()) == 1, text


def test_16_and_32_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A full-range gradient in 16-bit, 32-bit integer and float grey levels gives the pixels of its
    8-bit version (levels rounded by numpy here: v / 257 of 65535, v * 255 of 1.0)."""
    ramp = np.linspace(0, 1, 2 * W)[None, :].repeat(2 * H, 0)  # [2H, 2W], 0..1 left to right
    levels16 = np.round(ramp * 65535).astype(np.uint16)
    Image.fromarray(np.round(levels16 / 257).astype(np.uint8)).save(tmp_path / "eight.png")
    want = load_image(str(tmp_path / "eight.png"), W, H)
    assert want.min() < -0.9 and want.max() > 0.9  # the full range, left to right
    Image.fromarray(levels16).save(tmp_path / "sixteen.png")
    Image.fromarray(levels16.astype(np.int32)).save(tmp_path / "int32.tiff")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")
    for name, mode in (("sixteen.png", "I;16"), ("int32.tiff", "I"), ("float.tiff", "F")):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode, (name, image.mode)
        got = load_image(str(tmp_path / name), W, H)
        assert (got - want).abs().max() <= 1 / 127.5 + 1e-6, name


def write_png(path, width, height, complete=True):
    """A black 1-bit greyscale PNG of width x height, tiny on disk (its rows compress to almost
    nothing); ``complete`` False cuts it in the middle of its pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pack = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the row's bits
    data = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    data = data if complete else data[:len(data) // 2]
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", data)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + (chunk(b"IEND", b"") if complete else b""))


BOMBS = {"huge.png": ((20000, 20000), "more than 178956970 pixels"),  # past what Pillow reads at all
         "large.png": ((12000, 8000), "12000 x 8000 pixels")}  # 96 megapixels: Pillow warns


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "truncated"])
@pytest.mark.parametrize("name", list(BOMBS))
def test_images_past_the_decompression_bomb_limit_are_refused_in_one_line(tmp_path, name, complete):
    """Past Pillow's limit (89478485 pixels by default; twice that is where Pillow itself raises), an
    image is refused from its header, naming the file and its size, and nothing is warned."""
    (w, h), size = BOMBS[name]
    assert Image.MAX_IMAGE_PIXELS == 89478485 < w * h
    write_png(tmp_path / name, w, h, complete)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as err:
            load_image(str(tmp_path / name), W, H)
    text = str(err.value)
    assert text.startswith(f"{name}: too large: {size}") and len(text.splitlines()) == 1, text


def test_the_png_writer_of_the_bomb_test_writes_images_pillow_reads(tmp_path):
    write_png(tmp_path / "fine.png", 2 * W, 2 * H)
    assert torch.equal(load_image(str(tmp_path / "fine.png"), W, H), -torch.ones(1, 3, 1, H, W))
