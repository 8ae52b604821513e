"""The streaming decoders (Wan2.1 VAE, taew2_1 preview) on tiny random configs of the real architectures.

Proves: block-by-block decoding equals one decode of everything (fp32, 1e-5) for several block sizes;
the frame counts 1+4(n-1) then 4n; causality (a latent frame changes no earlier frame) and that the
memory between blocks matters; loading from .safetensors / .pt (encoder keys, prefixes ignored);
clear CheckpointErrors for wrong files; the latent normalisation; and, through reference values
computed once with the original implementations on the same seeded weights, that the architecture
and parameter names are the original ones.
"""
import pytest
import torch
from conftest import tiny_models
from test_light_decoders import seeded

from cascade_core.video.latents import LATENT_MEAN, LATENT_STD, normalized_to_raw, raw_to_normalized
from cascade_core.video.taew import TAEW2_1_WIDTHS, TinyWanDecoder
from cascade_core.video.vae import WanVAEDecoder
from cascade_core.weights.safe_io import CheckpointError, save_safetensors

DIM = 8  # Wan VAE base width (96 when released)
WIDTHS = (16, 8, 8, 8)  # taew2_1 widths (256, 128, 64, 64 when released)
H, W = 4, 6  # latent height, width


def seeded_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights for ``model``'s parameter names and shapes (:func:`test_light_decoders.seeded`)."""
    return seeded(model.state_dict(), seed)


def latents(t: int, seed: int = 1, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def vae_weights(dim: int = DIM) -> dict[str, torch.Tensor]:
    sd = seeded_weights(WanVAEDecoder(dim), seed=0)
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"] * 0.3  # few pixels clipped to [-1, 1]
    return sd


def complete_vae_weights(dim: int = DIM) -> dict[str, torch.Tensor]:
    """:func:`vae_weights` with the encoder half, as in the files people have (seeded, random)."""
    g = torch.Generator().manual_seed(5)
    encoder = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in tiny_models().vae_encoder_shapes(dim).items()}
    return {**encoder, **vae_weights(dim)}


def tiny_weights(widths=WIDTHS) -> dict[str, torch.Tensor]:
    sd = seeded_weights(TinyWanDecoder(widths), seed=0)
    # Centre the output on the [0, 1] scale so that few pixels are clipped (comparisons stay meaningful).
    sd["decoder.22.weight"] = sd["decoder.22.weight"] * 0.3
    sd["decoder.22.bias"] = torch.full_like(sd["decoder.22.bias"], 0.5)
    return sd


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    return WanVAEDecoder.from_state_dict(vae_weights())


@pytest.fixture(scope="module")
def tiny():
    return TinyWanDecoder.from_state_dict(tiny_weights())


def decode_in_blocks(decoder, z: torch.Tensor, sizes: list[int], frames_per_pass=None) -> list[torch.Tensor]:
    stream = decoder.stream(frames_per_pass)
    out, at = [], 0
    for n in sizes:
        out.append(stream.decode(z[:, :, at:at + n]))
        at += n
    assert at == z.shape[2]
    return out


def expected_counts(sizes: list[int]) -> list[int]:
    return [1 + 4 * (n - 1) if i == 0 else 4 * n for i, n in enumerate(sizes)]


# ---- values of the original implementations (Wan2.1's WanVAE_.decode, TAEHV.decode_video) ----------
# Same seeded weights as here; z = latents(3); pixels (y, x) of every channel and frame, [c][frame].

VAE_REFERENCE = {
    (5, 7): [[-0.129913, -0.038207, 0.098495, 0.144249, 0.010600, 0.014377, 0.052769, -0.093286, -0.085581],
             [0.145265, -0.080764, -0.043499, 0.132527, -0.031864, 0.086442, 0.082839, 0.202734, -0.200707],
             [-0.466809, 0.122640, -0.287827, -0.366984, -0.249988, -0.426244, -0.050900, -0.308639, -0.316053]],
    (20, 40): [[0.075533, 0.045168, 0.182944, -0.260468, 0.024910, -0.021771, 0.179723, 0.401463, -0.251398],
               [0.197668, -0.249979, -0.006896, -0.135002, 0.290585, 0.053331, 0.100947, 0.293222, -0.145755],
               [-0.381156, 0.230465, -0.316349, -0.003979, -0.366459, -0.282479, -0.286218, -0.175472, -0.180576]],
}
# Released widths (the original class has no others), latents(3, h=2, w=3).
TINY_REFERENCE = {
    (5, 7): [[-0.126858, -0.213578, -0.207336, -0.129338, 0.065308, -0.185233, -0.388306, -0.207252, -0.084146],
             [-0.165491, -0.077548, -0.123132, -0.020330, -0.199182, -0.062621, -0.107552, 0.009722, -0.223795],
             [-0.245700, -0.106755, -0.261340, -0.232014, -0.209947, -0.108450, -0.300121, -0.296479, -0.196180]],
    (12, 20): [[-0.160142, -0.171808, -0.108731, -0.021595, -0.142262, -0.194185, -0.239746, -0.103066, -0.148439],
               [0.036356, -0.129225, -0.014555, -0.061672, -0.064003, -0.106221, 0.010311, -0.034223, 0.019346],
               [-0.177320, -0.111632, -0.097065, -0.240154, -0.180949, -0.113689, -0.219272, -0.165494, -0.174212]],
}


def check_reference(frames: torch.Tensor, reference: dict) -> None:
    assert reference, "reference values missing"
    for (y, x), values in reference.items():
        torch.testing.assert_close(frames[0, :, :, y, x], torch.tensor(values), atol=1e-4, rtol=0)


# ---- Wan2.1 VAE -----------------------------------------------------------------------------------

def test_vae_matches_the_original_implementation(vae):
    check_reference(vae.decode(latents(3)), VAE_REFERENCE)


@pytest.mark.parametrize("sizes", [[3], [3, 3], [3] * 5, [1] * 5, [2] * 4, [1, 3, 2]])
def test_vae_streaming_equals_one_shot(vae, sizes):
    z = latents(sum(sizes))
    whole = vae.decode(z, frames_per_pass=None)
    blocks = decode_in_blocks(vae, z, sizes)
    assert [b.shape[2] for b in blocks] == expected_counts(sizes)
    assert all(b.shape[-2:] == (8 * H, 8 * W) and b.dtype == torch.float32 for b in blocks)
    assert (torch.cat(blocks, dim=2) - whole).abs().max() <= 1e-5
    assert (whole.abs() < 0.99).float().mean() > 0.9  # mostly unclipped: the comparison sees real values


def test_vae_pass_size_does_not_change_frames(vae):
    z = latents(5)
    whole = vae.decode(z, frames_per_pass=None)
    for per_pass in (1, 2):
        assert (vae.decode(z, frames_per_pass=per_pass) - whole).abs().max() <= 1e-5
    streamed = decode_in_blocks(vae, z, [3, 2], frames_per_pass=None)
    assert (torch.cat(streamed, dim=2) - whole).abs().max() <= 1e-5


def test_vae_is_causal_and_its_memory_matters(vae):
    z = latents(5)
    base = vae.decode(z)
    changed = z.clone()
    changed[:, :, 3] += 1.0
    other = vae.decode(changed)
    first = 1 + 4 * (3 - 1)  # first frame of latent frame 3
    assert torch.equal(other[:, :, :first], base[:, :, :first])
    assert (other[:, :, first:] - base[:, :, first:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
    # The second block decoded after the first differs from the same latents decoded as a video start.
    stream = vae.stream()
    stream.decode(z[:, :, :3])
    second = stream.decode(z[:, :, 3:])
    alone = vae.decode(z[:, :, 3:])
    assert (second[:, :, -4:] - alone[:, :, -4:]).abs().max() > 1e-3
    stream.reset()
    assert (stream.decode(z[:, :, :3]) - base[:, :, :9]).abs().max() <= 1e-5


def test_vae_stream_keeps_its_shape_until_reset(vae):
    stream = vae.stream()
    stream.decode(latents(1))
    with pytest.raises(ValueError, match="reset"):
        stream.decode(latents(1, h=2))
    stream.reset()
    assert stream.decode(latents(2, h=2)).shape == (1, 3, 5, 16, 8 * W)
    with pytest.raises(ValueError):
        stream.decode(torch.zeros(1, 48, 1, H, W))


@pytest.fixture(scope="module")
def krea_vae():
    decoder = WanVAEDecoder.from_state_dict(vae_weights())
    decoder.time_cache = "krea"
    return decoder


def test_vae_kreas_rule_differs_from_latent_frame_3_on_and_streams_like_one_decode(vae, krea_vae):
    """Krea's window (video.vae.Upsample) first differs in the cache kept after latent frame 2, so
    frames of latent frames 0-2 are the Wan2.1 rule's and every later one differs; blocks of any size
    and any pass size give one decode of everything under it."""
    z = latents(7)
    wan, krea = vae.decode(z, frames_per_pass=None), krea_vae.decode(z, frames_per_pass=None)
    first_changed = 1 + 4 * 2  # the first video frame of latent frame 3
    assert (krea[:, :, :first_changed] - wan[:, :, :first_changed]).abs().max() <= 1e-5
    assert (krea[:, :, first_changed:] - wan[:, :, first_changed:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3
    for sizes in ([3, 3, 1], [1] * 7, [2, 4, 1], [1, 3, 3]):
        for per_pass in (None, 1, 2):
            blocks = decode_in_blocks(krea_vae, z, sizes, frames_per_pass=per_pass)
            assert [b.shape[2] for b in blocks] == expected_counts(sizes)
            assert (torch.cat(blocks, dim=2) - krea).abs().max() <= 1e-5, (sizes, per_pass)


def test_vae_kreas_rule_sits_on_the_first_temporal_upsample_only(krea_vae):
    from cascade_core.video.vae import Upsample

    rules = [(m.time_conv is not None, m.time_cache) for m in krea_vae.decoder.upsamples if isinstance(m, Upsample)]
    assert rules == [(True, "krea"), (True, "wan"), (False, "wan")]
    assert WanVAEDecoder(DIM).time_cache == "wan"
    with pytest.raises(ValueError, match="one of wan, krea"):
        WanVAEDecoder(DIM).time_cache = "vae_block3"
    with pytest.raises(ValueError, match="a temporal layer"):
        Upsample(4, temporal=False, time_cache="krea")


def test_upsample_kreas_window_one_frame_a_call_with_exact_zeros():
    """The "krea" layer against Krea's cache written out frame by frame: a cache of 2 frames, zeros at
    first; the video's first frame passes; frame k is convolved over (cache, x_k), then the cache becomes
    (x_k where the cache's last frame is not 0 else 0, x_k). Exact zeros in frame 2 are kept as zeros."""
    from cascade_core.video.decode_stream import CausalState
    from cascade_core.video.vae import Upsample

    torch.manual_seed(0)
    layer, plain = Upsample(4, temporal=True, time_cache="krea"), Upsample(4, temporal=True)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 6, 3, 2)
    x[:, :2, 2, 0] = 0.0
    cache, doubled = torch.zeros(1, 4, 2, 3, 2), [x[:, :, :1]]
    for k in range(1, x.shape[2]):
        now = x[:, :, k:k + 1]
        pairs = torch.nn.functional.conv3d(torch.cat([cache, now], 2), layer.time_conv.weight, layer.time_conv.bias)
        doubled.append(pairs[:, :, 0].unflatten(1, (2, 4)).transpose(1, 2))  # [1, 4, 2, 3, 2]
        cache = torch.cat([torch.where(cache[:, :, -1:] == 0, 0, now), now], 2)
    doubled = torch.cat(doubled, 2)
    with torch.no_grad():
        expected = layer.resample(doubled.transpose(1, 2).flatten(0, 1)).unflatten(0, (1, -1)).transpose(1, 2)
        for sizes in ([6], [1, 5], [2, 1, 3], [1] * 6):
            state, parts, at = CausalState(), [], 0
            for n in sizes:
                parts.append(layer(x[:, :, at:at + n].movedim(1, -1), state).movedim(-1, 1))  # layers: [B,T,H,W,C]
                state.started, at = True, at + n
            assert (torch.cat(parts, 2) - expected).abs().max() <= 1e-6, sizes
        plain_out = plain(x.movedim(1, -1), CausalState()).movedim(-1, 1)
    # frames from latent frame 3 differ from the Wan2.1 window (2 output frames each, after the first)
    assert (plain_out[:, :, :5] - expected[:, :, :5]).abs().max() <= 1e-6
    assert (plain_out[:, :, 5:] - expected[:, :, 5:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3
    # the zeros of frame 2 are tested exactly: made 1e-30, frame 4's window sees frame 3 there instead of 0
    nudged = x.clone()
    nudged[:, :2, 2, 0] = 1e-30
    with torch.no_grad():
        moved = (layer(nudged.movedim(1, -1), CausalState()).movedim(-1, 1) - expected).abs().amax(dim=(0, 1, 3, 4))
    assert moved[:7].max() <= 1e-6 and moved[7:9].min() > 1e-3 and moved[9:].max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_low_precision_runs_close_to_fp32(vae, dtype):
    z = latents(2)
    reference = vae.decode(z)
    half = WanVAEDecoder.from_state_dict(vae_weights(), dtype=dtype)
    assert half.dtype == dtype
    out = half.decode(z)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert (out - reference).abs().max() < 0.05


def test_vae_loads_files_and_ignores_the_encoder(tmp_path, vae):
    full = complete_vae_weights()
    z = latents(4)
    expected = vae.decode(z)
    paths = [tmp_path / "wan_2.1_vae.safetensors", tmp_path / "Wan2.1_VAE.pth", tmp_path / "prefixed.safetensors"]
    save_safetensors(full, str(paths[0]))
    torch.save(full, paths[1])
    save_safetensors({f"first_stage_model.{k}": v for k, v in full.items()}, str(paths[2]))
    for path in paths:
        loaded = WanVAEDecoder.from_file(path)
        assert loaded.dim == DIM
        assert torch.equal(loaded.decode(z), expected), path.name


@pytest.mark.parametrize("width, dim", [("tiny", 8), ("full", 96)])
def test_fixture_vae_is_a_complete_wan21_vae(width, dim):
    # diffusers' own converter of the released Wan2.1 VAE names, then a strict load: every encoder and
    # decoder key of the real layout is there, with its shape, and nothing else.
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = tiny_models().vae_state_dict(width)
    with torch.device("meta"):
        reference = AutoencoderKLWan(base_dim=dim)
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)), strict=True, assign=True)
    assert WanVAEDecoder.from_state_dict(sd, device="meta").dim == dim  # and our decoder takes it


def wrong_vae_files():
    good = vae_weights()
    wan22 = dict(good)
    wan22["conv2.weight"] = torch.randn(48, 48, 1, 1, 1)
    wan22["decoder.conv1.weight"] = torch.randn(4 * DIM, 48, 3, 3, 3)
    missing = {k: v for k, v in good.items() if not k.startswith("decoder.upsamples.7.")}
    narrow = dict(good)
    narrow["decoder.head.2.weight"] = torch.randn(3, DIM + 1, 3, 3, 3)
    return {
        "unrelated": ({"alpha": torch.zeros(3), "beta": torch.ones(2, 2)}, "keys are unlike"),
        "dit": ({"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)},
                "it looks like a Wan DiT"),
        "sd_vae": ({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
                    "decoder.mid_block.resnets.0.norm1.weight": torch.zeros(8),
                    "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3),
                    "encoder.mid_block.attentions.0.to_q.weight": torch.zeros(8, 8)}, "an image VAE"),
        "sd_vae_original": ({"first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
                             "first_stage_model.decoder.mid.block_1.norm1.weight": torch.zeros(8)}, "an image VAE"),
        "text_encoder": ({"shared.weight": torch.zeros(10, 8),
                          "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 8)}, "text encoder"),
        "wan22": (wan22, "48 latent channels"),
        "missing": (missing, "decoder.upsamples.7.resample.1.weight"),
        "narrow": (narrow, "decoder.head.2.weight"),
        "tiny": (tiny_weights(), "tiny"),
    }


@pytest.mark.parametrize("case", list(wrong_vae_files()))
def test_vae_rejects_other_files(tmp_path, case):
    sd, reason = wrong_vae_files()[case]
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        WanVAEDecoder.from_file(path)
    assert err.value.path == str(path) and path.name in str(err.value)
    assert reason in str(err.value)


def test_vae_loads_the_diffusers_layout_like_diffusers_decodes(tmp_path):
    # A tiny diffusers AutoencoderKLWan saved as diffusers saves it: its folder and its safetensors file
    # load into our decoder, whose frames are diffusers' own decode of the same latents.
    from diffusers import AutoencoderKLWan

    from cascade_core.video.frames import load_decoder

    torch.manual_seed(0)
    theirs = AutoencoderKLWan(base_dim=DIM).eval()
    theirs.save_pretrained(tmp_path / "vae")
    z = latents(3)
    with torch.no_grad():
        expected = theirs.decode(normalized_to_raw(z)).sample  # diffusers takes raw latents
    assert (expected.abs() < 0.99).float().mean() > 0.9  # mostly unclipped: the comparison sees real values
    sources = [tmp_path / "vae", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"]
    prefixed = tmp_path / "prefixed.safetensors"
    save_safetensors({f"vae.{k}": v for k, v in theirs.state_dict().items()}, str(prefixed))
    for source in sources + [prefixed]:
        ours = WanVAEDecoder.from_file(source)
        assert ours.dim == DIM
        torch.testing.assert_close(ours.decode(z), expected, atol=1e-5, rtol=0)
    assert isinstance(load_decoder(str(sources[0]), torch.float32, "cpu"), WanVAEDecoder)


def test_vae_rejects_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="list.pt: not a dictionary of tensors"):
        WanVAEDecoder.from_file(path)


def test_latent_normalisation():
    z = latents(3)
    raw = normalized_to_raw(z)
    torch.testing.assert_close(raw_to_normalized(raw), z, atol=1e-6, rtol=0)
    zero, one = torch.zeros(1, 16, 1, 1, 1), torch.ones(1, 16, 1, 1, 1)
    assert torch.allclose(normalized_to_raw(zero).flatten(), torch.tensor(LATENT_MEAN))
    assert torch.allclose(normalized_to_raw(one).flatten(), torch.tensor(LATENT_MEAN) + torch.tensor(LATENT_STD))
    assert normalized_to_raw(z.half()).dtype == torch.float16
    with pytest.raises(ValueError):
        normalized_to_raw(torch.zeros(1, 4, 1, 2, 2))


# ---- taew2_1 preview decoder -------------------------------------------------------------------

def test_tiny_matches_the_original_implementation():
    decoder = TinyWanDecoder.from_state_dict(tiny_weights(TAEW2_1_WIDTHS))
    check_reference(decoder.decode(latents(3, h=2, w=3)), TINY_REFERENCE)


@pytest.mark.parametrize("sizes", [[3], [3, 3, 3], [1] * 4, [2, 1, 3]])
def test_tiny_streaming_equals_one_shot(tiny, sizes):
    z = latents(sum(sizes))
    whole = tiny.decode(z, frames_per_pass=None)
    blocks = decode_in_blocks(tiny, z, sizes, frames_per_pass=1)
    assert [b.shape[2] for b in blocks] == expected_counts(sizes)
    assert all(b.shape[-2:] == (8 * H, 8 * W) for b in blocks)
    assert (torch.cat(blocks, dim=2) - whole).abs().max() <= 1e-5
    assert (whole.abs() < 0.99).float().mean() > 0.9


def test_tiny_is_causal_and_its_memory_matters(tiny):
    z = latents(4)
    base = tiny.decode(z)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    other = tiny.decode(changed)
    first = 1 + 4 * (2 - 1)
    assert torch.equal(other[:, :, :first], base[:, :, :first])
    assert (other[:, :, first:] - base[:, :, first:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
    stream = tiny.stream()
    stream.decode(z[:, :, :2])
    second = stream.decode(z[:, :, 2:])
    alone = tiny.decode(z[:, :, 2:])
    assert (second[:, :, -4:] - alone[:, :, -4:]).abs().max() > 1e-3


def test_tiny_loads_files_and_keeps_the_last_step_of_a_wide_time_layer(tmp_path, tiny):
    sd = tiny_weights()
    z = latents(3)
    expected = tiny.decode(z)
    full = {**sd, "encoder.0.weight": torch.randn(64, 3, 3, 3)}
    save_safetensors(full, str(tmp_path / "taew2_1.safetensors"))
    torch.save(full, tmp_path / "taew2_1.pth")
    save_safetensors({f"taehv_{k}": v for k, v in sd.items()}, str(tmp_path / "comfy.safetensors"))
    for name in ("taew2_1.safetensors", "taew2_1.pth", "comfy.safetensors"):
        loaded = TinyWanDecoder.from_file(tmp_path / name)
        assert loaded.widths == WIDTHS
        assert torch.equal(loaded.decode(z), expected), name
    wide = dict(sd)
    wide["decoder.7.conv.weight"] = torch.cat([torch.randn_like(sd["decoder.7.conv.weight"]), sd["decoder.7.conv.weight"]])
    assert torch.equal(TinyWanDecoder.from_state_dict(wide).decode(z), expected)


@pytest.mark.parametrize("case", ["full_vae", "wan22", "unrelated"])
def test_tiny_rejects_other_files(tmp_path, case):
    if case == "full_vae":
        sd, reason = complete_vae_weights(), "it looks like a VAE: the full Wan2.1 video VAE"
    elif case == "wan22":
        sd = tiny_weights()
        sd["decoder.1.weight"] = torch.randn(WIDTHS[0], 48, 3, 3)
        reason = "48-channel"
    else:
        sd, reason = {"alpha": torch.zeros(3)}, "keys are unlike"
    path = tmp_path / f"{case}.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        TinyWanDecoder.from_file(path)
    assert path.name in str(err.value) and reason in str(err.value)


# ---- CUDA: the decode runs on its own stream, after the caller's work --------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, weights", [(WanVAEDecoder, vae_weights), (TinyWanDecoder, tiny_weights)])
def test_cuda_stream_decode_waits_for_the_latents(cls, weights):
    z = latents(6)
    expected = torch.cat(decode_in_blocks(cls.from_state_dict(weights()), z, [3, 3]), dim=2)
    decoder = cls.from_state_dict(weights(), dtype=torch.float16, device="cuda")
    stream = decoder.stream()
    handles = []
    for block in (z[:, :, :3], z[:, :, 3:]):
        slow = torch.zeros(4096, 4096, device="cuda")
        for _ in range(20):  # keep the default stream busy before the latents exist
            slow = slow @ slow
        block = block.cuda() + slow[0, 0]  # produced on the default stream, last
        handles.append(stream.decode_async(block))
        del block  # freed at once: the decode must still read the right values
    frames = torch.cat([h.result() for h in handles], dim=2)
    assert frames.device.type == "cuda" and frames.dtype == torch.float32
    assert (frames.cpu() - expected).abs().max() < 0.05
    stream.synchronize()
    assert all(h.ready() for h in handles)


def test_latent_rgb_preview_streams_like_a_decoder():
    from cascade_core.sampling.loop import BlockEvent
    from cascade_core.video.frames import FrameStream, LatentRGBDecoder

    g = torch.Generator().manual_seed(0)
    factors = torch.randn(16, 3, generator=g) * 0.02  # small enough that no pixel reaches the clamp at +-1
    dec = LatentRGBDecoder(factors, torch.zeros(3))
    z = torch.randn(1, 16, 6, 4, 5, generator=g)
    seen = []
    frames = FrameStream(dec, on_frames=lambda e: seen.append((e.block, e.first_frame, e.frames.shape[2])))
    for b in range(2):
        frames.push(BlockEvent(b, z[:, :, 3 * b:3 * b + 3], b, 0.0))
    video = frames.finish()
    assert seen == [(0, 0, 9), (1, 9, 12)]  # 1 + 4*2 frames, then 4*3, numbered as one video
    assert video.shape == (1, 3, 21, 32, 40) and video.abs().max() <= 1
    # the colour of a latent pixel is its channels times the factors (bilinear upscaling keeps the mean)
    expected = torch.einsum("c,cr->r", z[0, :, 0].mean((1, 2)), factors)
    assert torch.allclose(video[0, :, 0].mean((1, 2)), expected.clamp(-1, 1), atol=1e-4)


# ---- FrameStream: frames handed out in order by a writer thread --------------------------------------

def push_blocks(frames, z: torch.Tensor, sizes: list[int]) -> None:
    from cascade_core.sampling.loop import BlockEvent

    at = 0
    for b, n in enumerate(sizes):
        frames.push(BlockEvent(b, z[:, :, at:at + n], b, 0.0))
        at += n


def test_frame_stream_hands_out_a_direct_decode_in_order_on_its_own_thread(vae):
    import threading

    from cascade_core.video.frames import FrameStream

    z = latents(7)
    whole = vae.decode(z, frames_per_pass=None)  # the oracle: one decode of the whole video
    before = set(threading.enumerate())
    seen = []  # (block, first frame, frames, thread)
    frames = FrameStream(vae, on_frames=lambda e: seen.append((e.block, e.first_frame, e.frames,
                                                                threading.get_ident())))
    push_blocks(frames, z, [3, 2, 2])
    video = frames.finish()
    assert [(b, f, x.shape[2]) for b, f, x, _ in seen] == [(0, 0, 9), (1, 9, 8), (2, 17, 8)]
    assert all(x.device.type == "cpu" for _, _, x, _ in seen)
    assert (torch.cat([x for _, _, x, _ in seen], 2) - whole).abs().max() <= 1e-5
    assert torch.equal(video, torch.cat([x for _, _, x, _ in seen], 2))
    writers = {t for *_, t in seen}
    assert len(writers) == 1 and threading.get_ident() not in writers  # encoding is off the caller's thread
    assert set(threading.enumerate()) == before  # the writer thread has ended


def test_frame_stream_raises_a_writer_error_on_the_callers_thread_and_keeps_raising_it(vae):
    import threading

    from cascade_core.video.frames import FrameStream

    where, handed = [], []

    def on_frames(event):
        where.append(threading.get_ident())
        handed.append(event.block)
        if event.block == 1:
            raise OSError("disk full")

    before = set(threading.enumerate())
    frames = FrameStream(vae, on_frames=on_frames, keep=False)
    push_blocks(frames, latents(6), [3, 3])
    with pytest.raises(OSError, match="disk full"):
        frames.poll(wait=True)
    assert where and threading.get_ident() not in where  # raised on the writer thread, surfaced here
    with pytest.raises(OSError, match="disk full"):  # not swallowed: every later call says so
        push_blocks(frames, latents(3, seed=2), [3])
    with pytest.raises(OSError, match="disk full"):
        frames.finish()
    assert handed == [0, 1]  # nothing handed out after the error
    assert set(threading.enumerate()) == before


def test_frame_stream_close_hands_out_what_was_pushed_ends_the_thread_and_does_not_raise(vae, caplog):
    import threading
    import time

    from cascade_core.video.frames import FrameStream

    handed = []

    def slow(event):  # a writer that lags behind the loop
        time.sleep(0.05)
        handed.append(event.first_frame)
        if event.block == 2:
            raise OSError("disk full")

    before = set(threading.enumerate())
    frames = FrameStream(vae, on_frames=slow, keep=False)
    push_blocks(frames, latents(5), [1, 2, 2])
    with caplog.at_level("WARNING", logger="block_cascade"):
        frames.close()
    assert handed == [0, 1, 9] and "disk full" in caplog.text
    assert set(threading.enumerate()) == before


def test_vae_decodes_with_autograd_on():
    """The norms write into views of preallocated tensors, which autograd refuses: a decode pass
    called directly, on a fresh module whose weights require gradients, runs as inference."""
    from cascade_core.video.decode_stream import CausalState

    decoder = WanVAEDecoder(dim=8)
    assert next(decoder.parameters()).requires_grad
    frames = decoder.decode_pass(torch.randn(1, 16, 2, 4, 4), CausalState())
    assert frames.shape == (1, 3, 5, 32, 32) and not frames.requires_grad
