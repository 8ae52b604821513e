"""LongLive 2.0 (family ``longlive-2``) against loops written here from its reference inference code
(NVlabs/LongLive@7860ad9), on a tiny random Wan DiT of 48 latent channels (the Wan2.2 latent space).

The sequential loop (:func:`reference_loop`) follows ``pipeline/causal_diffusion_inference.py:366-705``: per block
of 8 latent frames, the prompt of the block; a scene cut (a block > 0 whose prompt starts with "The scene
transitions. ") adds 8 to the temporal RoPE offset of it and every later block; x = the block's frames of the
initial noise; a fresh UniPC solver (:class:`test_unipc.ReferenceUniPC`, the general recursion) steps it through its
timesteps, the model seeing x at t for every frame; then a clean pass at t = 0 writes the block's K/V, after which
a cut block's first 8 frames are pinned. The KV cache is simulated as the reference keeps it
(``wan_5b/modules/causal_model.py:457-785, 1371-1483``), slot by slot in frames: 32 slots, a global sink of 8; a
forward whose end passes the cache's global end and whose frames do not fit evicts new + local_end - 32 frames
after the effective sink (8; 8 + the pinned length when the pinned range sits right after the global sink) and
moves the rest down, a floating pinned range following the move; other forwards overwrite their slots; every
forward attends the cache's slots [0, local_end) (the window is the whole cache), its own fresh K/V included.
Image-to-video: in block 0 frame 0 is the image latent before every forward, after every solver step and in the
output, at timestep 0 in every forward (l.553-627).

The cascade loop (:func:`cascade_loop`, P > 1) runs the documented tick plan (block b enters at tick
floor(b*(S+1)/P); stage S is its clean pass), every pair of a tick in one forward whose segments write their K/V
before any reads (frames as last written), each block with its own solver; a block ending at frame e sees frames
[0, 8) and [e - 24, e) -- or, once a cut block's clean pass has run and its first 8 frames [p, p + 8) lie before
e - 24, frames [0, 8), [p, p + 8) and [e - 16, e): the engine's rule for a pin at P > 1 (no reference runs P > 1).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_5B as TINY48
from test_unipc import ReferenceUniPC

from cascade_core.model.dit import WanModel
from cascade_core.sampling.config import SCENE_CUT_PREFIX, CascadeConfig, PromptSchedule, is_scene_cut
from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import generate

W, H = 64, 32  # Wan2.2 latents 2 x 4 (16 px a latent pixel) -> 1 x 2 = 2 tokens per frame
FRAMES, SLOTS, SINK, SHOT = 8, 32, 8, 8
TPF = (H // 32) * (W // 32)
TOLERANCE = 1e-5  # float32: the oracle's solver rounds apart from the engine's, the pool merges spans by log-sum-exp


@pytest.fixture(scope="module")
def model():
    return WanModel.random(TINY48, seed=0)


def embedding(seed):
    return torch.randn(6, TINY48.text_dim, generator=torch.Generator().manual_seed(seed))


def noise_for(blocks, seed=3):
    return torch.randn(1, 48, blocks * FRAMES, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def image_latent(seed=9):
    return torch.randn(1, 48, 1, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def attend_keys(q, keys):
    """Plain softmax attention of q [1, L, heads, hd] over the concatenated (k, v) [tokens, heads, hd] pairs."""
    heads = lambda z: z.unsqueeze(0).transpose(1, 2)  # noqa: E731
    kk, vv = (heads(torch.cat([c[i] for c in keys])) for i in (0, 1))
    return F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv).transpose(1, 2)


class ReferenceCache:
    """The reference's rolling KV cache in frames (see the module docstring): ``slots`` hold frame indices."""

    def __init__(self):
        self.slots, self.local_end, self.global_end = [], 0, 0
        self.pin_start, self.pin_len = -1, 0

    def forward(self, start, n):
        """(frames attended in slot order, commit) of a forward over frames [start, start + n)."""
        pinned = self.pin_start >= 0 and self.pin_len > 0
        eff = SINK + self.pin_len if pinned and self.pin_start == SINK else SINK
        slots, end, shift = list(self.slots), start + n, 0
        if end > self.global_end and n + self.local_end > SLOTS:
            evicted = n + self.local_end - SLOTS
            rolled = self.local_end - evicted - eff
            local_end = self.local_end + end - self.global_end - evicted
            slots[eff:eff + rolled] = slots[eff + evicted:eff + evicted + rolled]
            shift = evicted if pinned and self.pin_start >= eff else 0
        else:
            local_end = self.local_end + end - self.global_end
        slots += [None] * (local_end - len(slots))
        slots[local_end - n:local_end] = range(start, end)
        assert local_end <= SLOTS  # so the attended window is the whole cache [0, local_end)

        def commit():
            self.slots, self.local_end, self.global_end = slots, local_end, end
            self.pin_start -= shift
        return slots[:local_end], commit

    def pin(self, n):
        """After a cut block's clean pass: its first min(sink, n) frames pinned where they sit."""
        self.pin_start, self.pin_len = self.local_end - n, min(SINK, n)


def reference_loop(model, prompts, blocks, noise, steps=4, cuts=(), image=None, pin=True, rope_offset=SHOT,
                   image_at_zero=True):
    """(latents [1, 48, 8 * blocks, 2, 4], forwards) of LongLive 2.0's loop; ``prompts``: {start block:
    embeddings}; ``cuts``: blocks whose prompt starts with the scene-cut text; ``pin``/``rope_offset``: its
    multi-shot sink and RoPE offset (off/0 to see each matter); ``image``: the I2V image latent."""
    text_of = {b: model.encode_prompt(e) for b, e in prompts.items()}
    cache, kv, shot, forwards = ReferenceCache(), {}, 0, 0
    out = torch.empty_like(noise)

    def forward(x, t, start, text):
        nonlocal forwards
        forwards += 1
        frames, commit = cache.forward(start, x.shape[2])

        def attend(layer, q, k, v):
            for f in range(x.shape[2]):
                kv[layer, start + f] = (k[0, f * TPF:(f + 1) * TPF], v[0, f * TPF:(f + 1) * TPF])
            return attend_keys(q, [kv[layer, f] for f in frames])

        v = model(x, t, [start + shot * rope_offset], [text], attend)
        commit()
        return v

    text = text_of[0]
    for b in range(blocks):
        text = text_of.get(b, text)
        shot += b > 0 and b in cuts
        s = b * FRAMES
        x = noise[:, :, s:s + FRAMES].clone()
        held = image is not None and b == 0
        if held:
            x[:, :, :1] = image
        solver = ReferenceUniPC(steps)
        for t in solver.timesteps:
            tt = torch.full((1, FRAMES), float(t))
            if held and image_at_zero:
                tt[0, 0] = 0
            x = solver.step(forward(x, tt, s, text), x).float()
            if held:
                x[:, :, :1] = image
        out[:, :, s:s + FRAMES] = x
        forward(x, torch.zeros(1, FRAMES), s, text)
        if pin and b > 0 and b in cuts:
            cache.pin(FRAMES)
    return out, forwards


def cascade_loop(model, prompts, blocks, noise, parallel, steps=4, cuts=(), image=None):
    """Latents of the cascade at ``parallel`` (see the module docstring)."""
    text_of = {b: model.encode_prompt(e) for b, e in prompts.items()}
    text = {b: text_of[max(s for s in text_of if s <= b)] for b in range(blocks)}
    shift = {b: SHOT * sum(1 for c in cuts if 0 < c <= b) for b in range(blocks)}
    entry = [b * (steps + 1) // parallel for b in range(blocks)]
    solvers = {b: ReferenceUniPC(steps) for b in range(blocks)}
    x = {b: noise[:, :, b * FRAMES:(b + 1) * FRAMES].clone() for b in range(blocks)}
    if image is not None:
        x[0][:, :, :1] = image
    kv, pinned, out = {}, None, torch.empty_like(noise)
    timesteps = solvers[0].timesteps

    def seen(b):
        end = (b + 1) * FRAMES
        if pinned is not None and pinned + FRAMES <= end - (SLOTS - SINK):
            return list(range(SINK)) + list(range(pinned, pinned + FRAMES)) + list(range(end - 16, end))
        return [f for f in range(end) if f < SINK or f >= end - (SLOTS - SINK)]

    for tick in range(entry[-1] + steps + 1):
        pairs = [(b, tick - entry[b]) for b in range(blocks) if 0 <= tick - entry[b] <= steps]

        def attend(layer, q, k, v, pairs=pairs):
            for j, (b, _) in enumerate(pairs):
                for f in range(FRAMES):
                    kv[layer, b * FRAMES + f] = (k[j, f * TPF:(f + 1) * TPF], v[j, f * TPF:(f + 1) * TPF])
            return torch.cat([attend_keys(q[j:j + 1], [kv[layer, f] for f in seen(b)])
                              for j, (b, _) in enumerate(pairs)])

        t = torch.tensor([[0.0 if s == steps else float(timesteps[s])] * FRAMES for b, s in pairs])
        if image is not None and pairs[0][0] == 0:
            t[0, 0] = 0
        v = model(torch.cat([x[b] for b, _ in pairs]), t, [b * FRAMES + shift[b] for b, _ in pairs],
                  [text[b] for b, _ in pairs], attend)
        for j, (b, s) in enumerate(pairs):
            if s == steps:
                if b > 0 and b in cuts:
                    pinned = b * FRAMES
                continue
            x[b] = solvers[b].step(v[j:j + 1], x[b]).float()
            if image is not None and b == 0:
                x[b][:, :, :1] = image
            if s + 1 == steps:
                out[:, :, b * FRAMES:(b + 1) * FRAMES] = x[b]
    return out


def engine(model, prompts, blocks, noise, cuts=(), family="longlive-2", seed=0, image=None, **settings):
    schedule = PromptSchedule(sorted(prompts.items()), scene_cuts=set(cuts))
    return generate(model, schedule, family_config(family, **settings), blocks=blocks, width=W, height=H,
                    seed=seed, noise=noise, image_latent=image)


def test_the_families_fill_longlive2s_settings():
    base = dict(solver="unipc", warp=False, shift=5.0, frames_per_block=8, window=32, sink=8, context_noise=0.0,
                multi_shot_sink=True, shot_rope_offset=8, rope_positions="absolute", parallel=1)
    assert family_config("longlive-2") == CascadeConfig(steps=(999, 937, 833, 624), **base)
    assert family_config("longlive-2-2step") == CascadeConfig(steps=(999, 833), **base)
    assert is_scene_cut(SCENE_CUT_PREFIX + "a dog") and not is_scene_cut("a dog. " + SCENE_CUT_PREFIX)


@pytest.mark.parametrize("family,steps", [("longlive-2", 4), ("longlive-2-2step", 2)])
def test_p1_equals_the_reference_loop(model, family, steps, one_thread):
    """Six blocks: blocks 0-3 fill the 32-frame cache, 4 and 5 roll it (they see blocks 0, b-2, b-1, b)."""
    noise = noise_for(6)
    expected, forwards = reference_loop(model, {0: embedding(1)}, 6, noise, steps)
    res = engine(model, {0: embedding(1)}, 6, noise, family=family)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards == 6 * (steps + 1)


CUTS = {  # name: (prompt starts, cut blocks, blocks)
    "cut at block 1, pinned beside the sink at once; another at 5 while it is": ((0, 1, 2, 5, 6), (1, 5), 10),
    "cut at block 2, pinned once the window passes it": ((0, 2, 3), (2,), 7),
    "cuts at blocks 3 and 4 in a row": ((0, 3, 4, 5), (3, 4), 9),
}


@pytest.mark.parametrize("case", list(CUTS))
def test_scene_cuts_equal_the_reference_loop(model, case, one_thread):
    starts, cuts, blocks = CUTS[case]
    prompts = {s: embedding(10 + s) for s in starts}
    noise = noise_for(blocks)
    expected, _ = reference_loop(model, prompts, blocks, noise, cuts=cuts)
    res = engine(model, prompts, blocks, noise, cuts=cuts)
    assert (res.latents - expected).abs().max() <= TOLERANCE


def test_the_loop_separates_the_scene_cut_rules(model, one_thread):
    """The pinned block and the RoPE offset each move the loop's blocks after a cut far beyond the tolerance,
    so an engine that ignored either could not pass."""
    starts, cuts, blocks = CUTS["cut at block 2, pinned once the window passes it"]
    prompts = {s: embedding(10 + s) for s in starts}
    noise = noise_for(blocks)
    both, _ = reference_loop(model, prompts, blocks, noise, cuts=cuts)
    for other in (dict(pin=False), dict(rope_offset=0), dict(cuts=())):
        moved, _ = reference_loop(model, prompts, blocks, noise, **{"cuts": cuts, **other})
        assert (moved - both).abs().max() > 100 * TOLERANCE, other
    unpinned, _ = reference_loop(model, prompts, blocks, noise, cuts=cuts, pin=False)
    assert torch.equal(unpinned[:, :, :5 * FRAMES], both[:, :, :5 * FRAMES])  # the pin shows from block 5 on
    assert (unpinned[:, :, 5 * FRAMES:] - both[:, :, 5 * FRAMES:]).abs().max() > 100 * TOLERANCE


def test_image_to_video_equals_the_reference_loop(model, one_thread):
    noise, image = noise_for(5), image_latent()
    expected, _ = reference_loop(model, {0: embedding(1)}, 5, noise, image=image)
    res = engine(model, {0: embedding(1)}, 5, noise, image=image)
    assert torch.equal(res.latents[:, :, :1], image)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    plain, _ = reference_loop(model, {0: embedding(1)}, 5, noise)
    noisy_t, _ = reference_loop(model, {0: embedding(1)}, 5, noise, image=image, image_at_zero=False)
    for other in (plain, noisy_t):  # the image and its timestep 0 are each felt
        assert (other[:, :, 1:] - expected[:, :, 1:]).abs().max() > 100 * TOLERANCE


CASCADES = {  # name: (parallel, steps, cut blocks, image)
    "P2": (2, 4, (), False),
    "P5": (5, 4, (), False),
    "P3 2-step": (3, 2, (), False),
    "P3 image": (3, 4, (), True),
    "P5 cuts at 1 and 4": (5, 4, (1, 4), False),
    "P2 cut at 2": (2, 4, (2,), False),
}


@pytest.mark.parametrize("case", list(CASCADES))
def test_the_cascade_equals_the_cascade_loop(model, case, one_thread):
    """P > 1: what it equals is the cascade of per-block solvers over the in-flight blocks' K/V (not the P1
    video: a block sees older blocks partly denoised); block 0 sees no other block, so it is P1's."""
    parallel, steps, cuts, with_image = CASCADES[case]
    blocks, image = 8, image_latent() if with_image else None
    prompts = {0: embedding(1), **{c: embedding(20 + c) for c in cuts}}
    noise = noise_for(blocks)
    expected = cascade_loop(model, prompts, blocks, noise, parallel, steps, cuts, image)
    family = "longlive-2" if steps == 4 else "longlive-2-2step"
    res = engine(model, prompts, blocks, noise, cuts=cuts, family=family, image=image, parallel=parallel)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    p1 = engine(model, prompts, blocks, noise, cuts=cuts, family=family, image=image)
    assert (res.latents[:, :, :FRAMES] - p1.latents[:, :, :FRAMES]).abs().max() <= TOLERANCE
    assert (res.latents - p1.latents).abs().max() > 100 * TOLERANCE  # the cascade is not P1


def test_the_cascade_loop_at_p1_is_the_reference_loop(model, one_thread):
    """The two oracles agree where both are defined (cuts included), so the cascade loop's rules are the
    reference's at P1."""
    prompts = {0: embedding(1), 1: embedding(2), 5: embedding(3)}
    noise = noise_for(9)
    expected, _ = reference_loop(model, prompts, 9, noise, cuts=(1, 5))
    assert (cascade_loop(model, prompts, 9, noise, 1, cuts=(1, 5)) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("parallel", [1, 3])
def test_the_seed_does_not_change_the_video_for_a_given_noise(model, parallel, one_thread):
    noise = noise_for(5)
    a = engine(model, {0: embedding(1)}, 5, noise, seed=0, parallel=parallel)
    b = engine(model, {0: embedding(1)}, 5, noise, seed=2 ** 40 + 7, parallel=parallel)
    assert torch.equal(a.latents, b.latents)
    # the re-noising families draw fresh noise from the seed after every step: there it changes the video
    renoise = dict(family="self-forcing", frames_per_block=8, parallel=parallel)
    c = engine(model, {0: embedding(1)}, 5, noise, seed=0, **renoise)
    d = engine(model, {0: embedding(1)}, 5, noise, seed=2 ** 40 + 7, **renoise)
    assert not torch.equal(c.latents, d.latents)


@pytest.mark.parametrize("settings,message", [
    (dict(steps=(1000, 750, 500, 250)), "4 steps at shift 5 are 999,937,833,624"),
    (dict(shift=3.0), "4 steps at shift 3 are"),
    (dict(warp=True), "warp must be off"),
    (dict(first_block_steps=(999, 937, 833, 624)), "no step list of its own"),
    (dict(sink=4), "sink = frames per block (8)"),
    (dict(window=20), "a window of whole blocks"),
    (dict(window=16), "(>= 24)"),
    (dict(switch_mode="recache"), "no re-cache at prompt switches"),
    (dict(switch_mode="recache", shot_rope_offset=0), "cannot be combined with switch mode recache"),
    (dict(rope_positions="slots", multi_shot_sink=False), "needs absolute RoPE positions"),
    (dict(solver="euler"), "solver must be one of"),
    (dict(shot_rope_offset=-1), "an int >= 0"),
])
def test_settings_it_cannot_run_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as err:
        CascadeConfig(**{**vars(family_config("longlive-2")), **settings}).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_scene_cuts_and_image_latents_are_refused(model):
    prompts = {0: embedding(1), 2: embedding(2)}
    with pytest.raises(ValueError, match="a scene cut at block 3, which holds no prompt switch"):
        engine(model, prompts, 4, noise_for(4), cuts=(3,))
    with pytest.raises(ValueError, match="takes the first prompt"):
        engine(model, prompts, 4, noise_for(4), cuts=(0,))
    with pytest.raises(ValueError, match=r"one real latent frame \[1, 48, 1, 2, 4\]"):
        engine(model, prompts, 4, noise_for(4), image=torch.zeros(1, 48, 2, 2, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine(model, prompts, 4, noise_for(4), image=torch.full((1, 48, 1, 2, 4), math.nan))
    with pytest.raises(ValueError, match="holds 1 frame here"):
        generate(model, PromptSchedule.single(embedding(1)),
                 CascadeConfig(independent_first_frame=True, frames_per_block=2), blocks=3, width=W, height=H,
                 image_latent=image_latent())
