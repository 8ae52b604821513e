"""LightVAE (lightvaew2_1) and LightTAE (lighttaew2_1), lightx2v's faster decoders of the Wan2.1 latent space,
beside taew2_1 and the Wan2.1 VAE, loaded by :func:`cascade_core.video.frames.load_decoder`.

Proves, on tiny random files with the released key layouts (complete: encoder halves included; saved as
.safetensors and .pth): each file is recognised by its names, shapes (and, for the two tiny decoders, which
share names and shapes, by its name or dtype); its frames equal a decode written here from the reference
semantics (lightx2v's ``models/video_encoders/hf/wan/vae.py`` and ``hf/tae.py``, with ``need_scaled`` for
LightTAE), both all at once and block by block; every other file is refused with one line saying what it
looks like; a .pth whose pickle would run code is refused before any of it runs. The released files' exact
sizes pin the key names and shapes of the full-width layouts.
"""
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_models

from cascade_core.video.frames import load_decoder
from cascade_core.video.latents import LATENT_MEAN, LATENT_STD
from cascade_core.video.taew import LightTAEDecoder, TinyWanDecoder
from cascade_core.video.vae import WanVAEDecoder
from cascade_core.weights.safe_io import CheckpointError, looks_like, save_safetensors
from cascade_core.weights.vae_names import decoder_kind

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 2, 3  # latent height, width


def seeded(sd: dict[str, torch.Tensor], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """New values for ``sd``'s names and shapes, drawn in sorted-name order: matrices ~ N(0, 1/fan_in), norm
    gains ~ N(1, 0.1^2), biases ~ N(0, 0.05^2); stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(sd.items()):
        x = torch.randn(p.shape, generator=g)
        if p.dim() > 1:
            out[name] = x * p[0].numel() ** -0.5
        elif name.endswith("gamma"):
            out[name] = 1 + 0.1 * x
        else:
            out[name] = 0.05 * x
    return {k: v.to(dtype) for k, v in out.items()}


def lightvae_file(seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete LightVAE state dict (base width 24, fp32, the released names), random."""
    sd = seeded(tiny_models().vae_state_dict("light"), seed)
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"] * 0.3  # few pixels clipped to [-1, 1]
    return sd


def tae_file(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete narrow TAEHV-layout state dict stored as ``kind`` is released (lighttaew2_1 fp32, taew2_1 fp16)."""
    layout = tiny_models().tiny_decoder_state_dict(kind)
    sd = seeded(layout, seed)
    sd["decoder.22.weight"] = sd["decoder.22.weight"] * 0.3  # centred on the [0, 1] scale: few pixels clipped
    sd["decoder.22.bias"] = torch.full_like(sd["decoder.22.bias"], 0.5)
    return {k: v.to(layout[k].dtype) for k, v in sd.items()}


def latents(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, t, H, W, generator=torch.Generator().manual_seed(seed))


def raw(z: torch.Tensor) -> torch.Tensor:
    """Normalised (DiT) latents -> the VAE's raw latents, z * std + mean (the published Wan2.1 statistics)."""
    return z * torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1) + torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)


# ---- the reference decodes, written from the reference code's semantics ---------------------------------

def taehv_reference(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """TAEHV's decoder (lightx2v hf/tae.py:210-234, 281-304), one frame at a time as its sequential mode
    visits the graph: latents [B, 16, T, h, w] as the network reads them -> [B, 3, 4T-3, 8h, 8w] in [-1, 1]."""
    def w(name):
        return sd[name].float()

    def conv(x, i, bias=True):
        return F.conv2d(x, w(f"decoder.{i}.weight"), w(f"decoder.{i}.bias") if bias else None, padding=1)

    memory: dict[int, torch.Tensor] = {}  # per memory block, its input of the previous frame
    out: list[torch.Tensor] = []
    strides = {7: 1, 13: 2, 19: 2}  # time-growth layers

    def run(i: int, x: torch.Tensor) -> None:  # x: [B, C, H, W], one frame entering layer i
        while i < 23:
            if i in (3, 4, 5, 9, 10, 11, 15, 16, 17):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                h = torch.cat([x, past], 1)
                for j in (0, 2, 4):
                    h = F.conv2d(h, w(f"decoder.{i}.conv.{j}.weight"), w(f"decoder.{i}.conv.{j}.bias"), padding=1)
                    h = torch.relu(h) if j < 4 else h
                x = torch.relu(h + x)
            elif i in strides:
                grown = F.conv2d(x, w(f"decoder.{i}.conv.weight"))
                for part in grown.chunk(strides[i], dim=1):  # channel group s is sub-frame s
                    run(i + 1, part)
                return
            elif i == 0:
                x = torch.tanh(x / 3) * 3
            elif i in (1, 22):
                x = conv(x, i)
            elif i in (8, 14, 20):
                x = conv(x, i, bias=False)
            elif i in (6, 12, 18):
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            else:  # 2, 21
                x = torch.relu(x)
            i += 1
        out.append(x)

    for t in range(z.shape[2]):
        run(0, z[:, :, t].float())
    frames = torch.stack(out, 2).clamp(0, 1)[:, :, 3:]  # the video's first 3 network frames dropped
    return frames * 2 - 1


def wan_reference(sd: dict[str, torch.Tensor], z_raw: torch.Tensor) -> torch.Tensor:
    """The Wan2.1 VAE decoder (lightx2v hf/wan/vae.py:386-491, WanVAE_.decode 711-738) at whatever widths ``sd``
    has, over the whole video at once: each causal convolution sees zeros before the first frame; a temporal
    upsample passes the video's first frame and convolves the later ones with zeros before them (its "Rep"
    cache, vae.py:125-151). Raw latents [B, 16, T, h, w] -> [B, 3, 1+4(T-1), 8h, 8w], clamped to [-1, 1]."""
    def w(name):
        return sd[name].float()

    def causal(x, name):
        kt, kh = sd[f"{name}.weight"].shape[2:4]
        x = F.pad(x, (kh // 2, kh // 2, kh // 2, kh // 2, kt - 1, 0))
        return F.conv3d(x, w(f"{name}.weight"), w(f"{name}.bias"))

    def rms(x, name):
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * w(f"{name}.gamma")

    def residual(x, p):
        h = causal(F.silu(rms(x, f"{p}.residual.0")), f"{p}.residual.2")
        h = causal(F.silu(rms(h, f"{p}.residual.3")), f"{p}.residual.6")
        return h + (causal(x, f"{p}.shortcut") if f"{p}.shortcut.weight" in sd else x)

    def per_frame(x, fn):
        b, c, t = x.shape[:3]
        y = fn(x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def attention(y, p):  # y: [N, C, H, W], one frame
        n, c, hh, ww = y.shape
        q, k, v = F.conv2d(rms(y, f"{p}.norm"), w(f"{p}.to_qkv.weight"), w(f"{p}.to_qkv.bias")).flatten(2).chunk(3, 1)
        a = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, dim=-1)  # [N, hw, hw]
        o = (a @ v.transpose(1, 2)).transpose(1, 2).reshape(n, c, hh, ww)
        return y + F.conv2d(o, w(f"{p}.proj.weight"), w(f"{p}.proj.bias"))

    def upsample(x, p):
        if f"{p}.time_conv.weight" in sd and x.shape[2] > 1:
            pairs = causal(x[:, :, 1:], f"{p}.time_conv")  # [B, 2C, T-1, H, W]
            b, c2, t, hh, ww = pairs.shape
            doubled = pairs.view(b, 2, c2 // 2, t, hh, ww).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, hh, ww)
            x = torch.cat([x[:, :, :1], doubled], 2)
        return per_frame(x, lambda y: F.conv2d(F.interpolate(y, scale_factor=2, mode="nearest"),
                                               w(f"{p}.resample.1.weight"), w(f"{p}.resample.1.bias"), padding=1))

    x = causal(F.conv3d(z_raw.float(), w("conv2.weight"), w("conv2.bias")), "decoder.conv1")
    x = residual(x, "decoder.middle.0")
    x = per_frame(x, lambda y: attention(y, "decoder.middle.1"))
    x = residual(x, "decoder.middle.2")
    for i in range(15):
        p = f"decoder.upsamples.{i}"
        x = upsample(x, p) if f"{p}.resample.1.weight" in sd else residual(x, p)
    return causal(F.silu(rms(x, "decoder.head.0")), "decoder.head.2").clamp(-1, 1)


def in_blocks(decoder, z: torch.Tensor, sizes: list[int], frames_per_pass=1) -> torch.Tensor:
    stream, out, at = decoder.stream(frames_per_pass), [], 0
    for n in sizes:
        out.append(stream.decode(z[:, :, at:at + n]))
        assert out[-1].shape[2] == (1 + 4 * (n - 1) if at == 0 else 4 * n)
        at += n
    return torch.cat(out, 2)


def save(sd: dict[str, torch.Tensor], path) -> str:
    if str(path).endswith(".safetensors"):
        save_safetensors(sd, str(path))
    else:
        torch.save(sd, path)
    return str(path)


# ---- LightTAE and taew2_1 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lighttaew2_1.safetensors", "lighttaew2_1.pth"])
def test_lighttae_decodes_raw_latents_as_the_reference(tmp_path, name):
    sd = tae_file("lighttaew2_1")
    decoder = load_decoder(save(sd, tmp_path / name), torch.float32, "cpu")
    assert type(decoder) is LightTAEDecoder and decoder.raw_latents and decoder.widths == (16, 8, 8, 8)
    z = latents(4)
    expected = taehv_reference(sd, raw(z))  # LightTAE reads raw latents (lightx2v need_scaled)
    frames = decoder.decode(z)
    assert frames.shape == (1, 3, 13, 8 * H, 8 * W) and (expected.abs() < 0.99).float().mean() > 0.9
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=0)
    # the input scale matters: the same weights read as taew2_1 (normalised latents) give other frames
    assert (TinyWanDecoder.from_state_dict(sd).decode(z) - expected).abs().max() > 0.05


@pytest.mark.parametrize("name", ["taew2_1.safetensors", "taew2_1.pth"])
def test_taew_decodes_normalised_latents_as_the_reference(tmp_path, name):
    sd = tae_file("taew2_1")
    assert sd["decoder.1.weight"].dtype == torch.float16
    decoder = load_decoder(save(sd, tmp_path / name), torch.float32, "cpu")
    assert type(decoder) is TinyWanDecoder and not decoder.raw_latents
    z = latents(3)
    torch.testing.assert_close(decoder.decode(z), taehv_reference(sd, z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes", [[3, 3], [1, 1, 1, 1, 1, 1], [2, 1, 3], [1, 5]])
def test_lighttae_streams_block_by_block_as_one_decode(tmp_path, sizes):
    decoder = load_decoder(save(tae_file("lighttaew2_1"), tmp_path / "lighttaew2_1.safetensors"), torch.float32, "cpu")
    z = latents(sum(sizes), seed=2)
    whole = decoder.decode(z, frames_per_pass=None)
    assert (in_blocks(decoder, z, sizes) - whole).abs().max() <= 1e-5
    assert (in_blocks(decoder, z, sizes, frames_per_pass=None) - whole).abs().max() <= 1e-5


def test_lighttae_is_causal_and_its_memory_matters():
    decoder = LightTAEDecoder.from_state_dict(tae_file("lighttaew2_1"))
    z = latents(4)
    base = decoder.decode(z)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    other = decoder.decode(changed)
    assert torch.equal(other[:, :, :5], base[:, :, :5]) and (other[:, :, 5:] - base[:, :, 5:]).abs().max() > 1e-3
    stream = decoder.stream()
    stream.decode(z[:, :, :2])
    assert (stream.decode(z[:, :, 2:])[:, :, -4:] - decoder.decode(z[:, :, 2:])[:, :, -4:]).abs().max() > 1e-3


# ---- LightVAE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lightvaew2_1.safetensors", "lightvaew2_1.pth"])
def test_lightvae_decodes_as_the_reference(tmp_path, name):
    sd = lightvae_file()
    decoder = load_decoder(save(sd, tmp_path / name), torch.float32, "cpu")
    assert type(decoder) is WanVAEDecoder and decoder.dim == 24  # the Wan2.1 decoder at a quarter of 96
    z = latents(3)
    expected = wan_reference(sd, raw(z))
    frames = decoder.decode(z)
    assert frames.shape == (1, 3, 9, 8 * H, 8 * W) and (expected.abs() < 0.99).float().mean() > 0.9
    torch.testing.assert_close(frames, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("sizes", [[3, 3], [1, 2, 3], [1] * 5])
def test_lightvae_streams_block_by_block_as_one_decode(tmp_path, sizes):
    decoder = load_decoder(save(lightvae_file(), tmp_path / "lightvaew2_1.safetensors"), torch.float32, "cpu")
    z = latents(sum(sizes), seed=3)
    whole = decoder.decode(z, frames_per_pass=None)
    torch.testing.assert_close(whole, wan_reference(lightvae_file(), raw(z)), atol=2e-5, rtol=0)
    assert (in_blocks(decoder, z, sizes) - whole).abs().max() <= 1e-5


# ---- telling the files apart ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, expected", [
    ("lighttaew2_1.safetensors", "lighttaew2_1", LightTAEDecoder),
    ("taew2_1.safetensors", "taew2_1", TinyWanDecoder),
    ("preview.safetensors", "lighttaew2_1", LightTAEDecoder),  # no name: stored fp32, as lightx2v ships it
    ("preview.pth", "taew2_1", TinyWanDecoder),  # no name: stored fp16, as madebyollin ships it
    ("lighttaew2_1_fp16.safetensors", "taew2_1", LightTAEDecoder),  # the name wins over the dtype
    ("taew2_1_fp32.safetensors", "lighttaew2_1", TinyWanDecoder),
])
def test_the_two_tiny_decoders_are_told_by_name_then_dtype(tmp_path, name, kind, expected):
    sd = tae_file(kind)
    if "fp16" in name or "fp32" in name:  # a converted copy: the other dtype
        sd = {k: v.to(torch.float16 if "fp16" in name else torch.float32) for k, v in sd.items()}
    path = save(sd, tmp_path / name)
    assert type(load_decoder(path, torch.float32, "meta")) is expected
    other = TinyWanDecoder if expected is LightTAEDecoder else LightTAEDecoder
    assert type(load_decoder(path, torch.float32, "meta", kind=other.kind)) is other  # the override


def test_kinds_of_every_decoder_file(tmp_path):
    mm = tiny_models()
    full = {"light": "lightvaew2_1", "tiny": "wan2.1_vae"}
    for width, kind in full.items():
        assert decoder_kind(mm.vae_state_dict(width), "vae.safetensors") == kind
    prefixed = {f"first_stage_model.{k}": v for k, v in lightvae_file().items()}
    assert decoder_kind(prefixed, "x.safetensors") == "lightvaew2_1"
    assert decoder_kind({f"taehv_{k}": v for k, v in tae_file("taew2_1").items()}, "x.pth") == "taew2_1"
    assert decoder_kind({"alpha": torch.zeros(2)}, "x.pth") is None
    with pytest.raises(CheckpointError, match="not a dictionary of tensors"):
        decoder_kind([torch.zeros(2)], "x.pth")
    path = save(lightvae_file(), tmp_path / "lightvaew2_1.safetensors")
    with pytest.raises(CheckpointError, match="holds LightVAE"):
        load_decoder(path, torch.float32, "meta", kind="lighttaew2_1")
    with pytest.raises(ValueError, match="kind 'lightvae'"):
        load_decoder(path, torch.float32, "meta", kind="lightvae")


def test_looks_like_names_the_light_decoders():
    mm = tiny_models()
    assert "LightVAE (lightvaew2_1" in looks_like(list(lightvae_file()), lightvae_file())
    assert "full Wan2.1 video VAE" in looks_like(list(mm.vae_state_dict("tiny")), mm.vae_state_dict("tiny"))
    assert "full Wan2.1 video VAE" in looks_like(list(lightvae_file()))  # names alone cannot tell the width
    tae = tae_file("lighttaew2_1")
    assert "taew2_1" in looks_like(list(tae), tae) and "LightTAE, lighttaew2_1" in looks_like(list(tae))
    tae48 = dict(tae, **{"decoder.1.weight": torch.zeros(16, 48, 3, 3)})
    assert "taew2_2 preview decoder of Wan2.2's 48-channel latents" in looks_like(list(tae48), tae48)
    wan22 = dict(mm.vae_state_dict("tiny"), **{"decoder.conv1.weight": torch.zeros(32, 48, 3, 3, 3)})
    assert "48 latent channels" in looks_like(list(wan22), wan22)


# ---- refusals -----------------------------------------------------------------------------------------------

def other_files() -> dict[str, tuple[dict, str]]:
    mm = tiny_models()
    tae = tae_file("lighttaew2_1")
    wan22 = dict(mm.vae_state_dict("tiny"), **{"conv2.weight": torch.zeros(48, 48, 1, 1, 1),
                                                "decoder.conv1.weight": torch.zeros(32, 48, 3, 3, 3)})
    dit = {"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    umt5 = {"shared.weight": torch.zeros(10, 8), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 8)}
    return {
        "dit": (dit, "not a decoder of Wan2.1 latents (the Wan2.1 VAE, LightVAE, taew2_1 or LightTAE): it looks like "
                     "a Wan DiT"),
        "umt5": (umt5, "it looks like a T5 / umt5 text encoder"),
        "lora": ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 8)}, "it looks like a LoRA"),
        "image_vae": ({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "decoder.mid_block.resnets.0.norm1.weight":
                       torch.zeros(8)}, "it looks like a VAE: an image VAE"),
        "unrelated": ({"alpha": torch.zeros(3)}, "its keys are unlike a VAE's"),
        "taew2_2": (dict(tae, **{"decoder.1.weight": torch.zeros(16, 48, 3, 3)}),  # refused for a Wan2.1 run
                    "holds taew2_2 (the TAEHV tiny decoder of Wan2.2's 48-channel latents; reads normalised latents), "
                    "a decoder of Wan2.2 latents (48 channels); this run's latents are Wan2.1's (16 channels)"),
        "lighttaehy1_5": (dict(tae, **{"decoder.1.weight": torch.zeros(16, 32, 3, 3)}), "(taehv1_5 / lighttaehy1_5"),
        "wan22_vae": (wan22, "holds the Wan2.2 VAE (48 latent channels, 16 x 16 pixels a latent pixel), a decoder of "
                             "Wan2.2 latents (48 channels); this run's latents are Wan2.1's (16 channels)"),
        "cut_lightvae": ({k: v for k, v in lightvae_file().items() if not k.startswith("decoder.upsamples.7.")},
                         "missing decoder keys: decoder.upsamples.7"),
    }


@pytest.mark.parametrize("case", list(other_files()))
@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_other_files_are_refused_in_one_line(tmp_path, case, ext):
    sd, reason = other_files()[case]
    path = save(sd, tmp_path / f"{case}{ext}")
    for device in ("meta", "cpu"):
        with pytest.raises(CheckpointError) as err:
            load_decoder(path, torch.float32, device)
        message = str(err.value)
        assert message.startswith(f"{case}{ext}: ") and reason in message and "\n" not in message


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # what a malicious pickle would do on load


def test_a_pth_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "lighttaew2_1.pth"
    with open(path, "wb") as f:
        pickle.dump({"decoder.1.weight": torch.zeros(2), "x": _RunsCode(str(marker))}, f, protocol=2)
    torch.save({**tae_file("lighttaew2_1"), "x": _RunsCode(str(marker))}, tmp_path / "zip.pth")
    for p in (path, tmp_path / "zip.pth"):
        with pytest.raises(CheckpointError, match="refused: its pickle would import or call code"):
            load_decoder(str(p), torch.float32, "cpu")
    assert not marker.exists()


# ---- the released layouts at their full widths -------------------------------------------------------------

# Sizes of the released files (Hugging Face lightx2v/Autoencoders; lighttaew2_1.safetensors sha256 8666e769...,
# lightvaew2_1.safetensors sha256 1821a86d...): a safetensors file's size fixes every tensor's name, dtype and
# shape (its JSON header) and their total bytes, so equal sizes say the layouts written here are the released ones.
RELEASED = {"lighttaew2_1": (45_274_004, 128), "lightvaew2_1": (32_160_476, 194)}


@pytest.mark.parametrize("kind", list(RELEASED))
def test_full_width_layouts_are_the_released_files(tmp_path, kind):
    mm = tiny_models()
    sd = mm.tiny_decoder_state_dict(kind, "full") if kind == "lighttaew2_1" else mm.vae_state_dict("light")
    path = tmp_path / f"{kind}.safetensors"
    save_safetensors(sd, str(path))
    assert (os.path.getsize(path), len(sd)) == RELEASED[kind]
    decoder = load_decoder(str(path), torch.float32, "meta")
    if kind == "lighttaew2_1":
        assert type(decoder) is LightTAEDecoder and decoder.widths == (256, 128, 64, 64)
    else:
        assert type(decoder) is WanVAEDecoder and decoder.dim == 24


def test_make_tiny_models_writes_the_tiny_decoders(tmp_path):
    mm = tiny_models()
    for kind, cls in (("lighttaew2_1", LightTAEDecoder), ("taew2_1", TinyWanDecoder)):
        written = mm.write(str(tmp_path), "light", kind)
        assert os.path.dirname(written["tiny_decoder"]).endswith("vae_approx")
        assert type(load_decoder(written["tiny_decoder"], torch.float32, "cpu")) is cls
    assert load_decoder(written["vae"], torch.float32, "meta").dim == 24
