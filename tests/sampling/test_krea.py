"""Krea Realtime 14B's sampler (family krea-realtime) at P1 against a loop written here from its reference
inference code, krea-ai/realtime-video@acf4b7b ``release_server.py`` (``GenerationSession``), on the tiny
DiT and the tiny complete Wan2.1 VAE.

The loop, per block b of N latent frames (E = bN frames before it), with K context frames:
- block 0 starts on an empty cache (``recompute_kv_cache``, 589-596);
- block b >= 1: the cache is emptied and rebuilt by ONE forward over the context frames at t = 0, RoPE
  positions 0..C-1, with the block-causal mask of blocks of N from the context's first frame
  (``_prepare_blockwise_causal_attn_mask``, 598-631), under the prompt the previous block used (the
  cross-attention cache is reset for a new prompt only after it, 662-666). The context
  (``get_clean_context_frames``, 563-576) is frame 0 and the last K - 1 frames of frames 1..E-1 while
  (b - 1)N < K; after that, frames 1..E-1's last K - 1 preceded by the oldest of the last 1 + 4(K - 1)
  decoded video frames, encoded alone by the VAE encoder. Those frames are the server's output video,
  decoded block by block with a causal cache by its own decoder (``load_vae``, 190-225; 719-721:
  ``demo_utils/vae_block3.py``, one latent frame a call, clamped to [-1, 1]). That decoder is the Wan2.1
  one but for its temporal upsamples (``vae_block3.py:46-63``): after a call of one frame, the layer's
  cache holds the current frame twice, except where the last frame it held is exactly 0 (there 0 in the
  first place). Here: diffusers' AutoencoderKLWan (the Wan2.1 decoder and encoder, frame by frame) with
  that cache rule put on its temporal upsamples (:func:`kreas_vae`);
- the block's steps run at positions C..C+N-1 and attend the context and themselves (686-705); the
  step list is read through the shifted table padded with t = 0 (``v2v.py:133-136``), sigma the
  nearest table entry; x0 = x_t - sigma*v; re-noised between steps; no clean pass (708).
The noise follows the engine's documented rule (oracles.py), as for every family.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_models
from oracles import noise_after_step, renoised, starting_noise, x0_from_velocity

from cascade_core.sampling.families import family_config
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.video.latents import LATENT_MEAN, LATENT_STD
from cascade_core.video.reencode import ContextReencoder

pytestmark = pytest.mark.usefixtures("one_thread")
W, H, SEED = 64, 32, 13  # latent 4 x 8: 8 tokens per frame
TPF = (H // 16) * (W // 16)
KREA_STEPS = (1000, 750, 500, 250, 0)
# the re-encoded frame goes through two decoders (ours streamed, diffusers' in one go): float32 rounding
TOLERANCE = 1e-5


def diffusers_vae(vae_sd):
    """diffusers' AutoencoderKLWan with the tiny VAE's weights (names converted by diffusers)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    vae = AutoencoderKLWan(base_dim=8)
    vae.load_state_dict(convert_wan_vae_to_diffusers(dict(vae_sd)), strict=True)
    return vae.eval()


def with_kreas_cache_rule(vae):
    """``vae`` (diffusers') decoding as Krea's server decoder: every temporal upsample, after a call of one
    frame x, keeps (where(the frame it kept last == 0, 0, x), x) rather than (the frame it kept last, x).
    diffusers marks a layer's first call by "Rep" and keeps (0, x) after the second, which Krea's zeros
    give too; its decode runs one latent frame a call, as Krea's (``vae_block3.py:212-224``)."""
    layers = [u.upsamplers[0] for u in vae.decoder.up_blocks if u.upsamplers is not None]
    temporal = [layer for layer in layers if layer.mode == "upsample3d"]
    assert len(temporal) == 2

    def rule(layer):
        plain = layer.forward

        def forward(x, feat_cache=None, feat_idx=None):
            slot = feat_idx[0]
            kept = feat_cache[slot]  # None before the first call, "Rep" before the second, then 2 frames
            out = plain(x, feat_cache=feat_cache, feat_idx=feat_idx)
            if torch.is_tensor(kept) and x.shape[2] == 1:
                feat_cache[slot] = torch.cat([torch.where(kept[:, :, -1:] == 0, 0, x), x], dim=2)
            return out
        return forward

    for layer in temporal:
        layer.forward = rule(layer)
    return vae


def embedding(seed):
    from conftest import TINY
    return torch.randn(6, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae_sd():
    return tiny_models().vae_state_dict("tiny")


@pytest.fixture(scope="module")
def their_vae(vae_sd):
    """Krea's server VAE (module docstring): diffusers' with Krea's cache rule."""
    return with_kreas_cache_rule(diffusers_vae(vae_sd))


def krea_levels(steps, shift=5.0):
    """Timesteps and sigmas: the table t = 1000*sigma(s) on s = linspace(1, 0, 1001)[:-1] padded with 0,
    step st read at entry 1000 - st; sigma = the table entry nearest to t (unpadded)."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigma = shift * s / (1 + (shift - 1) * s)
    padded = torch.cat([sigma * 1000, torch.zeros(1)])
    ts = [padded[1000 - st] for st in steps]
    return ts, [sigma[(sigma * 1000 - t).abs().argmin()] for t in ts]


def reencoded(vae, latents, context):
    """The oldest of the last 1 + 4(K - 1) video frames of ``latents`` (normalised), encoded alone."""
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (LATENT_MEAN, LATENT_STD))
    with torch.no_grad():
        video = vae.decode(latents * std + mean).sample  # [1, 3, 1 + 4(T - 1), H, W], clamped
        frame = video[:, :, -(1 + 4 * (context - 1))].unsqueeze(2)
        return (vae.encode(frame).latent_dist.mode() - mean) / std


def krea_loop(model, vae, prompts, blocks, frames=3, context=3, steps=KREA_STEPS):
    """Latents [1, 16, blocks*frames, H/8, W/8] and model forwards of Krea's loop (module docstring)."""
    ts, sigmas = krea_levels(steps)
    noise = starting_noise(SEED, (1, 16, blocks * frames, H // 8, W // 8))
    text_of = {b: model.encode_prompt(e) for b, e in prompts.items()}
    text = lambda b: text_of[max(s for s in text_of if s <= b)]  # noqa: E731
    latents = torch.empty(1, 16, 0, H // 8, W // 8)
    forwards = 0
    heads = lambda z: z.transpose(1, 2)  # noqa: E731  [1, L, heads, hd] -> [1, heads, L, hd]
    for b in range(blocks):
        end = b * frames
        cache = {}  # layer -> (k, v) [1, tokens, heads, hd] of the context frames
        if b:
            if (b - 1) * frames < context:
                first = latents[:, :, :1]
            else:
                first = reencoded(vae, latents, context)
            ctx = torch.cat([first, latents[:, :, 1:end][:, :, -(context - 1):]], dim=2)
            n = ctx.shape[2]
            block_end = torch.tensor([min((f // frames + 1) * frames, n) for f in range(n)]).repeat_interleave(TPF)
            mask = torch.arange(n).repeat_interleave(TPF)[None, :] < block_end[:, None]  # [query, key]

            def store(layer, q, k, v):
                cache[layer] = (k, v)
                return F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask).transpose(1, 2)

            model(ctx, torch.zeros(1, n), [0], [text(b - 1)], store)
            forwards += 1
        start = ctx.shape[2] if b else 0

        def attend(layer, q, k, v):
            if layer in cache:
                k, v = torch.cat([cache[layer][0], k], 1), torch.cat([cache[layer][1], v], 1)
            return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2)

        x = noise[:, :, end:end + frames]
        for j in range(len(ts)):
            v = model(x, torch.full((1, frames), float(ts[j])), [start], [text(b)], attend)
            forwards += 1
            x0 = x0_from_velocity(x, v, sigmas[j])
            x = renoised(x0, sigmas[j + 1], noise_after_step(SEED, b, j, x0.shape)) if j + 1 < len(ts) else x0
        latents = torch.cat([latents, x], dim=2)
    return latents, forwards


def engine(model, vae_sd, prompts, blocks, cfg, time_cache="krea"):
    reencoder = ContextReencoder.from_state_dict(vae_sd, time_cache=time_cache)
    return generate(model, PromptSchedule(sorted(prompts.items())), cfg, blocks=blocks, width=W, height=H,
                    seed=SEED, context_image=reencoder)


def test_the_family_is_krea_realtimes_reference_settings():
    assert family_config("krea-realtime") == CascadeConfig(steps=KREA_STEPS, kv_recompute=3)


@pytest.mark.parametrize("frames,context,blocks", [(3, 3, 5), (3, 4, 5), (3, 6, 5), (1, 3, 7)])
def test_p1_equals_kreas_loop(model, vae_sd, their_vae, frames, context, blocks):
    """(3, 3): Krea's default; (3, 4): the stale frame 0 then a context of 4 written in two block-causal
    forwards; (3, 6): two context blocks; (1, 3): frame-wise. A prompt switch at block 3."""
    prompts = {0: embedding(1), 3: embedding(2)}
    expected, forwards = krea_loop(model, their_vae, prompts, blocks, frames, context)
    cfg = family_config("krea-realtime", frames_per_block=frames, kv_recompute=context)
    res = engine(model, vae_sd, prompts, blocks, cfg)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    assert res.forwards == forwards + sum(-(-min(b * frames, context) // frames) - 1 for b in range(1, blocks))


def test_what_the_loop_checks_changes_the_video(model, vae_sd, their_vae):
    """Each rule the loop reproduces moves the latents far past the tolerance: a test that can fail."""
    prompts = {0: embedding(1), 3: embedding(2)}
    expected, _ = krea_loop(model, their_vae, prompts, 5)
    others = [CascadeConfig(steps=KREA_STEPS),  # the usual clean passes and a growing cache
              CascadeConfig(steps=KREA_STEPS[:-1], kv_recompute=3),  # no last step at t = 0
              CascadeConfig(steps=KREA_STEPS, kv_recompute=4)]
    for cfg in others:
        assert (engine(model, vae_sd, prompts, 5, cfg).latents - expected).abs().max() > 100 * TOLERANCE, cfg
    # the re-encoded frame decoded under the Wan2.1 rule rather than Krea's server decoder's
    wan = engine(model, vae_sd, prompts, 5, family_config("krea-realtime"), time_cache="wan").latents
    assert (wan - expected).abs().max() > 100 * TOLERANCE


def test_the_decoder_under_kreas_rule_is_kreas_server_decoder(vae_sd, their_vae):
    """Every frame of a video, streamed in blocks of 3 latent frames (as the family's output is), against
    Krea's server decoder; diffusers' plain decoder (the Wan2.1 rule) differs from latent frame 3 on."""
    z = torch.randn(1, 16, 7, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (LATENT_MEAN, LATENT_STD))
    with torch.no_grad():
        kreas = their_vae.decode(z * std + mean).sample
        plain = diffusers_vae(vae_sd).decode(z * std + mean).sample
    decoder = ContextReencoder.from_state_dict(vae_sd, time_cache="krea").decoder
    stream = decoder.stream(None)
    ours = torch.cat([stream.decode(z[:, :, at:at + 3]) for at in (0, 3, 6)], dim=2)
    assert (ours - kreas).abs().max() <= TOLERANCE
    first_changed = 1 + 4 * 2  # the first video frame of latent frame 3
    assert (plain[:, :, :first_changed] - kreas[:, :, :first_changed]).abs().max() <= TOLERANCE
    assert (plain[:, :, first_changed:] - kreas[:, :, first_changed:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_the_context_takes_the_previous_blocks_prompt(model, vae_sd, their_vae):
    """Under block b's own prompt at the context forward the switch block differs: the rule is seen."""
    prompts = {0: embedding(1), 2: embedding(2)}
    res = engine(model, vae_sd, prompts, 3, family_config("krea-realtime"))
    expected, _ = krea_loop(model, their_vae, prompts, 3)
    assert (res.latents - expected).abs().max() <= TOLERANCE
    unswitched, _ = krea_loop(model, their_vae, {0: embedding(1)}, 3)
    assert (res.latents[:, :, 6:] - unswitched[:, :, 6:]).abs().max() > 100 * TOLERANCE


def test_a_blended_switch_equals_kreas_loop_fed_kreas_blend(model, vae_sd, their_vae):
    """Krea's server blend (release_server.py:459-468, 662-666): a prompt arriving before block 1 with
    interp_steps 3 conditions blocks 1, 2, 3 on torch.lerp(old, new, linspace(0, 1, 3)[k]) of the
    zero-padded embeddings, one a block; the engine's switch at block 2 blending over 1 block is that rule."""
    from conftest import TINY

    old, new = (torch.cat([e, torch.zeros(TINY.text_len - len(e), TINY.text_dim)]) for e in (embedding(1), embedding(2)))
    weights = torch.linspace(0, 1, steps=3)
    kreas = {0: embedding(1), **{1 + k: torch.lerp(old, new, w) for k, w in enumerate(weights)}}
    expected, _ = krea_loop(model, their_vae, kreas, 4, frames=1)
    cfg = family_config("krea-realtime", frames_per_block=1)
    res = generate(model, PromptSchedule([(0, embedding(1)), (2, embedding(2))], {2: 1}), cfg, blocks=4, width=W,
                   height=H, seed=SEED, context_image=ContextReencoder.from_state_dict(vae_sd, time_cache="krea"))
    assert (res.latents - expected).abs().max() <= TOLERANCE
    hard = engine(model, vae_sd, {0: embedding(1), 2: embedding(2)}, 4, cfg)
    assert (hard.latents - expected).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("extra,message", [
    (dict(parallel=2), "cannot be combined with parallel 2"),
    (dict(window=12, sink=3), "cannot be combined with window 12, sink 3"),
    (dict(fold_clean=True), "fold-clean"),
    (dict(sink=3), "cannot be combined with sink 3: leave those to the family"),  # not "set a window"
    (dict(attention="bidirectional"), "cannot be combined with bidirectional attention"),
    (dict(independent_first_frame=True), "an independent first frame"),
    (dict(kv_recompute=1), "0 \\(off\\) or the context frames"),
    (dict(kv_recompute=-2), "0 \\(off\\) or the context frames"),
])
def test_settings_a_kv_recompute_does_not_define_are_refused(model, extra, message):
    cfg = family_config("krea-realtime", **extra)
    with pytest.raises(ValueError, match=message):
        generate(model, PromptSchedule.single(embedding(1)), cfg, blocks=2, width=W, height=H)


def test_a_missing_reencoder_a_prefix_and_several_devices_are_refused_before_model_work(model):
    cfg = family_config("krea-realtime")
    prompts = PromptSchedule.single(embedding(1))
    with pytest.raises(ValueError, match="from block 3 on \\(block index 2\\): it needs the VAE"):
        generate(model, prompts, cfg, blocks=3, width=W, height=H)
    assert generate(model, prompts, cfg, blocks=2, width=W, height=H).forwards == 11  # nothing re-encoded yet
    with pytest.raises(ValueError, match="a context prefix is not defined with a KV cache recomputed"):
        generate(model, prompts, cfg, blocks=2, width=W, height=H, prefix=torch.zeros(1, 16, 1, H // 8, W // 8))
    with pytest.raises(ValueError, match="on one device"):
        cfg.check_run(0, devices=2)


def test_the_reencoder_decodes_each_frame_once_and_refuses_another_video(vae_sd, their_vae):
    reencoder = ContextReencoder.from_state_dict(vae_sd, time_cache="krea")
    wan = ContextReencoder.from_state_dict(vae_sd)  # the Wan2.1 rule: Krea's frames from latent frame 3 on
    latents = torch.randn(1, 16, 7, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    for j in (1, 3, 4, 7):
        got = reencoder(latents[:, :, :j])
        assert (got - reencoded(their_vae, latents[:, :, :j], 1)).abs().max() <= TOLERANCE
        assert ((wan(latents[:, :, :j]) - got).abs().max() > 100 * TOLERANCE) == (j > 3)
    assert reencoder.decoded == 7
    with pytest.raises(ValueError, match="has decoded 7 latent frames of this video"):
        reencoder(latents[:, :, :3])
