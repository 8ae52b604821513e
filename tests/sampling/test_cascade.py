"""The cascade at P>1 against a loop written here from the documented rules (no KV pool, no schedule).

The oracle keeps every frame's latest K/V per layer in a dict, lists ticks by the documented entry
rule (block 0 enters at tick 0; block b >= 1 at floor(b*(S+1)/P) + max(S0 - S, 1 - floor((S+1)/P)) where
block 0 has S0 steps and the others S; stage S_b is block b's clean pass), and attends with a plain
softmax over concatenated keys:
- a denoising step sees blocks up to itself (causal) or up to the newest block of the tick
  (bidirectional); a clean pass always sees blocks up to itself;
- FlashBlock reuse: at a block's first step its queries' scores against the keys outside the block
  and those keys' values are kept; at its later steps the softmax runs over the kept external scores
  concatenated with fresh in-block scores (exactly what a log-sum-exp merge of a stored external part
  computes); clean passes never reuse;
- the clean pass runs on x0 at t = context_noise;
- a local window of W frames with a sink of S: a block ending at frame e sees frames [0, S) and
  [e - (W - S), hi) with hi its own end or the newest block's end as above (the reference's rolling
  cache);
- a context prefix of F clean frames: written before tick 0 as finished blocks of the run's block
  size (F mod size frames first when the size does not divide F), one forward each at t =
  context_noise and positions at their frames, each seeing what a clean pass there sees; the blocks
  follow at frame F and see prefix frames as any earlier frames.
"""
import math

import pytest
import torch
from oracles import noise_after_step, noise_levels, renoised, starting_noise, x0_from_velocity

from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

W, H = 64, 32  # latent 4 x 8 -> 2 x 4 = 8 tokens per frame
FPB, BLOCKS, SEED = 2, 5, 13


def cascade_oracle(model, embeds, parallel, attention="causal", flashblock="off", context_noise=0.0,
                   steps=(1000, 750, 500, 250), first_steps=None, first_frame=False, window=None, sink=0,
                   prefix=None, blocks=BLOCKS):
    """Latents [1, 16, F + T, H/8, W/8] of the cascade, computed without the engine's pool; block 0 may
    have its own step list (``first_steps``) and be one frame (``first_frame``); ``window``/``sink``
    in frames; ``prefix``: F clean frames [1, 16, F, H/8, W/8] before block 0 (F = 0 without)."""
    first_steps = first_steps or steps
    n_steps = {b: len(first_steps if b == 0 else steps) for b in range(blocks)}
    levels = {b: noise_levels(first_steps if b == 0 else steps) for b in range(blocks)}
    text = model.encode_prompt(embeds)
    S, S0 = len(steps), len(first_steps)
    delay = max(S0 - S, 1 - (S + 1) // parallel)
    entry = [0] + [b * (S + 1) // parallel + delay for b in range(1, blocks)]
    sizes = [1 if first_frame and b == 0 else FPB for b in range(blocks)]
    lead = 0 if prefix is None else prefix.shape[2]
    start = [lead + sum(sizes[:b]) for b in range(blocks)]
    tpf = (H // 16) * (W // 16)
    kv = {}  # (layer, frame) -> (k, v) [tokens of a frame, heads, hd]: the frame's K/V as last written
    kept = {}  # (layer, block) -> (external scores [heads, L, K], external values [heads, K, hd])
    noise = starting_noise(SEED, (1, 16, sum(sizes), H // 8, W // 8))
    x = {b: noise[:, :, start[b] - lead:start[b] - lead + sizes[b]] for b in range(blocks)}
    out = torch.empty(1, 16, lead + sum(sizes), H // 8, W // 8)
    heads = lambda t: t.transpose(0, 1)  # noqa: E731  [L, heads, hd] -> [heads, L, hd]

    def write(layer, first, k, v):
        for f in range(k.shape[0] // tpf):
            kv[layer, first + f] = (k[f * tpf:(f + 1) * tpf], v[f * tpf:(f + 1) * tpf])

    def seen(end, hi):  # frames a block ending at ``end`` sees when its visible run ends at ``hi``
        return [f for f in range(hi) if window is None or f < sink or f >= end - (window - sink)]

    def attend_prefix(layer, q, k, v, lo, hi):
        write(layer, lo, k[0], v[0])
        keys = [kv[layer, f] for f in seen(hi, hi)]
        qh = heads(q[0])
        scores = qh @ heads(torch.cat([c[0] for c in keys])).transpose(1, 2) / math.sqrt(qh.shape[-1])
        return (scores.softmax(-1) @ heads(torch.cat([c[1] for c in keys]))).transpose(0, 1).unsqueeze(0)

    out[:, :, :lead] = prefix if lead else out[:, :, :0]
    bounds = [0] + list(range(lead % FPB or FPB, lead + 1, FPB))  # the remainder first, then blocks
    for lo, hi in zip(bounds, bounds[1:]):
        model(prefix[:, :, lo:hi], torch.full((1, hi - lo), float(context_noise)), [lo], [text],
              lambda layer, q, k, v, lo=lo, hi=hi: attend_prefix(layer, q, k, v, lo, hi))

    for tick in range(entry[-1] + S + 1):
        pairs = [(b, tick - entry[b]) for b in range(blocks) if 0 <= tick - entry[b] <= n_steps[b]]
        newest = pairs[-1][0]

        def attend_pairs(layer, q, k, v, pairs):
            for j, (b, _) in enumerate(pairs):  # every segment's K/V is written before any is read
                write(layer, start[b], k[j], v[j])
            res = torch.empty_like(q)
            for j, (b, stage) in enumerate(pairs):
                clean = stage == n_steps[b]
                last_seen = newest if attention == "bidirectional" and not clean else b
                qh = q[j].transpose(0, 1)  # [heads, L, hd]
                scale = 1 / math.sqrt(qh.shape[-1])
                own = range(start[b], start[b] + sizes[b])
                others = [kv[layer, f] for f in seen(own[-1] + 1, start[last_seen] + sizes[last_seen])
                          if f not in own]
                ext_k = heads(torch.cat([c[0] for c in others])) if others else qh[:, :0]
                ext_v = heads(torch.cat([c[1] for c in others])) if others else qh[:, :0]
                ext_scores = qh @ ext_k.transpose(1, 2) * scale
                if flashblock == "reuse" and not clean:
                    if stage == 0:
                        kept[layer, b] = (ext_scores, ext_v)
                    ext_scores, ext_v = kept[layer, b]
                own_k, own_v = (heads(t) for t in (k[j], v[j]))
                scores = torch.cat([ext_scores, qh @ own_k.transpose(1, 2) * scale], -1)
                res[j] = (scores.softmax(-1) @ torch.cat([ext_v, own_v], 1)).transpose(0, 1)
            return res

        # one forward per run of equal-sized blocks, oldest first (causal: the later forward sees the
        # K/V the earlier one wrote); every pair's velocity [1, 16, frames, h, w]
        v = {}
        for size in sorted({sizes[b] for b, _ in pairs}):
            group = [(j, b, s) for j, (b, s) in enumerate(pairs) if sizes[b] == size]
            sub = [(b, s) for _, b, s in group]
            t = torch.tensor([[float(context_noise) if s == n_steps[b] else float(levels[b][0][s])] * size
                              for b, s in sub])
            outs = model(torch.cat([x[b] for b, _ in sub]), t, [start[b] for b, _ in sub], [text] * len(sub),
                         lambda layer, q, k, v_, sub=sub: attend_pairs(layer, q, k, v_, sub))
            v.update({j: outs[r:r + 1] for r, (j, _, _) in enumerate(group)})
        for j, (b, stage) in enumerate(pairs):
            if stage == n_steps[b]:
                continue
            sigmas = levels[b][1]
            x0 = x0_from_velocity(x[b], v[j], sigmas[stage])
            if stage + 1 < n_steps[b]:
                x[b] = renoised(x0, sigmas[stage + 1], noise_after_step(SEED, b, stage, x0.shape))
            else:
                x[b] = x0  # the clean pass runs on x0
                out[:, :, start[b]:start[b] + sizes[b]] = x0
    return out


CASES = {  # name: (parallel, attention, flashblock, context_noise)
    "P3 causal reuse": (3, "causal", "reuse", 0.0),
    "P5 bidirectional": (5, "bidirectional", "off", 0.0),
    "P2 causal context noise": (2, "causal", "off", 80.0),
    "P4 bidirectional reuse context noise": (4, "bidirectional", "reuse", 50.0),
}
TOLERANCE = 1e-4  # float rounding of fused vs plain attention, carried through 4 steps and 5 blocks


@pytest.fixture(scope="module")
def oracle(model, prompt):
    cache = {}

    def get(*case):
        if case not in cache:
            cache[case] = cascade_oracle(model, prompt, *case)
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_cascade_equals_the_oracle(model, prompt, oracle, case, one_thread):
    parallel, attention, flashblock, context_noise = CASES[case]
    cfg = CascadeConfig(frames_per_block=FPB, parallel=parallel, attention=attention, flashblock=flashblock,
                        context_noise=context_noise)
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=SEED)
    expected = oracle(parallel, attention, flashblock, context_noise)
    assert (res.latents - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("changed,base", [
    ((3, "causal", "off", 0.0), (3, "causal", "reuse", 0.0)),  # reuse is not a no-op
    ((2, "causal", "off", 0.0), (2, "causal", "off", 80.0)),  # context noise is felt
    ((4, "bidirectional", "reuse", 0.0), (4, "bidirectional", "reuse", 50.0)),
    ((5, "causal", "off", 0.0), (5, "bidirectional", "off", 0.0)),  # visibility is felt
])
def test_the_oracle_separates_what_it_checks(oracle, changed, base, one_thread):
    """Each setting the comparison checks moves the oracle's latents far beyond the tolerance, so an
    engine that ignored it could not pass."""
    assert (oracle(*changed) - oracle(*base)).abs().max() > 100 * TOLERANCE


BLOCK0_CASES = {  # name: (parallel, attention, flashblock, first-block steps, independent first frame)
    "P3 first frame": (3, "causal", "off", None, True),
    "P5 first frame reuse": (5, "causal", "reuse", None, True),
    "P2 2-step, 4-step block 0": (2, "causal", "off", (1000, 750, 500, 250), False),
    "P2 bidirectional 1-step, 4-step block 0": (2, "bidirectional", "off", (1000, 750, 500, 250), False),
    "P3 first frame, 2-step, 3-step block 0 reuse": (3, "causal", "reuse", (1000, 750, 500), True),
}


@pytest.mark.parametrize("case", list(BLOCK0_CASES))
def test_block0_of_its_own_equals_the_oracle(model, prompt, case, one_thread):
    """Block 0 with its own size (an independent first frame) or step list at P>1."""
    parallel, attention, flashblock, first_steps, first_frame = BLOCK0_CASES[case]
    steps = (1000,) if "1-step" in case else (1000, 500) if "2-step" in case else (1000, 750, 500, 250)
    cfg = CascadeConfig(frames_per_block=FPB, parallel=parallel, attention=attention, flashblock=flashblock,
                        steps=steps, first_block_steps=first_steps, independent_first_frame=first_frame)
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=BLOCKS, width=W, height=H, seed=SEED)
    expected = cascade_oracle(model, prompt, parallel, attention, flashblock, steps=steps,
                              first_steps=first_steps, first_frame=first_frame)
    assert res.latents.shape == expected.shape
    assert (res.latents - expected).abs().max() <= TOLERANCE
