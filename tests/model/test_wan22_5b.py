"""The Wan2.2 TI2V-5B DiT in the engine: the Wan DiT with 48 latent channels in and out (Wan2.2 VAE: 16 x 16
pixels and 4 frames a latent), on a tiny random config of its architecture (CPU, fp32). P1 equals the plain
sequential loop of tests/sampling/test_loop.py over the model's forward (its own noise, drawn with the latent
space's shape); P > 1 runs through the same generate, with the plan's 48-channel latents; the size and noise
rules are the Wan2.2 latent space's."""
import pytest
import torch
from conftest import TINY_5B
from oracles import starting_noise
from test_loop import plain_sequential_loop

from cascade_core.common.latent_space import WAN21_LATENTS, WAN22_LATENTS
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.sampling.memory import estimate_run_bytes
from cascade_core.sampling.plan import plan_run

W, H = 128, 64  # pixels -> Wan2.2 latents 8 x 4 -> patches 4 x 2 = 8 tokens a frame
FPB = 2


@pytest.fixture(scope="module")
def model5b():
    return WanModel.random(TINY_5B, seed=0)


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(5, TINY_5B.text_dim, generator=torch.Generator().manual_seed(3))


def test_the_real_5b_shapes_read_back_as_the_wan22_space():
    """Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: dim 3072, ffn 14336, 24 heads, 30 layers, patch (1, 2, 2),
    48 channels in and out (no image embedding); the engine's one model class holds it, about 5.0 B params."""
    real = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
    with torch.device("meta"):
        sd = WanModel(real).state_dict()
    assert list(sd["patch_embedding.weight"].shape) == [3072, 48, 1, 2, 2]
    assert list(sd["head.head.weight"].shape) == [4 * 48, 3072]
    assert not any("img" in k for k in sd)
    read = WanConfig.from_state_dict(sd)
    assert read == real and read.num_heads == 24 and read.head_dim == 128
    assert read.latent_space is WAN22_LATENTS and WanConfig(64, 128, 4, 2).latent_space is WAN21_LATENTS
    assert 4.99e9 < sum(v.numel() for v in sd.values()) < 5.01e9


def test_other_channel_counts_have_no_latent_space():
    with pytest.raises(ValueError, match="the model has 36 latent channels; the latent spaces known are 16"):
        WanConfig(64, 128, 4, 2, in_dim=36, out_dim=36).latent_space
    with pytest.raises(ValueError, match="takes 48 latent channels and makes 16"):
        WanConfig(64, 128, 4, 2, in_dim=48, out_dim=16).latent_space


def test_p1_equals_the_plain_sequential_loop_with_48_channel_noise(model5b, embeds):
    noise = starting_noise(11, (1, 48, 3 * FPB, H // 16, W // 16))
    cfg = CascadeConfig(frames_per_block=FPB, parallel=1)
    res = generate(model5b, PromptSchedule.single(embeds), cfg, blocks=3, width=W, height=H, seed=7, noise=noise)
    want = plain_sequential_loop(model5b, embeds, 3, FPB, seed=7, channels=48, spatial=16, width=W, height=H)
    # the oracle draws its starting noise from seed 7 with the same shape; the given noise is seed 11's
    assert res.latents.shape == (1, 48, 3 * FPB, H // 16, W // 16)
    assert not torch.equal(res.latents, want)
    drawn = generate(model5b, PromptSchedule.single(embeds), cfg, blocks=3, width=W, height=H, seed=7,
                     noise=starting_noise(7, noise.shape))
    assert torch.equal(drawn.latents, want), (drawn.latents - want).abs().max()
    by_seed = generate(model5b, PromptSchedule.single(embeds), cfg, blocks=3, width=W, height=H, seed=7)
    assert torch.equal(by_seed.latents, want)


@pytest.mark.parametrize("parallel,attention", [(2, "causal"), (5, "bidirectional")])
def test_cascade_runs_on_48_channel_latents(model5b, embeds, parallel, attention):
    noise = starting_noise(5, (1, 48, 4 * FPB, H // 16, W // 16))
    cfg = CascadeConfig(frames_per_block=FPB, parallel=parallel, attention=attention)
    seen = []
    res = generate(model5b, PromptSchedule.single(embeds), cfg, blocks=4, width=W, height=H, seed=1, noise=noise,
                   on_block=lambda e: seen.append(tuple(e.latents.shape)))
    assert res.latents.shape == noise.shape and bool(torch.isfinite(res.latents).all())
    assert seen == [(1, 48, FPB, H // 16, W // 16)] * 4
    again = generate(model5b, PromptSchedule.single(embeds), cfg, blocks=4, width=W, height=H, seed=1, noise=noise)
    assert torch.equal(res.latents, again.latents)
    p1 = generate(model5b, PromptSchedule.single(embeds), CascadeConfig(frames_per_block=FPB, parallel=1),
                  blocks=4, width=W, height=H, seed=1, noise=noise)
    if attention == "causal":  # block 0 sees only itself (batched beside block 1: up to the batch's rounding)
        assert torch.allclose(res.latents[:, :, :FPB], p1.latents[:, :, :FPB], atol=1e-5, rtol=0)
    assert not torch.equal(res.latents, p1.latents)  # later blocks saw partly denoised K/V


def test_wan22_rules_for_size_noise_and_prefix(model5b, embeds):
    prompts = PromptSchedule.single(embeds)
    cfg = CascadeConfig(frames_per_block=FPB)
    with pytest.raises(ValueError, match=r"width must be a positive multiple of 32, got 48 \(16 pixels a latent "
                                         r"pixel x the patch's 2, Wan2.2 latents\)"):
        generate(model5b, prompts, cfg, blocks=1, width=48, height=H)
    with pytest.raises(ValueError, match=r"the initial noise must be \[1, 48, 2, 4, 8\], got \[1, 16, 2, 8, 16\]"):
        generate(model5b, prompts, cfg, blocks=1, width=W, height=H, noise=torch.zeros(1, 16, 2, 8, 16))
    with pytest.raises(ValueError, match=r"the prefix must be clean latents \[1, 48, F, 4, 8\]"):
        generate(model5b, prompts, cfg, blocks=1, width=W, height=H, prefix=torch.zeros(1, 16, 1, 4, 8))
    wan21 = plan_run(cfg, blocks=1, width=W, height=H)  # a plan made for Wan2.1 latents is another run's
    with pytest.raises(ValueError, match="the plan given to generate is the plan of another run"):
        generate(model5b, prompts, cfg, blocks=1, width=W, height=H, plan=wan21)
    prefix = starting_noise(2, (1, 48, 1, H // 16, W // 16))
    res = generate(model5b, prompts, cfg, blocks=1, width=W, height=H, prefix=prefix)
    assert res.latents.shape == (1, 48, 1 + FPB, H // 16, W // 16) and torch.equal(res.latents[:, :, :1], prefix)


def test_the_plan_and_memory_estimate_take_the_space():
    cfg = CascadeConfig()
    wan22 = plan_run(cfg, blocks=7, width=1280, height=704, latent_space=WAN22_LATENTS)
    assert wan22.shape == (1, 48, 21, 44, 80) and wan22.noise_shape == (1, 48, 21, 44, 80)
    assert (wan22.width, wan22.height) == (1280, 704) and wan22.layout.tokens_per_frame == 22 * 40
    wan21 = plan_run(cfg, blocks=7, width=1280, height=704)
    assert wan21.shape == (1, 16, 21, 88, 160) and wan21.latent_space is WAN21_LATENTS
    assert wan22.with_prefix(2).latent_space is WAN22_LATENTS and wan22.with_prefix(2).shape[1] == 48
    five_b = WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
    need, _ = estimate_run_bytes(wan22, five_b, torch.bfloat16, 1, 0)
    # the latents term: 3 float32 copies of [48, 21, 44, 80]; the same run on 16-channel latents of that grid
    # differs by exactly that much before the 20 % margin
    same_grid_wan21 = plan_run(cfg, blocks=7, width=640, height=352)
    assert same_grid_wan21.shape[2:] == wan22.shape[2:]
    need21, _ = estimate_run_bytes(same_grid_wan21, five_b, torch.bfloat16, 1, 0)
    latents_diff = 3 * (48 - 16) * 21 * 44 * 80 * 4
    assert abs((need - need21) - 1.2 * latents_diff) <= 1
