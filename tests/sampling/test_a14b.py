"""Causal Wan2.2-A14B (family causal-wan2.2-a14b, two experts) on tiny random configs of the real architecture
(CPU, fp32): P1 equals FastVideo's sampling loop written here from the reference note
(docs/references/causal_wan22_a14b.md), the expert switch happens at the stated step, P > 1 runs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from oracles import noise_after_step, noise_levels, raw_noise_levels, renoised, starting_noise, x0_from_velocity

from cascade_core.model.experts import ExpertPair
from cascade_core.sampling.families import family_config, guess_family
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.sampling.schedule import CascadeSchedule

W, H = 64, 32  # latent 4 x 8 -> 8 tokens a frame
STEPS = (1000, 850, 700, 550, 350, 275, 200, 125)
SHIFT, BOUNDARY = 12.0, 875


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny forwards: one thread is faster on a busy machine."""


def family(**given):
    return family_config("causal-wan2.2-a14b", frames_per_block=2, **given)  # blocks of 2: small tests


def reference_loop(high, low, embeds, sizes, seed, prefix=None, context_noise=0.0):
    """FastVideo's causal_denoising.py (the note's rules), with naive growing caches, one per expert: a step at
    t >= 875 runs the high expert on its cache and predicts x at the boundary (re-noised with alpha/beta towards
    the next high step; the last high step hands it on as it is), a step below runs the low expert and predicts
    x0; the clean pass (and a prefix) runs both experts, each into its own cache; the high expert's text K/V
    serve both. Noise by the documented rules (tests/oracles.py)."""
    ts, sigmas = noise_levels(STEPS, SHIFT)
    sigma_b = raw_noise_levels([BOUNDARY], SHIFT)[1][0]
    n_high = sum(1 for t in ts if t >= BOUNDARY)
    text = high.encode_prompt(embeds)
    models = {"high": high, "low": low}
    committed = {e: [[] for _ in range(TINY.num_layers)] for e in models}

    class Growing:
        def __init__(self, expert):
            self.expert, self.last = expert, {}

        def __call__(self, layer, q, k, v):
            ks = torch.cat([c[0] for c in committed[self.expert][layer]] + [k[0]])
            vs = torch.cat([c[1] for c in committed[self.expert][layer]] + [v[0]])
            self.last[layer] = (k[0], v[0])
            tr = lambda z: z.unsqueeze(0).transpose(1, 2)  # noqa: E731
            return F.scaled_dot_product_attention(tr(q[0]), tr(ks), tr(vs)).transpose(1, 2)

    def clean(x, start):
        for e in ("low", "high"):
            ctx = Growing(e)
            models[e](x, torch.full((1, x.shape[2]), float(context_noise)), [start], [text], ctx)
            for layer in range(TINY.num_layers):
                committed[e][layer].append(ctx.last[layer])

    lead = 0 if prefix is None else prefix.shape[2]
    if prefix is not None:
        clean(prefix, 0)
    noise = starting_noise(seed, (1, 16, sum(sizes), H // 8, W // 8))
    out, start = [], lead
    for b, size in enumerate(sizes):
        x = noise[:, :, start - lead:start - lead + size]
        for j in range(len(STEPS)):
            expert = "high" if ts[j] >= BOUNDARY else "low"
            v = models[expert](x, torch.full((1, size), float(ts[j])), [start], [text], Growing(expert))
            if expert == "high":
                pred = (x.double() - (float(sigmas[j].double()) - float(sigma_b.double())) * v.double()).float()
            else:
                pred = x0_from_velocity(x, v, sigmas[j])
            if j + 1 == len(STEPS):
                x = pred
                break
            eps = noise_after_step(seed, b, j, pred.shape)
            if j < n_high - 1:
                alpha = (1 - sigmas[j + 1]) / (1 - sigma_b)
                beta = torch.sqrt(sigmas[j + 1] ** 2 - (alpha * sigma_b) ** 2)
                x = (alpha * pred + beta * eps).float()
            elif j == n_high - 1:
                x = pred
            else:
                x = renoised(pred, sigmas[j + 1], eps)
        clean(x, start)
        out.append(x)
        start += size
    return torch.cat(out, 2)


def logged(pair, run):
    """(run(), [(expert, timestep of its first segment) of each expert forward run() made])."""
    log = []
    for name in ("high", "low"):
        expert = pair.expert(name)
        real = expert.forward

        def forward(x, t, *a, _real=real, _name=name):
            log.append((_name, round(float(t[0].max()), 1)))
            return _real(x, t, *a)
        expert.forward = forward
    try:
        return run(), log
    finally:
        for name in ("high", "low"):
            del pair.expert(name).forward


def test_family_settings_are_fastvideos():
    cfg = family_config("causal-wan2.2-a14b")
    assert (cfg.steps, cfg.shift, cfg.warp, cfg.frames_per_block, cfg.independent_first_frame, cfg.window,
            cfg.context_noise) == (STEPS, SHIFT, True, 3, True, None, 0.0)
    assert guess_family("hub/FastVideo/CausalWan2.2-I2V-A14B-Preview-Diffusers")[0] == "causal-wan2.2-a14b"
    assert guess_family("models/SFWan2.2-T2V-A14B-Diffusers/transformer")[0] == "causal-wan2.2-a14b"
    # the warped list: four steps at or above the boundary, four below
    assert [round(float(t), 1) for t in cfg.flows()[1].timesteps] == [1000.0, 985.5, 965.5, 936.2, 866.0, 819.9,
                                                                      750.0, 631.6]


def test_p1_equals_the_reference_loop_and_switches_at_step_4(experts, prompt):
    pair = ExpertPair(*experts)
    res, log = logged(pair, lambda: generate(pair, PromptSchedule.single(prompt), family(), blocks=3, width=W,
                                             height=H, seed=7))
    expected = reference_loop(*experts, prompt, [1, 2, 2], seed=7)
    assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()
    block = [("high", 1000.0), ("high", 985.5), ("high", 965.5), ("high", 936.2), ("low", 866.0), ("low", 819.9),
             ("low", 750.0), ("low", 631.6), ("high", 0.0), ("low", 0.0)]  # 4 + 4 steps, the clean pass by both
    assert log == block * 3
    assert pair.forwards == {"high": 15, "low": 15} and res.forwards == 30


def test_a_start_image_is_written_by_both_experts(experts, prompt):
    """The reference's image-to-video: the image latent through both experts at t = 0, then blocks from frame 1."""
    pair = ExpertPair(*experts)
    image = torch.randn(1, 16, 1, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    cfg = family(independent_first_frame=False)
    res = generate(pair, PromptSchedule.single(prompt), cfg, blocks=2, width=W, height=H, seed=5, prefix=image,
                   include_prefix=False)
    expected = reference_loop(*experts, prompt, [2, 2], seed=5, prefix=image)
    assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()
    assert pair.forwards == {"high": 1 + 2 * 5, "low": 1 + 2 * 5} and res.forwards == 22


def expected_forwards(cfg, blocks):
    """Forwards per expert of a cascade: per tick and group of equal-size blocks, an expert runs once when one of
    its segments is a denoising step on its side of the boundary or a clean pass."""
    ts = [float(t) for t in cfg.flows()[1].timesteps]
    sched = CascadeSchedule(blocks, len(ts), cfg.parallel, cfg.fold_clean)
    size = lambda b: 1 if b == 0 and cfg.independent_first_frame else cfg.frames_per_block  # noqa: E731
    count = {"high": 0, "low": 0}
    for tick in sched.ticks():
        for s in {size(b) for b, _ in tick.pairs}:
            sides = set()
            for b, stage in tick.pairs:
                if size(b) == s:
                    sides |= {"high", "low"} if stage == len(ts) else {"high" if ts[stage] >= BOUNDARY else "low"}
            for e in sides:
                count[e] += 1
    return count


@pytest.fixture(scope="module")
def p1_video(experts, prompt):
    return generate(ExpertPair(*experts), PromptSchedule.single(prompt), family(), blocks=3, width=W, height=H,
                    seed=9)


@pytest.mark.parametrize("parallel", [2, 5, 9])
def test_p_above_1_runs_deterministically_with_the_forwards_each_expert_owes(experts, prompt, p1_video, parallel):
    pair, ps, p1 = ExpertPair(*experts), PromptSchedule.single(prompt), p1_video
    cfg = family(parallel=parallel)
    a = generate(pair, ps, cfg, blocks=3, width=W, height=H, seed=9)
    assert pair.forwards == expected_forwards(cfg, 3) and a.forwards == sum(pair.forwards.values())
    if parallel == 5:
        b = generate(pair, ps, cfg, blocks=3, width=W, height=H, seed=9)
        assert torch.equal(a.latents, b.latents)
    assert torch.isfinite(a.latents).all()
    assert torch.equal(a.latents[:, :, :1], p1.latents[:, :, :1])  # block 0 never sees a noisy predecessor
    dev = float((a.latents - p1.latents).norm() / p1.latents.norm())
    assert 0 < dev < 0.5  # cascading is an approximation, a bounded one


def test_fold_clean_gives_the_p1_result_with_fewer_high_forwards(experts, prompt):
    pair = ExpertPair(*experts)
    ps = PromptSchedule.single(prompt)
    p1 = generate(pair, ps, family(), blocks=4, width=W, height=H, seed=2)
    pair.forwards = {"high": 0, "low": 0}
    folded = generate(pair, ps, family(fold_clean=True), blocks=4, width=W, height=H, seed=2)
    assert (folded.latents - p1.latents).abs().max() <= 1e-5
    # blocks 1..3 share a size: the clean passes of 1 and 2 ride in the next block's first (high) forward
    assert pair.forwards == {"high": 4 * 5 - 2, "low": 4 * 5} == expected_forwards(family(fold_clean=True), 4)


@pytest.mark.parametrize("given", [dict(flashblock="reuse"),
                                   dict(parallel=2, attention="bidirectional", independent_first_frame=False),
                                   dict(switch_mode="recache"), dict(kv_recompute=2, independent_first_frame=False)])
def test_settings_the_pair_does_not_define_are_refused_before_any_forward(experts, prompt, given):
    pair = ExpertPair(*experts)
    with pytest.raises(ValueError, match="two-expert model"):
        generate(pair, PromptSchedule.single(prompt), dataclasses.replace(family(), **given), blocks=2, width=W,
                 height=H, seed=0)
    assert pair.forwards == {"high": 0, "low": 0}
