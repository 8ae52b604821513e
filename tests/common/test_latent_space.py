"""The latent spaces, defined once in cascade_core.common.latent_space (the video side re-exports them): their
constants, the size rule a model of a space has, the space a DiT's channels tell, the one refusal of a decoder of
another space, and the plan that takes its latents' shape from the space (Wan2.1's as before)."""
import pathlib
import re

import pytest
import torch

import cascade_core
from cascade_core.common import latent_space as common
from cascade_core.common.latent_space import (
    WAN21_LATENTS,
    WAN22_LATENTS,
    LatentSpace,
    check_decoder_space,
    latent_space_of,
)
from cascade_core.sampling.config import CascadeConfig
from cascade_core.sampling.plan import check_prefix, latent_size, plan_run


def test_one_definition_reexported_by_the_video_side():
    from cascade_core.video import latents, vae22

    assert latents.LatentSpace is LatentSpace and latents.WAN21_LATENTS is WAN21_LATENTS
    assert vae22.WAN22_LATENTS is WAN22_LATENTS and latents.LATENT_MEAN is common.LATENT_MEAN
    sources = [p.read_text() for p in pathlib.Path(cascade_core.__file__).parent.rglob("*.py")]
    assert sum(len(re.findall(r"^class LatentSpace\b", s, re.M)) for s in sources) == 1
    assert sum(len(re.findall(r"^WAN2[12]_LATENTS = ", s, re.M)) for s in sources) == 2


def test_the_constants_of_the_two_spaces():
    # Wan2.1 wan/modules/vae.py (mean, std of 16 channels), vae_stride (4, 8, 8); Wan2.2 vae2_2.py, (4, 16, 16)
    assert (WAN21_LATENTS.channels, WAN21_LATENTS.temporal, WAN21_LATENTS.spatial) == (16, 4, 8)
    assert (WAN22_LATENTS.channels, WAN22_LATENTS.temporal, WAN22_LATENTS.spatial) == (48, 4, 16)
    assert (WAN21_LATENTS.mean[0], WAN21_LATENTS.mean[15], WAN21_LATENTS.std[0], WAN21_LATENTS.std[15]) == \
        (-0.7571, -0.2921, 2.8184, 1.9160)
    assert (WAN22_LATENTS.mean[0], WAN22_LATENTS.std[47]) == (-0.2289, 0.7744)
    assert all(len(s.mean) == len(s.std) == s.channels for s in (WAN21_LATENTS, WAN22_LATENTS))
    z = torch.randn(1, 48, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (WAN22_LATENTS.mean, WAN22_LATENTS.std))
    assert torch.equal(WAN22_LATENTS.to_raw(z), z * std + mean)
    with pytest.raises(ValueError, match=r"expected Wan2.1 latents \[B, 16, T, h, w\], got \(1, 48, 2, 3, 4\)"):
        WAN21_LATENTS.to_raw(z)


def test_the_size_rule_of_each_space():
    assert WAN21_LATENTS.size_multiple() == 16 and WAN22_LATENTS.size_multiple() == 32
    assert latent_size(832, 480) == (60, 104) == WAN21_LATENTS.latent_size(832, 480)
    assert latent_size(1280, 704, (1, 2, 2), WAN22_LATENTS) == (44, 80)
    with pytest.raises(ValueError, match=r"^width must be a positive multiple of 16, got 100$"):  # as before
        latent_size(100, 480)
    with pytest.raises(ValueError, match=r"^height must be a positive multiple of 32, got 496 \(16 pixels a latent "
                                         r"pixel x the patch's 2, Wan2.2 latents\)$"):
        latent_size(832, 496, (1, 2, 2), WAN22_LATENTS)


def test_channels_tell_the_space():
    assert latent_space_of(16) is WAN21_LATENTS and latent_space_of(48) is WAN22_LATENTS
    with pytest.raises(ValueError, match=r"^the checkpoint has 36 latent channels; the latent spaces known are "
                                         r"16 \(Wan2.1\), 48 \(Wan2.2\)$"):
        latent_space_of(36, "the checkpoint")


def test_a_decoder_of_the_other_space_is_refused_naming_both():
    check_decoder_space(WAN22_LATENTS, WAN22_LATENTS, "taew2_2")
    with pytest.raises(ValueError) as e:
        check_decoder_space(WAN22_LATENTS, WAN21_LATENTS, "decoder taew2_1.safetensors", "the Wan2.2 5B")
    assert str(e.value) == ("decoder taew2_1.safetensors decodes Wan2.1 latents (16 channels, 8x smaller) but the "
                            "Wan2.2 5B makes Wan2.2 latents (48 channels, 16x smaller): give a Wan2.2 VAE or decoder")


def test_the_plan_takes_its_latents_from_the_space():
    cfg = CascadeConfig()
    before = plan_run(cfg, blocks=2, width=64, height=32)
    assert before.shape == (1, 16, 6, 4, 8) and before.latent_space is WAN21_LATENTS
    assert before.fits(cfg, 2, 64, 32, (1, 2, 2)) and before.fits(cfg, 2, 64, 32, (1, 2, 2), WAN21_LATENTS)
    assert not before.fits(cfg, 2, 64, 32, (1, 2, 2), WAN22_LATENTS)
    plan = plan_run(cfg, blocks=2, width=64, height=32, latent_space=WAN22_LATENTS)
    assert plan.shape == (1, 48, 6, 2, 4) and plan.noise_shape == (1, 48, 6, 2, 4)
    assert (plan.width, plan.height) == (64, 32) and plan.layout.tokens_per_frame == 2
    assert check_prefix(torch.zeros(1, 48, 3, 2, 4), cfg, 2, 4, latent_space=WAN22_LATENTS) == 3
    with pytest.raises(ValueError, match=r"the prefix must be clean latents \[1, 48, F, 2, 4\]"):
        check_prefix(torch.zeros(1, 16, 3, 2, 4), cfg, 2, 4, latent_space=WAN22_LATENTS)
