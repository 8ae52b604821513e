"""The Wan2.2 VAE encoder (diffusers' AutoencoderKLWan in the Wan2.2 configuration, read through load_encoder) on a
tiny random Wan2.2-shaped VAE written here in the original ``Wan2.2_VAE.pth`` layout and in diffusers' layout.

The oracle is diffusers itself: the test builds AutoencoderKLWan (z_dim 48, is_residual, patch_size 2, at tiny
widths), seeds every weight, and names the original layout's encoder keys itself (its own map, written from the
module tree of Wan2.2 ``wan/modules/vae2_2.py``: Encoder3d, Down_ResidualBlock, ResidualBlock, Resample,
AttentionBlock; the decoder half's names come from test_vae22's map). Proves: our encode of images and videos equals
diffusers' encode of the same pixels (the distribution's mode, normalised here with the Wan2.2 statistics), from
every layout; the encoder and the streamed decoder read from one complete file give diffusers' encode-then-decode of
the same pixels (fp32, float rounding); the name map covers every encoder tensor of the released widths; the
refusals (a decoder-only file, the other latent space, a pixel size of the wrong multiple) are one line.
"""
import re

import pytest
import torch
from test_light_decoders import in_blocks, save, seeded
from test_vae22 import WAN22_CONFIG, diffusers_name

from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS
from cascade_core.video.frames import load_decoder
from cascade_core.video.vae22 import Wan22VAEDecoder
from cascade_core.video.vae_encode import encode, encoder_latent_space, load_encoder
from cascade_core.weights.safe_io import CheckpointError
from cascade_core.weights.vae_names import wan22_encoder_name

pytestmark = pytest.mark.usefixtures("one_thread")

ENC_DIM, DEC_DIM = 4, 4  # encoder widths 4, 8, 16, 16 (160 released); decoder base width (256 released)
H, W = 32, 48  # pixels: latents 2 x 3
RELEASED = dict(base_dim=160, decoder_base_dim=256)  # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json


# ---- the test's own names of the original layout ---------------------------------------------------------------

INSIDE = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
          "conv_shortcut": "shortcut"}  # ResidualBlock.residual = [RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv]


def original_encoder_name(name: str) -> str:
    """diffusers' encoder name -> the original Wan2.2 one (vae2_2.py: WanVAE_.conv1 is the quant conv; Encoder3d
    .conv1, .downsamples[i] = Down_ResidualBlock whose .downsamples = [ResidualBlock x 2, Resample], .middle =
    [ResidualBlock, AttentionBlock, ResidualBlock], .head = [RMS_norm, SiLU, CausalConv3d])."""
    parts = name.split(".")
    if parts[0] == "quant_conv":
        return "conv1." + parts[-1]
    top = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
    if parts[1] in top:
        return f"encoder.{top[parts[1]]}.{parts[-1]}"
    if parts[1] == "mid_block":  # resnets.0 / attentions.0 / resnets.1
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[2:4])]
        rest = parts[4:]
    else:  # down_blocks.i.resnets.j.* / down_blocks.i.downsampler.*
        level = parts[2]
        if parts[3] == "downsampler":
            return f"encoder.downsamples.{level}.downsamples.2." + ".".join(parts[4:])
        index, rest = f"{level}.downsamples.{parts[4]}", parts[5:]
        return f"encoder.downsamples.{index}.{INSIDE.get(rest[0], rest[0])}." + ".".join(rest[1:])
    return f"encoder.middle.{index}.{INSIDE.get(rest[0], rest[0])}." + ".".join(rest[1:])


def is_encoder(name: str) -> bool:
    return name.startswith(("encoder.", "quant_conv."))


def tiny_wan22_vae():
    """diffusers' AutoencoderKLWan in the Wan2.2 configuration at tiny widths, every weight seeded."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=ENC_DIM, decoder_base_dim=DEC_DIM, **WAN22_CONFIG).eval()
    sd = seeded(vae.state_dict(), 5)
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"] * 0.3  # few pixels clipped
    vae.load_state_dict(sd, strict=True)
    return vae


@pytest.fixture(scope="module")
def theirs():
    return tiny_wan22_vae()


def original_layout(theirs) -> dict[str, torch.Tensor]:
    """The complete VAE under Wan2.2_VAE.pth's names: the encoder by this test's map, the decoder by test_vae22's."""
    with torch.device("meta"):
        decoder_names = {diffusers_name(k): k for k in Wan22VAEDecoder(DEC_DIM).state_dict()}
    sd = theirs.state_dict()
    return {original_encoder_name(k) if is_encoder(k) else decoder_names[k]: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, theirs):
    folder = tmp_path_factory.mktemp("wan22_vae")
    original = original_layout(theirs)
    paths = {"original .pth": save(original, folder / "Wan2.2_VAE.pth"),
             "original safetensors": save(original, folder / "wan2.2_vae.safetensors"),
             "prefixed": save({f"first_stage_model.{k}": v for k, v in original.items()}, folder / "pre.safetensors"),
             "diffusers file": save(theirs.state_dict(), folder / "diffusion_pytorch_model.safetensors")}
    theirs.save_pretrained(folder / "vae")
    paths["diffusers folder"] = str(folder / "vae")
    return paths


def their_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """diffusers' encode: the distribution's mode, normalised here, (raw - mean) / std, with the Wan2.2 statistics."""
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    mean, std = (torch.tensor(v).view(1, 48, 1, 1, 1) for v in (WAN22_LATENTS.mean, WAN22_LATENTS.std))
    return (raw - mean) / std


def pixels(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- the encoder -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original .pth", "original safetensors", "prefixed", "diffusers file",
                                    "diffusers folder"])
def test_encode_equals_diffusers_from_every_layout(files, theirs, layout):
    ours = load_encoder(files[layout], latent_space=WAN22_LATENTS)
    assert ours.encoder.conv_in.weight.shape[0] == ENC_DIM and ours.decoder is None  # the encoder half only
    assert encoder_latent_space(ours) is WAN22_LATENTS
    for frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
        x = pixels(frames, seed=frames)
        got = encode(ours, x)
        assert got.shape == (1, 48, latent_frames, H // 16, W // 16)
        expected = their_latents(theirs, x)
        assert expected.abs().max() > 0.1  # real values, not a degenerate encoder
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_one_file_encodes_and_streams_back_as_diffusers_does(files, theirs):
    """The encoder and the streamed decoder from one complete original file: diffusers' encode, then its decode."""
    x = pixels(9, seed=4)
    with torch.no_grad():
        mode = theirs.encode(x).latent_dist.mode()
        expected = theirs.decode(mode).sample.clamp(-1, 1)
    z = encode(load_encoder(files["original .pth"]), x)
    decoder = load_decoder(files["original .pth"], torch.float32, "cpu", latent_space=WAN22_LATENTS)
    assert type(decoder) is Wan22VAEDecoder
    frames = in_blocks(decoder, z, [1, 2])
    assert frames.shape == expected.shape == (1, 3, 9, H, W) and (expected.abs() < 0.99).float().mean() > 0.9
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)


def test_every_encoder_name_of_the_released_widths_maps_onto_diffusers():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        reference = AutoencoderKLWan(**RELEASED, **WAN22_CONFIG)
    names = [k for k in reference.state_dict() if is_encoder(k)]
    assert len(names) == len({original_encoder_name(k) for k in names}) == 86  # one original name each
    assert all(wan22_encoder_name(original_encoder_name(k)) == k for k in names)
    # the released layout's shapes: the 12-channel (patchified) input, base width 160, quant conv over 2 x 48
    sd = reference.state_dict()
    assert sd["encoder.conv_in.weight"].shape == (160, 12, 3, 3, 3) and sd["quant_conv.weight"].shape[:2] == (96, 96)
    assert original_encoder_name("encoder.down_blocks.2.downsampler.time_conv.weight") == \
        "encoder.downsamples.2.downsamples.2.time_conv.weight"


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_refusals_are_one_line(files, theirs, tmp_path):
    decoder_only = {k: v for k, v in original_layout(theirs).items() if not k.startswith(("encoder.", "conv1."))}
    path = save(decoder_only, tmp_path / "decoder_only.safetensors")
    with pytest.raises(CheckpointError, match=r"^decoder_only.safetensors: holds only the decoder half of the Wan2.2 "
                                              r"VAE; the encoder half \(encoder\.\*\) that encodes images"):
        load_encoder(path)
    cut = {k: v for k, v in original_layout(theirs).items() if not k.startswith("encoder.downsamples.1.")}
    with pytest.raises(CheckpointError, match=r"missing Wan2.2 VAE encoder keys: encoder.down_blocks.1.resnets.0"):
        load_encoder(save(cut, tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match=r"wan2.2_vae.safetensors decodes Wan2.2 latents \(48 channels, 16x smaller\) "
                                         r"but the model makes Wan2.1 latents"):
        load_encoder(files["original safetensors"], latent_space=WAN21_LATENTS)
    ours = load_encoder(files["diffusers file"])
    with pytest.raises(ValueError, match=re.escape("pixels must be [1, 3, T, H, W] with H and W multiples of 16, "
                                                   "got [1, 3, 1, 24, 48]")):
        encode(ours, torch.zeros(1, 3, 1, 24, 48))
