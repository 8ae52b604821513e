"""The Wan2.2 VAE decoder (48-channel latents, 16x spatial) and taew2_2, on tiny random weights of the real layouts.

Proves: the streamed decode, in blocks of several sizes and passes, equals diffusers' ``AutoencoderKLWan`` (the
Wan2.2-TI2V-5B configuration: ``is_residual``, ``patch_size=2``, z_dim 48, at a tiny decoder width) decoding the
same latents (fp32, 1e-5); frame counts 1 + 4(n-1) then 4n at 16x the latent size; causality and that the
memory between blocks matters; the original (``Wan2.2_VAE.pth``) and the diffusers layouts load to the same
weights, and every decoder name of the released widths maps onto diffusers' (110 tensors); taew2_2 and
lighttaew2_2 equal a decode written from TAEHV's semantics followed by the 2 x 2 pixel shuffle; the Wan2.2 latent
statistics; every file refused in one line, a decoder of the other latent space naming both spaces.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_models
from test_light_decoders import in_blocks, save, seeded, taehv_reference

from cascade_core.video.frames import load_decoder
from cascade_core.video.latents import WAN21_LATENTS
from cascade_core.video.taew import LightTAE22Decoder, TinyWan22Decoder
from cascade_core.video.vae import WanVAEDecoder
from cascade_core.video.vae22 import WAN22_LATENTS, Wan22VAEDecoder
from cascade_core.weights.safe_io import CheckpointError, looks_like
from cascade_core.weights.vae_names import decoder_kind

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 4  # decoder base width (256 released): widths 16, 16, 16, 8, 4
H, W = 2, 3  # latent height, width
WIDTHS = (16, 8, 8, 8)  # taew2_2 widths (256, 128, 64, 64 released)
RELEASED = dict(base_dim=160, decoder_base_dim=256)  # Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json
WAN22_CONFIG = dict(z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                    scale_factor_temporal=4, temperal_downsample=[False, True, True])


def latents(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 48, t, H, W, generator=torch.Generator().manual_seed(seed))


def raw(z: torch.Tensor) -> torch.Tensor:
    """z * std + mean with the Wan2.2 statistics, written out here."""
    mean, std = (torch.tensor(v).view(1, 48, 1, 1, 1) for v in (WAN22_LATENTS.mean, WAN22_LATENTS.std))
    return z * std + mean


# ---- the diffusers oracle and the test's own name map ----------------------------------------------------------

def diffusers_name(name: str) -> str:
    """Original Wan2.2 name -> diffusers' (written from the module trees of vae2_2.py and WanDecoder3d)."""
    inside = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
              "shortcut": "conv_shortcut"}
    for old, new in (("conv2.", "post_quant_conv."), ("decoder.conv1.", "decoder.conv_in."),
                     ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
                     ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
                     ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
                     ("decoder.middle.2.", "decoder.mid_block.resnets.1.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    parts = name.split(".")
    if parts[:2] == ["decoder", "upsamples"]:  # decoder.upsamples.i.upsamples.j.rest
        i, j, rest = parts[2], int(parts[4]), parts[5:]
        name = ".".join(["decoder", "up_blocks", i] + (["upsampler"] if j == 3 else ["resnets", str(j)]) + rest)
    for old, new in inside.items():
        name = name.replace(f".{old}.", f".{new}.")
    return name


def wan22_weights(dim: int = DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """The decoder half (original names), seeded; the head scaled so that few pixels are clipped."""
    with torch.device("meta"):
        names = Wan22VAEDecoder(dim).state_dict()
    sd = seeded(names, seed)
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"] * 0.3
    return sd


def wan22_file(dim: int = DIM) -> dict[str, torch.Tensor]:
    """A complete original-layout file: the decoder half plus encoder keys as Wan2.2_VAE.pth names them."""
    g = torch.Generator().manual_seed(7)
    encoder = {"encoder.conv1.weight": torch.randn(8, 12, 3, 3, 3, generator=g),
               "conv1.weight": torch.randn(96, 96, 1, 1, 1, generator=g),
               "encoder.downsamples.0.downsamples.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
               "encoder.head.2.weight": torch.randn(96, 8, 3, 3, 3, generator=g)}
    return {**encoder, **wan22_weights(dim)}


@pytest.fixture(scope="module")
def theirs():
    """diffusers' AutoencoderKLWan in the Wan2.2 configuration at DIM, with the test's decoder weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=DIM, **WAN22_CONFIG).eval()
    result = vae.load_state_dict({diffusers_name(k): v for k, v in wan22_weights().items()}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(("encoder.", "quant_conv.")) for k in result.missing_keys)
    return vae


@pytest.fixture(scope="module")
def files(tmp_path_factory, theirs):
    folder = tmp_path_factory.mktemp("wan22")
    paths = {"original": save(wan22_file(), folder / "Wan2.2_VAE.pth"),
             "diffusers": save(theirs.state_dict(), folder / "diffusion_pytorch_model.safetensors")}
    return paths


@pytest.fixture(scope="module")
def ours(files):
    return load_decoder(files["original"], torch.float32, "cpu", latent_space=WAN22_LATENTS)


@pytest.fixture(scope="module")
def expected(theirs):
    """diffusers' decode of latents(5) (it takes raw latents), [1, 3, 17, 16H, 16W]."""
    with torch.no_grad():
        frames = theirs.decode(raw(latents(5))).sample
    assert (frames.abs() < 0.99).float().mean() > 0.9  # mostly unclipped: the comparison sees real values
    return frames


# ---- the Wan2.2 VAE decoder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, per_pass", [([5], None), ([5], 1), ([1, 4], None), ([2, 3], 1), ([1] * 5, None),
                                             ([3, 2], 2)])
def test_streamed_decode_equals_diffusers(ours, expected, sizes, per_pass):
    assert type(ours) is Wan22VAEDecoder and ours.dim == DIM
    frames = in_blocks(ours, latents(5), sizes, frames_per_pass=per_pass)  # checks 1 + 4(n-1), then 4n frames
    assert frames.shape == (1, 3, 17, 16 * H, 16 * W)
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)


def test_frame_streams_decode_the_wan22_vae_one_latent_frame_a_pass(ours, expected):
    """FrameStream's default pass is the decoder's: one latent frame for the Wan2.2 VAE (a whole LongLive 2.0 block
    a pass peaked 21 GiB higher at 704 x 1280), a whole block for the Wan2.1 VAE; the frames are the same either way."""
    from cascade_core.sampling.loop import BlockEvent
    from cascade_core.video.frames import FrameStream

    stream = FrameStream(ours)
    assert stream.stream.frames_per_pass == 1
    assert FrameStream(WanVAEDecoder(dim=8)).stream.frames_per_pass is None
    z = latents(5)
    for i, (a, b) in enumerate(((0, 2), (2, 5))):
        stream.push(BlockEvent(i, z[:, :, a:b], 0, 0.0))
    torch.testing.assert_close(stream.finish(), expected, atol=1e-5, rtol=0)


def test_both_layouts_load_the_same_decoder(ours, files):
    theirs_layout = load_decoder(files["diffusers"], torch.float32, "cpu", latent_space=None)
    assert type(theirs_layout) is Wan22VAEDecoder
    a, b = ours.state_dict(), theirs_layout.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prefixed = {f"first_stage_model.{k}": v for k, v in wan22_file().items()}
    assert Wan22VAEDecoder.from_state_dict(prefixed, device="meta").dim == DIM


def test_released_widths_map_onto_diffusers_names():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        reference = AutoencoderKLWan(**RELEASED, **WAN22_CONFIG)
        decoder = Wan22VAEDecoder()
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    mine = {diffusers_name(k): v.shape for k, v in decoder.state_dict().items()}
    assert len(mine) == 110 and mine == theirs
    assert Wan22VAEDecoder.from_state_dict(reference.state_dict(), device="meta").dim == 256  # the diffusers file


def test_causal_and_its_memory_matters(ours):
    z = latents(4)
    base = ours.decode(z)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    other = ours.decode(changed)
    first = 1 + 4 * (2 - 1)  # the first frame of latent frame 2
    assert torch.equal(other[:, :, :first], base[:, :, :first])
    assert (other[:, :, first:] - base[:, :, first:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
    stream = ours.stream()
    stream.decode(z[:, :, :2])
    assert (stream.decode(z[:, :, 2:])[:, :, -4:] - ours.decode(z[:, :, 2:])[:, :, -4:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"expected Wan2.2 latents \[B, 48, T, h, w\], got \(1, 16, 1, 2, 3\)"):
        ours.stream().decode(torch.zeros(1, 16, 1, H, W))


def test_the_wan22_latent_space():
    space = WAN22_LATENTS
    assert (space.channels, space.temporal, space.spatial) == (48, 4, 16) and len(space.mean) == len(space.std) == 48
    assert (space.mean[0], space.mean[19], space.mean[47]) == (-0.2289, 0.5109, -0.0667)  # vae2_2.py:906, 925, 953
    assert (space.std[0], space.std[39], space.std[47]) == (0.4765, 1.6887, 0.7744)  # vae2_2.py:960, 999, 1007
    # Sums, plain and weighted by position, of the 48 values of vae2_2.py:904-1011: a wrong or moved value shows.
    for values, total, weighted in ((space.mean, -0.5589, -7.6248), (space.std, 32.536, 790.8891)):
        assert round(sum(values), 4) == total and round(sum(v * (i + 1) for i, v in enumerate(values)), 4) == weighted
    z = latents(2)
    torch.testing.assert_close(space.to_raw(z), raw(z))
    torch.testing.assert_close(space.to_normalized(space.to_raw(z)), z)
    assert Wan22VAEDecoder.latent_space is space and WanVAEDecoder.latent_space is WAN21_LATENTS


# ---- taew2_2 and lighttaew2_2 ----------------------------------------------------------------------------------

def tae22_file(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        names = TinyWan22Decoder(WIDTHS).state_dict()
    sd = seeded(names, seed, torch.float16)  # madebyollin ships float16
    sd["decoder.22.weight"] = sd["decoder.22.weight"] * 0.3  # centred on the [0, 1] scale: few pixels clipped
    sd["decoder.22.bias"] = torch.full_like(sd["decoder.22.bias"], 0.5)
    sd["encoder.0.weight"] = torch.zeros(64, 12, 3, 3, dtype=torch.float16)  # an encoder key, ignored
    return sd


def taew22_reference(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """TAEHV's decode (the 16-channel reference reads any widths) and then taehv.py:309-312's pixel shuffle."""
    frames = taehv_reference(sd, z)  # [B, 12, F, 8h, 8w] in [-1, 1]
    b, c, f, h, w = frames.shape
    shuffled = F.pixel_shuffle(frames.transpose(1, 2).reshape(b * f, c, h, w), 2)  # [(b f), 3, 2h, 2w]
    return shuffled.reshape(b, f, 3, 2 * h, 2 * w).transpose(1, 2)


@pytest.mark.parametrize("name, cls", [("taew2_2.pth", TinyWan22Decoder),
                                       ("lighttaew2_2.safetensors", LightTAE22Decoder)])
def test_tiny_wan22_decoders_decode_as_the_reference(tmp_path, name, cls):
    sd = tae22_file()
    decoder = load_decoder(save(sd, tmp_path / name), torch.float32, "cpu", latent_space=WAN22_LATENTS)
    assert type(decoder) is cls and decoder.widths == WIDTHS
    z = latents(4, seed=2)
    expected = taew22_reference(sd, raw(z) if cls is LightTAE22Decoder else z)
    assert expected.shape == (1, 3, 13, 16 * H, 16 * W) and (expected.abs() < 0.99).float().mean() > 0.9
    torch.testing.assert_close(decoder.decode(z), expected, atol=1e-5, rtol=0)
    for sizes in ([1, 3], [2, 2], [1, 1, 1, 1]):
        torch.testing.assert_close(in_blocks(decoder, z, sizes), expected, atol=1e-5, rtol=0)


# ---- telling the files apart, and refusals ---------------------------------------------------------------------

def test_kinds_and_looks_like(files, theirs):
    tae = tae22_file()
    diffusers_sd = theirs.state_dict()
    assert decoder_kind(wan22_file(), "x.pth") == decoder_kind(diffusers_sd, "x.safetensors") == "wan2.2_vae"
    assert decoder_kind(tae, "preview.pth") == "taew2_2" and decoder_kind(tae, "lighttaew2_2.pth") == "lighttaew2_2"
    assert "the Wan2.2 video VAE (48 latent channels, Wan layout)" in looks_like(list(wan22_file()), wan22_file())
    assert "the Wan2.2 video VAE (48 latent channels, Wan layout)" in looks_like(list(wan22_file()))  # names alone
    assert "Wan2.2 video VAE (48 latent channels) in the diffusers layout" in looks_like(list(diffusers_sd))
    assert "taew2_2 preview decoder of Wan2.2's 48-channel latents" in looks_like(list(tae), tae)
    assert "\"super\" tiny decoder" in looks_like(list(super_tae()), super_tae())


def super_tae() -> dict[str, torch.Tensor]:
    """The names of a TAEHV "super" decoder (taehv.py:217-225): a 1x1 conv first, SuperMemBlocks, 12 outputs."""
    sd = {"decoder.0.weight": torch.zeros(16, 48, 1, 1), "decoder.22.weight": torch.zeros(12, 8, 3, 3),
          "decoder.22.bias": torch.zeros(12)}
    sd.update({f"decoder.{i}.conv.0.weight": torch.zeros(32, 1, 7, 7) for i in (1, 2, 3)})
    return sd


def refused_files() -> dict[str, tuple[dict, object, str]]:
    """case -> (state dict, the run's latent space, the message's reason)."""
    cut = {k: v for k, v in wan22_file().items() if not k.startswith("decoder.upsamples.1.upsamples.3.")}
    dit = {"patch_embedding.weight": torch.zeros(4, 48, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    return {
        "wan22_vae_for_wan21": (wan22_file(), WAN21_LATENTS, "holds the Wan2.2 VAE (48 latent channels, 16 x 16 pixels "
                                "a latent pixel), a decoder of Wan2.2 latents (48 channels); this run's latents are "
                                "Wan2.1's (16 channels)"),
        "taew22_for_wan21": (tae22_file(), WAN21_LATENTS, "holds taew2_2 (the TAEHV tiny decoder of Wan2.2's "
                             "48-channel latents; reads normalised latents), a decoder of Wan2.2 latents"),
        "wan21_vae_for_wan22": (tiny_models().vae_state_dict("tiny"), WAN22_LATENTS, "holds the Wan2.1 VAE, a decoder "
                                "of Wan2.1 latents (16 channels); this run's latents are Wan2.2's (48 channels)"),
        "cut": (cut, WAN22_LATENTS, "missing decoder keys: decoder.upsamples.1.upsamples.3.resample.1.weight"),
        "taew2_2_super": (super_tae(), None, "a TAEHV \"super\" decoder (taew2_2_super / taehv1_5_super: other layers "
                          "than taew2_2's), not supported"),
        "dit": (dit, WAN22_LATENTS, "not a decoder of Wan2.2 latents (the Wan2.2 VAE, taew2_2 or lighttaew2_2): it "
                "looks like a Wan DiT"),
    }


@pytest.mark.parametrize("case", list(refused_files()))
def test_refused_in_one_line(tmp_path, case):
    sd, space, reason = refused_files()[case]
    path = save(sd, tmp_path / f"{case}.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_decoder(path, torch.float32, "meta", latent_space=space)
    message = str(err.value)
    assert message.startswith(f"{case}.safetensors: ") and reason in message and "\n" not in message, message


def test_each_vae_class_refuses_the_other_vae():
    with pytest.raises(CheckpointError, match=r"a VAE with 48 latent channels \(a Wan2.2 VAE\); this decoder needs "
                                              "the 16-channel Wan2.1 VAE"):
        WanVAEDecoder.from_state_dict(wan22_file(), device="meta")
    with pytest.raises(CheckpointError, match=r"a VAE with 16 latent channels \(a Wan2.1 VAE\); this decoder needs "
                                              "the 48-channel Wan2.2 VAE"):
        Wan22VAEDecoder.from_state_dict(tiny_models().vae_state_dict("tiny"), device="meta")
