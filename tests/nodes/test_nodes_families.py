"""Checkpoint families through the nodes: every sampling setting is reachable from the Config node
(and the switch mode from the Prompt Schedule), the loader reads the family off a released file name
and says so, and the sampler runs exactly the engine's run of the effective settings."""
import os
import shutil

import pytest
import torch
from test_nodes import MODELS, NODES, Recorder, run, tiny

from cascade_core.sampling.families import FAMILIES, family_config
from cascade_core.sampling.loop import PromptSchedule, generate
from cascade_core.video.latents import normalized_to_raw

W, H = 64, 32
SETTINGS = ("family", "frames_per_block", "independent_first_frame", "steps", "first_block_steps", "warp", "shift",
            "context_noise", "window", "sink", "parallel", "attention", "flashblock", "kv_recompute")
AUTO = dict(parallel=1, attention="causal", window=-1, sink=-1, steps="auto", shift=0.0, devices="auto",
            attention_backend="auto", flashblock=False)


COPIES = []  # model files this module adds to the stand-in's models folder (removed at its end)


@pytest.fixture(scope="module", autouse=True)
def remove_copies():
    yield
    for path in COPIES:
        os.remove(path)


def loaded_as(name: str):
    """The tiny DiT copied under a released-looking file name, through Load Causal Video Model."""
    folder = os.path.join(MODELS, "diffusion_models")
    COPIES.append(os.path.join(folder, name))
    shutil.copyfile(os.path.join(folder, tiny.DIT_NAME), COPIES[-1])
    (m,) = run("BlockCascadeModelLoader", model_name=name, dtype="fp32", ema="auto")
    return m


def sampler_run(model, settings, prompt, blocks, seed):
    """The sampler node's RAW latents and its start event, for one prompt."""
    with Recorder() as rec:
        latent, _ = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=blocks,
                        seed=seed, positive=prompt)
    (_, start), = rec.events("start")
    return latent["samples"], start


def engine_run(model, prompt, cfg, blocks, seed):
    """The engine's own run of the same prompt and config, as RAW latents (the sampler's output space)."""
    ref = generate(model.model, PromptSchedule.single(prompt[0][0][0]), cfg, blocks=blocks, width=W, height=H,
                   seed=seed)
    return normalized_to_raw(ref.latents.float())


@pytest.fixture(scope="module")
def prompt():
    (a,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[0])
    return a


def test_every_setting_is_an_input_of_the_config_node_and_the_schedule_carries_the_mode():
    ins = NODES["BlockCascadeConfig"].GET_SCHEMA().input_types()
    names = {**ins["required"], **ins.get("optional", {})}
    assert set(SETTINGS) <= set(names)
    families = names["family"][0]
    assert families[0] == "auto" and set(FAMILIES) == set(families[1:])
    for name in ("frames_per_block", "first_block_steps", "warp", "independent_first_frame"):
        assert names[name][1]["tooltip"], name
    assert "Causal Forcing" in names["frames_per_block"][1]["tooltip"]
    assert "CausVid" in names["warp"][1]["tooltip"] and "LongLive" in names["window"][1]["tooltip"]
    assert "Krea Realtime" in names["kv_recompute"][1]["tooltip"]
    sched = NODES["BlockCascadePromptSchedule"].GET_SCHEMA().input_types()
    assert sched["optional"]["switch_mode"][0] == ["auto", "none", "recache"]


def test_the_loader_reads_the_family_and_auto_uses_it(prompt):
    model = loaded_as("causal_forcing-framewise.safetensors")
    assert model.family[0] == "causal-forcing-framewise" and "names it" in model.family[1]
    (settings,) = run("BlockCascadeConfig", **AUTO)
    samples, start = sampler_run(model, settings, prompt, 4, 5)
    assert samples.shape[2] == 4  # frame-wise: one latent frame a block
    assert torch.equal(samples, engine_run(model, prompt, family_config("causal-forcing-framewise"), 4, 5))
    assert start["settings"].startswith("causal-forcing-framewise (assumed: the checkpoint path")
    assert start["frames_total"] == 13  # 1 + 4 * (4 - 1) video frames


def test_explicit_widgets_win_over_the_family(prompt):
    model = loaded_as("causvid_autoregressive.safetensors")
    (settings,) = run("BlockCascadeConfig", **{**AUTO, "shift": 6.0, "first_block_steps": "1000,500",
                                               "independent_first_frame": "on"})
    samples, _ = sampler_run(model, settings, prompt, 3, 2)
    cfg = family_config("causvid", shift=6.0, first_block_steps=(1000, 500), independent_first_frame=True)
    assert torch.equal(samples, engine_run(model, prompt, cfg, 3, 2))
    # a family chosen on the node wins over the file name
    (chosen,) = run("BlockCascadeConfig", **{**AUTO, "family": "self-forcing"})
    assert chosen.config_for("causvid")[0] == family_config("self-forcing")


def test_a_reward_forcing_file_runs_with_its_ema_sink_and_says_so(prompt):
    model = loaded_as("reward_forcing.safetensors")
    (settings,) = run("BlockCascadeConfig", **AUTO)
    samples, start = sampler_run(model, settings, prompt, 4, 2)
    assert torch.equal(samples, engine_run(model, prompt, family_config("reward-forcing"), 4, 2))
    text = start["settings"]
    assert text.startswith("reward-forcing (assumed") and "EMA sink 0.999; RoPE at slots" in text


def test_a_longlive_schedule_recaches_at_its_switches(prompt):
    model = loaded_as("longlive_base.safetensors")
    (e1,) = run("BlockCascadeEmbedsLoader", embeds=tiny.EMBEDS_NAMES[1])
    (first,) = run("BlockCascadePromptSchedule", conditioning=prompt, start_block=0)
    (both,) = run("BlockCascadePromptSchedule", conditioning=e1, start_block=4, previous=first)
    (settings,) = run("BlockCascadeConfig", **AUTO)
    schedule = PromptSchedule([(0, prompt[0][0][0]), (4, e1[0][0][0])])
    results = {}
    for mode in ("auto", "none"):
        (sched,) = run("BlockCascadePromptSchedule", conditioning=e1, start_block=4, previous=first,
                       switch_mode=mode)
        with Recorder() as rec:
            results[mode], _ = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H,
                                   blocks=6, seed=3, schedule=sched)
        assert ("switch recache" if mode == "auto" else "switch none") in rec.events("start")[0][1]["settings"]
    for mode, key in (("recache", "auto"), ("none", "none")):
        ref = generate(model.model, schedule, family_config("longlive", switch_mode=mode), blocks=6, width=W,
                       height=H, seed=3)
        assert torch.equal(results[key]["samples"], normalized_to_raw(ref.latents.float())), mode
    assert both.switch_mode == "auto"


def test_one_switch_mode_a_schedule_and_an_unlimited_window_without_the_familys_sink(prompt):
    (first,) = run("BlockCascadePromptSchedule", conditioning=prompt, start_block=0, switch_mode="none")
    (same,) = run("BlockCascadePromptSchedule", conditioning=prompt, start_block=2, previous=first)
    assert same.switch_mode == "none"
    with pytest.raises(ValueError, match="a schedule has one mode"):
        run("BlockCascadePromptSchedule", conditioning=prompt, start_block=3, previous=same, switch_mode="recache")
    (settings,) = run("BlockCascadeConfig", **{**AUTO, "family": "longlive", "window": 0})
    assert (settings.cascade.window, settings.cascade.sink) == (None, 0)


def test_krea_read_off_the_file_name_runs_as_the_engine_with_the_graphs_vae_reencoding(prompt):
    from safetensors.torch import load_file
    from test_nodes import WRITTEN

    from cascade_core.video.reencode import ContextReencoder
    from cascade_core.video.vae_encode import load_encoder

    sd = load_file(WRITTEN["vae"])

    class CoreVAE:  # what VAELoader returns, as far as the pack uses it: its weights, and its encoder
        latent_channels = 16                                      # (here diffusers', on the same weights)
        encoder = load_encoder(WRITTEN["vae"])

        def get_sd(self):
            return sd

        def encode(self, pixels):  # [B, H, W, 3] in 0..1 -> raw latents (the mean), as core's
            self.encoded.append(pixels.shape)
            video = pixels.movedim(-1, 0).unsqueeze(0) * 2 - 1  # [1, 3, B, H, W]
            return self.encoder.encode(video).latent_dist.mode()

    model = loaded_as("krea-realtime-video-14b.safetensors")
    (settings,) = run("BlockCascadeConfig", **AUTO)
    with pytest.raises(ValueError, match="vae: a KV cache recomputed every block .* from block 3 on .*: connect the "
                                         "Wan2.1 VAE .* or use at most 2 blocks"):
        sampler_run(model, settings, prompt, 3, 1)
    assert torch.equal(sampler_run(model, settings, prompt, 2, 1)[0],  # blocks 0 and 1 re-encode nothing
                       engine_run(model, prompt, family_config("krea-realtime"), 2, 1))
    vae = CoreVAE()
    vae.encoded = []
    with Recorder() as rec:
        latent, images = run("BlockCascadeSampler", model=model, config=settings, width=W, height=H, blocks=3,
                             seed=1, positive=prompt, vae=vae)
    ref = generate(model.model, PromptSchedule.single(prompt[0][0][0]), family_config("krea-realtime"), blocks=3,
                   width=W, height=H, seed=1, context_image=ContextReencoder.from_state_dict(sd, time_cache="krea"))
    assert (latent["samples"] - normalized_to_raw(ref.latents.float())).abs().max() <= 1e-5
    assert vae.encoded == [(1, H, W, 3)]  # block 2's first context frame, through the graph's VAE
    assert images.shape[0] == 1 + 4 * 8
    text = rec.events("start")[0][1]["settings"]
    assert text.startswith("krea-realtime (assumed: the checkpoint path") and "rebuilt every block from 3" in text
    start = rec.events("start")[0][1]
    assert (start["stages"], start["clean_pass"]) == (5, False)  # five steps, no clean pass


@pytest.mark.parametrize("widgets,message", [
    (dict(steps="auto", first_block_steps="250,500"), "first block steps must strictly decrease"),
    (dict(family="longlive", window=0, sink=3), "a sink (3 frames) is kept only inside a local window"),
    (dict(frames_per_block=4, window=3, sink=0), "at least sink + one block = 4"),
    (dict(family="causvid", parallel=5), "parallelism must lie in 1..4"),
    (dict(family="reward-forcing", parallel=2), "need one block in flight"),
    (dict(warp="maybe"), "warp must be one of auto, on, off"),
])
def test_bad_family_settings_are_one_clear_line(widgets, message):
    with pytest.raises(ValueError) as err:
        run("BlockCascadeConfig", **{**AUTO, **widgets})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rolling_forcing_from_the_config_node_runs_its_joint_window(prompt):
    model = loaded_as("rolling_forcing_dmd.safetensors")
    (settings,) = run("BlockCascadeConfig", **{**AUTO, "parallel": 0, "attention": "auto"})
    samples, start = sampler_run(model, settings, prompt, 7, 4)
    assert torch.equal(samples, engine_run(model, prompt, family_config("rolling-forcing"), 7, 4))
    assert "P6 bidirectional" in start["settings"]
