"""Each checkpoint family at P1 against a sequential loop written here from that family's reference
inference code (no KV pool, no tick plan, no engine noise helpers).

The loop follows Self-Forcing's ``CausalInferencePipeline`` as each family configures it: blocks of
``frames`` latent frames (block 0 may be one frame), each denoised over its step list (warped through
the shifted table or used raw; block 0 may have its own list), re-noised with fresh noise between
steps, then run once more on its x0 at t = context noise to write its clean K/V. Keys are kept per
frame; a block attends to every earlier frame, or with a local window to the sink frames and the
last (window - sink) frames up to its own end (LongLive's rolling cache, the block inside the
window). LongLive's prompt switch re-caches as its interactive pipeline does: before the block
starting at frame s, the clean frames [max(0, s - window), s) are run at t = context noise under the
new prompt in one forward; once s > window, only the K/V of frames [s - (window - sink), s) are
rewritten (the sink keeps the old prompt) and the forward attends to the sink and those frames.
Reward Forcing (JaydenLyh/Reward-Forcing wan/modules/causal_model.py:142-255) keeps each frame's K
un-rotated and RoPEs the keys a forward attends, [sink | recent frames], at 0..F-1 with its queries at
the last n positions; at the first step of a block that pushes frames out of the window (block n >= 3
with window 9, sink 3: block n-2) the sink's un-rotated K and V become a*sink + (1-a)*pushed out,
before that forward attends.
A context prefix of F clean frames is run first, as the finished blocks it is made of (F mod N
frames first when N does not divide F, then blocks of N: Self-Forcing's way with a given video), one
forward each at t = context noise and positions at their frames, each seeing what a clean pass there
sees, under the first prompt; the blocks then follow at frame F, the prefix frames kept, windowed and
re-cached as any earlier frames.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from oracles import (
    noise_after_step,
    noise_levels,
    raw_noise_levels,
    renoised,
    rotate_frames,
    starting_noise,
    x0_from_velocity,
)

from cascade_core.sampling.families import family_config, guess_family
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

W, H, SEED = 64, 32, 21  # latent 4 x 8 -> 8 tokens per frame
# float rounding, through every block, of a log-sum-exp merge against one softmax and of keys the pool
# re-rotates (float32, at every move and EMA blend) against un-rotated keys RoPE'd once (float64)
TOLERANCE = 1e-5

# The reference values, written out from each family's code (README: the table with file and line)
FOUR = (1000, 750, 500, 250)
REFERENCE = {  # name: (frames per block, steps, warp, shift, first-block steps, window, sink, re-cache,
    #                  relative RoPE positions, EMA sink weight)
    "self-forcing": (3, FOUR, True, 5.0, None, None, 0, False, False, 0.0),
    "causvid": (3, (1000, 757, 522), False, 8.0, None, None, 0, False, False, 0.0),
    "causvid-warp": (3, FOUR, True, 8.0, None, None, 0, False, False, 0.0),
    "causal-forcing": (3, FOUR, True, 5.0, None, None, 0, False, False, 0.0),
    "causal-forcing-framewise": (1, FOUR, True, 5.0, None, None, 0, False, False, 0.0),
    "causal-forcing-framewise-2step": (1, (1000, 500), True, 5.0, FOUR, None, 0, False, False, 0.0),
    "causal-forcing-framewise-1step": (1, (1000,), True, 5.0, FOUR, None, 0, False, False, 0.0),
    "longlive": (3, FOUR, True, 5.0, None, 12, 3, True, False, 0.0),
    # configs/reward_forcing.yaml:51-57; wan/modules/causal_model.py:67,77 (alpha 0.999)
    "reward-forcing": (3, FOUR, True, 5.0, None, 9, 3, False, True, 0.999),
}


def levels(steps, warp, shift):
    return noise_levels(steps, shift) if warp else raw_noise_levels(steps, shift)


def family_loop(model, prompts, blocks, frames, steps, warp, shift, first_steps=None, window=None, sink=0,
                recache=False, relative=False, ema=0.0, first_frame=False, context_noise=0.0, prefix=None):
    """Latents [1, 16, F + T, H/8, W/8] and the number of model forwards of the family's own loop.

    ``prompts``: {start block: embeddings}; ``first_frame``: an independent first frame; ``relative``:
    Reward Forcing's relative RoPE positions; ``ema``: its EMA sink's weight (0: none); ``prefix``: F
    clean frames [1, 16, F, H/8, W/8] before block 0 (F = 0 without)."""
    lead = 0 if prefix is None else prefix.shape[2]
    sizes = [1 if first_frame and b == 0 else frames for b in range(blocks)]
    starts = [lead + sum(sizes[:b]) for b in range(blocks)]
    total = sum(sizes)
    kv = {}  # (layer, frame) -> (k, v) [tokens, heads, hd]
    tpf = (H // 16) * (W // 16)
    noise = starting_noise(SEED, (1, 16, total, H // 8, W // 8))
    out = torch.empty(1, 16, lead + total, H // 8, W // 8)
    text_of = {b: model.encode_prompt(e) for b, e in prompts.items()}
    forwards = 0

    ema_sink = {}  # layer -> the EMA sink's un-rotated (k, v) [sink * tokens, heads, hd], once blended

    def run(x, t, start, text, keys_of, written, pushed_out=()):
        """One forward over frames [start, start + F): K/V of ``written`` frames are stored; every
        query attends to the frames ``keys_of`` lists (new K/V of this forward where written). With
        relative positions the K/V kept are un-rotated; ``pushed_out``: frames blended into the EMA
        sink before this forward attends."""
        nonlocal forwards
        forwards += 1
        n = x.shape[2]
        at = len(keys_of) - n if relative else start  # the queries' first RoPE position
        unrotated = relative or ema  # K kept un-rotated, RoPE'd where attended

        def attend(layer, q, k, v):
            fresh = {start + f: (k[0, f * tpf:(f + 1) * tpf], v[0, f * tpf:(f + 1) * tpf]) for f in range(n)}
            if unrotated:  # the model RoPE'd frame start + f at position at + f: keep it un-rotated
                fresh = {g: (rotate_frames(kf, -(at + g - start)), vf) for g, (kf, vf) in fresh.items()}
            for f in written:
                kv[layer, f] = fresh[f]
            if pushed_out:
                assert len(pushed_out) == sink  # the reference's EMA branch (evicted size = sink size)
                old = ema_sink.get(layer) or [torch.cat([kv[layer, f][i] for f in range(sink)]) for i in (0, 1)]
                out_kv = [torch.cat([kv[layer, f][i] for f in pushed_out]) for i in (0, 1)]
                ema_sink[layer] = [ema * o + (1 - ema) * e for o, e in zip(old, out_kv)]
            keys = [kv[layer, f] if (layer, f) in kv and f not in fresh or f in written else fresh[f]
                    for f in keys_of]
            if unrotated:  # the EMA sink in place of the sink frames, then RoPE at 0..F-1 (or the frames)
                keys = [(ema_sink[layer][0][f * tpf:(f + 1) * tpf], ema_sink[layer][1][f * tpf:(f + 1) * tpf])
                        if f < sink and layer in ema_sink else c for f, c in zip(keys_of, keys)]
                keys = [(rotate_frames(kf, p if relative else f), vf)
                        for p, (f, (kf, vf)) in enumerate(zip(keys_of, keys))]
            heads = lambda z: z.unsqueeze(0).transpose(1, 2)  # noqa: E731  [L, heads, hd] -> [1, heads, L, hd]
            kk, vv = (heads(torch.cat([c[i] for c in keys])) for i in (0, 1))
            return F.scaled_dot_product_attention(heads(q[0]), kk, vv).transpose(1, 2)

        return model(x, t, [at], [text], attend)

    def visible(end):
        if window is None:
            return list(range(end))
        return list(range(min(sink, end))) + list(range(max(sink, end - (window - sink)), end))

    text = None
    if lead:  # the prefix as finished blocks: the remainder first, then blocks of ``frames``
        out[:, :, :lead] = prefix
        bounds = [0] + list(range(lead % frames or frames, lead + 1, frames))
        for lo, hi in zip(bounds, bounds[1:]):
            run(prefix[:, :, lo:hi], torch.full((1, hi - lo), float(context_noise)), lo, text_of[0], visible(hi),
                list(range(lo, hi)))
    for b in range(blocks):
        s, n = starts[b], sizes[b]
        if b in text_of:
            text = text_of[b]
            if recache and b > 0:
                lo = max(0, s - window) if window else 0
                keep_sink = window is not None and s > window
                written = list(range(s - (window - sink), s)) if keep_sink else list(range(lo, s))
                keys = (list(range(sink)) if keep_sink else []) + written
                run(out[:, :, lo:s], torch.full((1, s - lo), float(context_noise)), lo, text, keys, written)
        ts, sigmas = levels(first_steps if b == 0 and first_steps else steps, warp, shift)
        x = noise[:, :, s - lead:s - lead + n]
        own = list(range(s, s + n))
        pushed_out = [f for f in visible(s) if f >= sink and f not in visible(s + n)] if ema else []
        for j in range(len(ts)):
            v = run(x, torch.full((1, n), float(ts[j])), s, text, visible(s + n), own, pushed_out if j == 0 else ())
            x0 = x0_from_velocity(x, v, sigmas[j])
            x = renoised(x0, sigmas[j + 1], noise_after_step(SEED, b, j, x0.shape)) if j + 1 < len(ts) else x0
        out[:, :, s:s + n] = x
        run(x, torch.full((1, n), float(context_noise)), s, text, visible(s + n), own)  # the clean pass
    return out, forwards


def embedding(seed):
    from conftest import TINY
    return torch.randn(6, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def reference_config(name, **extra):
    frames, steps, warp, shift, first, window, sink, recache, relative, ema = REFERENCE[name]
    return CascadeConfig(frames_per_block=frames, steps=steps, warp=warp, shift=shift, first_block_steps=first,
                         window=window, sink=sink, switch_mode="recache" if recache else "none",
                         rope_positions="slots" if relative else "absolute", sink_ema=ema, **extra)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_each_family_fills_its_reference_settings(name):
    assert family_config(name) == reference_config(name)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_p1_equals_the_family_loop(model, name, one_thread):
    frames, steps, warp, shift, first, window, sink, recache, relative, ema = REFERENCE[name]
    blocks = 7 if frames == 3 else 6
    prompts = {0: embedding(1)}
    if recache:  # one switch while the window still holds the sink's neighbours, one past it
        prompts.update({2: embedding(2), 5: embedding(3)})
    expected, forwards = family_loop(model, prompts, blocks, frames, steps, warp, shift, first, window, sink,
                                     recache, relative, ema)
    res = generate(model, PromptSchedule(sorted(prompts.items())), family_config(name), blocks=blocks,
                   width=W, height=H, seed=SEED)
    if window is None:  # one run of keys, one attention call: bit-equal
        assert torch.equal(res.latents, expected), (res.latents - expected).abs().max()
    else:  # the pool attends the sink and the recent frames apart and merges them (log-sum-exp)
        assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards


def test_an_independent_first_frame_and_context_noise_equal_the_loop(model, one_thread):
    cfg = CascadeConfig(independent_first_frame=True, context_noise=40.0, window=7, sink=1)
    expected, forwards = family_loop(model, {0: embedding(1)}, 5, 3, FOUR, True, 5.0, window=7, sink=1,
                                     first_frame=True, context_noise=40.0)
    res = generate(model, PromptSchedule.single(embedding(1)), cfg, blocks=5, width=W, height=H, seed=SEED)
    assert res.latents.shape[2] == 1 + 4 * 3
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards == 5 * 5


@pytest.mark.parametrize("rope,ema,first_frame", [("slots", 0.0, False), ("slots", 0.5, False), ("slots", 0.5, True),
                                                   ("absolute", 0.5, False)])
def test_slot_positions_and_an_ema_sink_equal_the_loop(model, one_thread, rope, ema, first_frame):
    """Reward Forcing's two features apart and in other shapes; an EMA weight far from 1 makes a
    wrong blend (block, moment, rotation) stand out."""
    window = 7 if first_frame else 9  # block 0 of one frame: the window still ends on a block
    cfg = CascadeConfig(window=window, sink=3, rope_positions=rope, sink_ema=ema, independent_first_frame=first_frame)
    expected, forwards = family_loop(model, {0: embedding(1)}, 6, 3, FOUR, True, 5.0, window=window, sink=3,
                                     relative=rope == "slots", ema=ema, first_frame=first_frame)
    res = generate(model, PromptSchedule.single(embedding(1)), cfg, blocks=6, width=W, height=H, seed=SEED)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards


def test_slot_positions_with_a_recache_at_switches_equal_the_loop(model, one_thread):
    """A re-cache forward RoPEs its frames at their slots too (Reward Forcing has no switches of its
    own: this is the engine's general rule, against the loop's relative positions)."""
    prompts = {0: embedding(1), 2: embedding(2), 5: embedding(3)}
    expected, forwards = family_loop(model, prompts, 7, *REFERENCE["reward-forcing"][:7], True, True, 0.999)
    cfg = family_config("reward-forcing", switch_mode="recache")
    res = generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=7, width=W, height=H, seed=SEED)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards == 7 * 5 + 2


@pytest.mark.parametrize("settings,message", [
    (dict(rope_positions="relative"), "RoPE positions must be one of"),
    (dict(sink_ema=1.0), "must lie in [0, 1)"),
    (dict(sink_ema=float("nan")), "must lie in [0, 1)"),
    (dict(parallel=2), "need one block in flight"),
    (dict(fold_clean=True), "need one block in flight"),
    (dict(rope_positions="absolute", sink_ema=0.999, parallel=3), "need one block in flight"),
    (dict(sink=2, window=8), "sink = frames per block (3)"),
    (dict(window=10), "a window that ends on a block"),
    (dict(window=None, sink=0), "a window that ends on a block"),
])
def test_slot_positions_and_the_ema_sink_are_refused_where_undefined(settings, message):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(family_config("reward-forcing"), **settings).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_switch_modes_count_their_forwards(model, one_thread):
    """none: a switch adds no forward; recache: exactly one per switch (and the video differs)."""
    prompts = PromptSchedule([(0, embedding(1)), (3, embedding(2)), (5, embedding(3))])
    base = CascadeConfig(window=12, sink=3)
    plain = generate(model, prompts, base, blocks=7, width=W, height=H, seed=SEED)
    single = generate(model, PromptSchedule.single(embedding(1)), base, blocks=7, width=W, height=H, seed=SEED)
    recached = generate(model, prompts, CascadeConfig(window=12, sink=3, switch_mode="recache"), blocks=7,
                        width=W, height=H, seed=SEED)
    assert plain.forwards == single.forwards == 7 * 5
    assert recached.forwards == 7 * 5 + 2
    assert not torch.equal(plain.latents[:, :, 9:], recached.latents[:, :, 9:])
    assert torch.equal(plain.latents[:, :, :9], recached.latents[:, :, :9])  # before the first switch


def test_the_loop_separates_what_it_checks(model, one_thread):
    """Each family setting moves the loop's latents, so an engine that ignored it could not pass."""
    prompts = {0: embedding(1)}
    base, _ = family_loop(model, prompts, 4, 1, FOUR, True, 5.0)
    for changed in (dict(steps=(1000, 500), first_steps=FOUR), dict(steps=FOUR, warp=False),
                    dict(steps=FOUR, shift=8.0), dict(steps=FOUR, window=2, sink=1)):
        args = {"steps": FOUR, "warp": True, "shift": 5.0, **changed}
        other, _ = family_loop(model, prompts, 4, 1, args.pop("steps"), args.pop("warp"), args.pop("shift"),
                               **args)
        assert (other - base).abs().max() > 1e-3, changed
    plain, _ = family_loop(model, prompts, 4, 1, FOUR, True, 5.0, window=3, sink=1)
    for changed in (dict(relative=True), dict(ema=0.5)):
        other, _ = family_loop(model, prompts, 4, 1, FOUR, True, 5.0, window=3, sink=1, **changed)
        assert (other - plain).abs().max() > 1e-3, changed
    # Reward Forcing's own EMA weight moves its video far beyond the tolerance too
    rf = REFERENCE["reward-forcing"]
    with_ema, _ = family_loop(model, prompts, 7, *rf[:-1], rf[-1])
    without, _ = family_loop(model, prompts, 7, *rf[:-1], 0.0)
    assert (with_ema - without).abs().max() > 100 * TOLERANCE
    switched = {0: embedding(1), 3: embedding(2)}
    a, _ = family_loop(model, switched, 4, 1, FOUR, True, 5.0, window=3, sink=1)
    b, n = family_loop(model, switched, 4, 1, FOUR, True, 5.0, window=3, sink=1, recache=True)
    assert (a - b).abs().max() > 1e-3 and n == 4 * 5 + 1


@pytest.mark.parametrize("path,lora,family", [
    ("models/framewise/causal_forcing.pt", None, "causal-forcing-framewise"),
    ("causal-forcing++/framewise-2step.pt", None, "causal-forcing-framewise-2step"),
    ("causal-forcing++/framewise-1step.pt", None, "causal-forcing-framewise-1step"),
    ("chunkwise/causal_forcing.pt", None, "causal-forcing"),
    ("diffusion_models/causal_forcing-framewise.safetensors", None, "causal-forcing-framewise"),
    ("longlive_models/models/longlive_base.pt", "longlive_models/models/lora.pt", "longlive"),
    ("wan/base.safetensors", "loras/LongLive-lora.safetensors", "longlive"),
    ("checkpoints/self_forcing_dmd.pt", None, "self-forcing"),
    ("autoregressive_checkpoint_warp_4step_cfg2/causvid.pt", None, "causvid-warp"),
    ("CausVid/autoregressive_checkpoint/model.pt", None, "causvid"),
    ("checkpoints/krea-realtime-video-14b.safetensors", None, "krea-realtime"),
    ("diffusion_models/KreaRealtime14B.safetensors", None, "krea-realtime"),
    ("diffusion_models/krea14b_fp8.safetensors", None, "krea-realtime"),
    ("diffusion_models/kreations.safetensors", None, None),
    ("wan2.1_t2v_1.3B_bf16.safetensors", None, None),
])
def test_the_family_is_read_off_released_paths(path, lora, family):
    guess = guess_family(path, lora)
    assert (guess and guess[0]) == family
    if guess:
        assert "names it" in guess[1]


def test_a_recache_is_refused_where_it_is_not_defined(model):
    prompts = PromptSchedule([(0, embedding(1)), (2, embedding(2))])
    for extra, message in ((dict(parallel=2), "needs parallel 1"), (dict(fold_clean=True), "turn fold-clean off")):
        with pytest.raises(ValueError, match=message):
            generate(model, prompts, CascadeConfig(switch_mode="recache", **extra), blocks=4, width=W, height=H)
    # without a switch there is nothing to re-cache: any level runs
    generate(model, PromptSchedule.single(embedding(1)), CascadeConfig(switch_mode="recache", parallel=3), blocks=3,
             width=W, height=H)
