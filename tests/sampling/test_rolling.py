"""Rolling Forcing's sampler against a loop written here the way its own code runs it (TencentARC/
RollingForcing ``pipeline/rolling_forcing_inference.py:174-295``, ``wan/modules/causal_model.py:195-300``):

- a window of S blocks (S = the steps) is denoised jointly, one forward per window: window w holds
  blocks max(0, w-S+1)..min(n-1, w), block b at step w-b, all its frames attending each other and the
  cache (no mask); then every block is re-noised to its next level (fresh noise), or, at its last
  step, gives its latents;
- after each joint forward a separate clean pass runs the oldest block's x0 at t = context noise 0
  and writes its K/V (in the warm-up windows on block 0's intermediate x0, overwritten later);
- keys of a joint forward: while the window starts at block 0, the window itself; later the anchor
  (block 0's clean K/V, RoPE'd so that it sits right before the working cache), the working cache
  (the clean frames just before the window, 21 frames in all) and the window, at absolute positions;
- keys of a clean pass: the last 21 cached frames up to its end at absolute positions (no anchor).

Noise is drawn by the engine's documented rule (its own initial noise and per block and step), not by
Rolling Forcing's global generator. The engine runs this as its cascade at P = S + 1 with
bidirectional in-flight attention and a rolling window (one forward a tick: a block's clean pass
shares the next window's forward, which changes no result); equal within float rounding (the loop
attends one softmax over RoPE'd keys, the engine merges the sink and the window by log-sum-exp and
re-positions the sink's stored keys in float32).
"""
import pytest
import torch
import torch.nn.functional as F
from oracles import noise_after_step, noise_levels, renoised, rotate_frames, starting_noise, x0_from_velocity

from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

W, H, SEED = 64, 32, 17
FPB, MAX_KEYS, ANCHOR = 3, 21, 3  # frames per block, key frames of a joint forward, anchor frames (block 0)
TOLERANCE = 2e-5


def rolling_loop(model, embeds, blocks, steps, shift=5.0):
    """Latents [1, 16, blocks*3, H/8, W/8] of Rolling Forcing's own loop (module docstring)."""
    S = len(steps)
    ts, sigmas = noise_levels(steps, shift)
    text = model.encode_prompt(embeds)
    tpf = (H // 16) * (W // 16)
    cache = {}  # (layer, frame) -> (k RoPE'd at the frame's absolute position, v) [tpf, heads, hd]
    noise = starting_noise(SEED, (1, 16, blocks * FPB, H // 8, W // 8))
    out = torch.empty_like(noise)
    x = {}

    def forward(inp, t, start, keys_before):
        """One forward over frames [start, start + F): they attend ``keys_before`` (a function of the
        layer giving [(k, v)] in order) and themselves; returns (velocity, {frame: (k, v)} per layer)."""
        fresh = {}

        def attend(layer, q, k, v):
            n = k.shape[1] // tpf
            fresh[layer] = {start + f: (k[0, f * tpf:(f + 1) * tpf], v[0, f * tpf:(f + 1) * tpf]) for f in range(n)}
            keys = keys_before(layer) + [fresh[layer][start + f] for f in range(n)]
            heads = lambda z: z.unsqueeze(0).transpose(1, 2)  # noqa: E731  [L, heads, hd] -> [1, heads, L, hd]
            kk, vv = (heads(torch.cat([c[i] for c in keys])) for i in (0, 1))
            return F.scaled_dot_product_attention(heads(q[0]), kk, vv).transpose(1, 2)

        return model(inp, t, [start], [text], attend), fresh

    for w in range(blocks + S - 1):
        first, last = max(0, w - S + 1), min(blocks - 1, w)
        window = list(range(first, last + 1))
        if last == w:
            x[last] = noise[:, :, last * FPB:(last + 1) * FPB]
        start, frames = first * FPB, (last + 1 - first) * FPB
        if first == 0:  # the window alone
            before = lambda layer: []  # noqa: E731
        else:
            working = list(range(max(ANCHOR, start - (MAX_KEYS - frames - ANCHOR)), start))
            at = start - len(working) - ANCHOR  # the anchor sits right before the working cache

            def before(layer, working=working, at=at):
                anchor = [(rotate_frames(cache[layer, f][0], at), cache[layer, f][1]) for f in range(ANCHOR)]
                return anchor + [cache[layer, f] for f in working]
        t = torch.tensor([[float(ts[w - b])] * FPB for b in window]).reshape(1, -1)
        v, _ = forward(torch.cat([x[b] for b in window], 2), t, start, before)
        for i, b in enumerate(window):
            stage = w - b
            x0 = x0_from_velocity(x[b], v[:, :, i * FPB:(i + 1) * FPB], sigmas[stage])
            if stage + 1 < S:
                x[b] = renoised(x0, sigmas[stage + 1], noise_after_step(SEED, b, stage, x0.shape))
            else:
                out[:, :, b * FPB:(b + 1) * FPB] = x0
            if b == first:
                clean_in = x0
        end = start + FPB  # the clean pass of the oldest block: the last 21 cached frames up to its end
        _, fresh = forward(clean_in, torch.zeros(1, FPB), start,
                           lambda layer: [cache[layer, f] for f in range(max(0, end - MAX_KEYS), start)])
        for layer, kv in fresh.items():
            cache.update({(layer, f): c for f, c in kv.items()})
    return out


@pytest.fixture(scope="module")
def prompt():
    from conftest import TINY
    return torch.randn(6, TINY.text_dim, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("blocks", [6, 11])  # 11: the anchor is re-positioned and the clean passes drop it
def test_rolling_forcing_equals_its_own_loop(model, prompt, blocks, one_thread):
    steps = (1000, 800, 600, 400, 200)
    cfg = family_config("rolling-forcing")
    assert (cfg.steps, cfg.parallel, cfg.attention, cfg.window, cfg.sink, cfg.rolling_window) == \
        (steps, 6, "bidirectional", 21, 3, True)
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=blocks, width=W, height=H, seed=SEED)
    expected = rolling_loop(model, prompt, blocks, steps)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == blocks + len(steps)  # one a tick: the clean passes share the windows' forwards


def test_causal_forcings_long_video_model_is_the_same_sampler_with_four_steps(model, prompt, one_thread):
    cfg = family_config("causal-forcing-longvideo")
    res = generate(model, PromptSchedule.single(prompt), cfg, blocks=10, width=W, height=H, seed=SEED)
    assert (res.latents - rolling_loop(model, prompt, 10, (1000, 750, 500, 250))).abs().max() <= TOLERANCE


def test_the_loop_separates_the_rolling_window_from_a_plain_one(model, prompt, one_thread):
    """Without the re-positioned anchor and the newest-anchored window the engine's latents move far
    past the tolerance, so the comparison above checks both."""
    cfg = family_config("rolling-forcing")
    plain = CascadeConfig(**{**cfg.__dict__, "rolling_window": False})
    a = generate(model, PromptSchedule.single(prompt), cfg, blocks=11, width=W, height=H, seed=SEED).latents
    b = generate(model, PromptSchedule.single(prompt), plain, blocks=11, width=W, height=H, seed=SEED).latents
    assert (a - b).abs().max() > 100 * TOLERANCE
    # blocks 0-2 finish before the keys (up to the newest block's end) reach past 21 frames
    assert torch.equal(a[:, :, :9], b[:, :, :9])


def test_a_rolling_window_too_small_for_the_blocks_denoised_together_is_refused():
    with pytest.raises(ValueError, match="must hold every block being denoised: window - sink >= 15"):
        family_config("rolling-forcing", window=12).validate()
    family_config("rolling-forcing", window=12, attention="causal").validate()  # each block sees itself


def test_a_rolling_family_with_another_step_list_denoises_all_its_steps_together():
    assert family_config("rolling-forcing", steps=(1000, 900, 800, 600, 400, 200)).parallel == 7
    assert family_config("causal-forcing-longvideo", steps=(1000, 500)).parallel == 3
    assert family_config("rolling-forcing", steps=(1000, 500), parallel=2).parallel == 2  # unless given
