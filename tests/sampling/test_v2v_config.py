"""The noise scale StreamDiffusionV2's video-to-video takes (cascade_core/sampling/v2v_config.py), on CPU.

What this proves: the range is the one where every later chunk's first timestep int(1000 s_k) - 100 stays a
timestep (above 0) whatever the motion, s_k the adaptive scale (s_0 - 0.1 d) 0.9 + 0.1 s_{k-1}
(streamv2v/inference.py:55-56 of chenfengxu714/StreamDiffusionV2@c5a0f20): an oracle written here in exact
fractions (full motion every chunk is the lowest path) agrees with the rule on every thousandth in (0, 1], so the
smallest noise scale is 0.201; the engine at 0.201 on a video of full motion reaches first timestep 1 and no
lower; below it, the settings, the engine and the CLI's --noise-scale refuse it in one line naming noise_scale
and 0.201 (the node: tests/nodes/test_nodes_v2v_live.py).
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import TINY

from cascade_core.model.dit import WanModel
from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import (
    NOISE_SCALE_MIN,
    V2VConfig,
    first_timestep,
    noise_scale_reaches_a_timestep,
    sdv2_steps,
    video_chunks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def lowest_first_timestep_exact(s0: Fraction, chunks: int = 40) -> int:
    """The oracle: the lowest later-chunk first timestep floor(1000 s_k) - 100 over ``chunks`` chunks, in exact
    arithmetic, along the lowest path (d = 1 every chunk: s_k grows with s_{k-1} and falls with d)."""
    scale, lowest = s0, None
    for _ in range(chunks):
        scale = (s0 - Fraction(1, 10)) * Fraction(9, 10) + scale / 10
        t = (1000 * scale).__floor__() - 100
        lowest = t if lowest is None else min(lowest, t)
    return lowest


def test_the_range_is_where_every_later_first_timestep_stays_above_0():
    for i in range(1, 1001):
        expect = lowest_first_timestep_exact(Fraction(i, 1000)) > 0
        assert noise_scale_reaches_a_timestep(i / 1000) is expect, i
    assert NOISE_SCALE_MIN == 0.201 and noise_scale_reaches_a_timestep(0.201)
    assert not noise_scale_reaches_a_timestep(0.2009999) and not noise_scale_reaches_a_timestep(float("nan"))
    assert not noise_scale_reaches_a_timestep(0.0) and not noise_scale_reaches_a_timestep(1.0001)
    # inside the range nothing changes: SDv2's default 0.7 still reaches 500 at full motion (the list's second)
    assert first_timestep(0.61) == 510 and lowest_first_timestep_exact(Fraction(7, 10)) == 500


@pytest.mark.parametrize("scale", [0.2, 0.2009, 0.1, 0.05, 0.01, 0.0, -0.5, 1.5, float("nan")])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_noise_scale_out_of_range_is_refused_in_one_line_naming_the_smallest(scale, steps):
    with pytest.raises(ValueError) as e:
        V2VConfig(steps=sdv2_steps(steps), noise_scale=scale).validate()
    text = str(e.value)
    assert "\n" not in text and "noise_scale" in text and "noise scale" in text and "0.201..1" in text, text
    assert f"got {scale}" in text


def full_motion_video(latent_frames: int):
    """Raw latents [1, 16, T, 4, 8] and pixels [1, 3, 1 + 4(T - 1), 32, 64] alternating -1 and 1: d = 1."""
    frames = 1 + 4 * (latent_frames - 1)
    signs = torch.tensor([(-1.0) ** f for f in range(frames)]).view(1, 1, frames, 1, 1)
    latents = torch.randn(1, 16, latent_frames, 4, 8, generator=torch.Generator().manual_seed(0))
    return latents, signs.expand(1, 3, frames, 32, 64).contiguous()


def test_the_engine_at_the_smallest_scale_reaches_timestep_1_and_refuses_below_it():
    model = WanModel.random(TINY, seed=0)
    prompts = PromptSchedule.single(torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(1)))
    latents, pixels = full_motion_video(7)
    res = video_to_video(model, prompts, V2VConfig(noise_scale=NOISE_SCALE_MIN), video_chunks(latents, pixels),
                         chunks=6)
    assert res.first_timesteps == (700, 11, 2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"noise_scale.*0\.201\.\.1, got 0\.2:"):
        video_to_video(model, prompts, V2VConfig(noise_scale=0.2), video_chunks(latents, pixels), chunks=6)


def test_the_clis_noise_scale_is_refused_by_the_same_rule(tmp_path, capsys):
    from cascade_core.cli.command import main
    from cascade_core.weights.safe_io import save_safetensors

    save_safetensors({"latents": torch.zeros(1, 16, 3, 4, 8)}, str(tmp_path / "lat.safetensors"))
    cpu = ["--quiet", "--dtype", "fp32", "--device", "cpu", "--compile", "off"]
    for scale in ("0.2", "0.05"):
        assert main(["generate", "--video-in", str(tmp_path / "lat.safetensors"), "--noise-scale", scale, *cpu]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "noise_scale" in err[0] and "0.201..1" in err[0] and f"got {scale}" in err[0], err
