"""The README's main job and the CLI's contract: JSON summary, reproducible noise, one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_models

from cascade_core.cli.command import main
from cascade_core.weights.safe_io import read_tensor_file, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--width", "64", "--height", "32", "--blocks", "2", "--quiet", "--dtype", "fp32", "--device", "cpu"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cascade_core", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_main_job_runs_and_writes_latents(tmp_path):
    out = tmp_path / "lat.safetensors"
    r = run_cli("generate", "--blocks", "2", "--width", "128", "--height", "64", "--latents-out", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["model"].startswith("built-in untrained")
    assert summary["blocks"] == 2 and summary["ticks"] == summary["forwards"] == 10
    assert summary["latent_frames"] == 6 and "video_frames" not in summary  # no VAE: no video was made
    # which attention ran: auto, and on the CPU nothing measured (torch's own dispatch)
    assert summary["attention_backend"] == "auto" and summary["attention_kernels"] == {}
    assert "2/2 [" in r.stderr and "block" in r.stderr  # the progress bar (tqdm)
    lat = read_tensor_file(str(out))["latents"]
    assert list(lat.shape) == summary["latent_shape"] == [1, 16, 6, 8, 16]


def test_noise_file_reproduces_a_run_exactly(tmp_path, capsys):
    noise = torch.randn(1, 16, 6, 4, 8)
    save_safetensors({"noise": noise}, str(tmp_path / "noise.safetensors"))
    outs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        path = str(tmp_path / f"{name}.safetensors")
        assert main(["generate", *SMALL, "--seed", str(seed), "--noise", str(tmp_path / "noise.safetensors"),
                     "--latents-out", path]) == 0
        outs.append(read_tensor_file(path)["latents"])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # the seed still drives the re-noising between steps


def test_parallel_levels_from_the_cli(tmp_path):
    for p in (1, 5):
        assert main(["generate", *SMALL, "--parallel", str(p), "--latents-out", str(tmp_path / f"{p}.safetensors")]) == 0
    a, b = (read_tensor_file(str(tmp_path / f"{p}.safetensors"))["latents"] for p in (1, 5))
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("args,message", [
    (["--width", "250"], "width must be a positive multiple of 16"),
    (["--blocks", "-2"], "--blocks must be >= 1 (0: endless, until Ctrl-C), got -2"),
    (["--parallel", "6"], "parallelism must lie in 1..5"),
    (["--window", "2"], "window must be 0 (unlimited) or at least sink + one block"),
    (["--steps", "500,750"], "strictly decrease"),
    (["--attention", "sideways"], "invalid choice"),
    (["--device", "cuda:7"], "not present"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert main(["generate", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    wrong = tmp_path / "wrong.safetensors"
    save_safetensors({"a": torch.zeros(2), "b": torch.zeros(2)}, str(wrong))
    for flag, path, message in (("--checkpoint", junk, "corrupt"), ("--embeds", wrong, "exactly one tensor"),
                                ("--noise", tmp_path / "missing.safetensors", "no such file")):
        assert main(["generate", *SMALL, flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and path.name in err, err


def test_vae_streams_frames_into_an_mp4_and_pngs(tmp_path):
    import av

    from cascade_core.video.taew import TinyWanDecoder

    for name, weights in (("wan", tiny_models().vae_state_dict("tiny")),
                          ("taew", TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict())):
        vae = tmp_path / f"{name}.safetensors"
        save_safetensors(weights, str(vae))
        video, pngs = tmp_path / f"{name}.mp4", tmp_path / f"{name}_frames"
        r = run_cli("generate", *SMALL, "--vae", str(vae), "--video-out", str(video), "--frames-dir", str(pngs))
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["video_frames"] == 21 and summary["latent_frames"] == 6
        assert sorted(os.listdir(pngs)) == [f"{i:05d}.png" for i in range(21)]
        with av.open(str(video)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 21 and (frames[0].width, frames[0].height) == (64, 32)


def test_video_flags_need_a_vae(capsys):
    assert main(["generate", *SMALL, "--video-out", "x.mp4"]) == 2
    assert "need --vae" in capsys.readouterr().err


def _summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_family_fills_the_settings_and_explicit_options_win(capsys):
    assert main(["generate", *SMALL, "--family", "causvid"]) == 0
    s = _summary(capsys)
    assert s["family"] == "causvid" and s["family_assumed"] is None
    assert s["settings"]["steps"] == [1000, 757, 522] and s["settings"]["warp"] is False
    assert s["settings"]["shift"] == 8.0 and s["forwards"] == 2 * 4
    assert main(["generate", *SMALL, "--family", "causvid", "--shift", "6", "--warp", "on",
                 "--frames-per-block", "2", "--independent-first-frame", "--first-block-steps", "1000,500,250,100"]) == 0
    s = _summary(capsys)["settings"]
    assert (s["shift"], s["warp"], s["steps"], s["frames_per_block"]) == (6.0, True, [1000, 757, 522], 2)
    assert s["independent_first_frame"] and s["first_block_steps"] == [1000, 500, 250, 100]


def test_an_unlimited_window_drops_the_familys_sink_and_none_its_block0_schedule(capsys):
    assert main(["generate", *SMALL, "--family", "longlive", "--window", "0"]) == 0
    s = _summary(capsys)["settings"]
    assert (s["window"], s["sink"], s["switch_mode"]) == (None, 0, "recache")
    assert main(["generate", *SMALL, "--family", "causal-forcing-framewise-1step", "--first-block-steps", "none"]) == 0
    s = _summary(capsys)
    assert s["settings"]["first_block_steps"] is None and s["forwards"] == 2 * 2


def tiny_checkpoint_at(tmp_path, name: str) -> str:
    """The tiny DiT written under ``name`` (a released-looking path, folders included) in tmp_path."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tiny_models().tiny_dit_state_dict(), str(path))
    return str(path)


def test_krea_read_off_the_path_runs_with_its_kv_recompute_and_needs_the_vae_from_block_2(tmp_path, capsys):
    path = tiny_checkpoint_at(tmp_path, "checkpoints/krea-realtime-video-14b.safetensors")
    assert main(["generate", *SMALL, "--checkpoint", path]) == 0  # blocks 0 and 1: no frame re-encoded yet
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert "family krea-realtime assumed" in err and s["family"] == "krea-realtime"
    assert s["settings"]["kv_recompute"] == 3 and s["settings"]["steps"] == [1000, 750, 500, 250, 0]
    assert s["forwards"] == 2 * 5 + 1  # 5 steps a block, no clean pass, one context forward before block 1
    three = [*SMALL, "--checkpoint", path, "--blocks", "3"]
    assert main(["generate", *three]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "from block 3 on (block index 2): pass --vae FILE (the complete Wan2.1 VAE), or at most --blocks 2" in err, err
    vae = tmp_path / "vae.safetensors"
    save_safetensors(tiny_models().vae_state_dict("tiny"), str(vae))
    video = tmp_path / "krea.mp4"
    from cascade_core.video import reencode
    from cascade_core.weights import safe_io

    reads, read = [], safe_io.read_weights
    counted = lambda p, *a, **k: reads.append(p) or read(p, *a, **k)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:  # the re-encoder's decoder also decodes the video's frames
        mp.setattr(safe_io, "read_weights", counted)
        mp.setattr(reencode, "read_weights", counted)
        assert main(["generate", *three, "--vae", str(vae), "--video-out", str(video)]) == 0
    assert reads.count(str(vae)) == 1, reads
    s = _summary(capsys)
    assert s["forwards"] == 3 * 5 + 2 and s["latent_frames"] == 9 and s["video_frames"] == 1 + 4 * 8
    assert main(["generate", *three, "--vae", str(vae), "--kv-recompute", "0"]) == 0  # explicit settings win
    assert _summary(capsys)["forwards"] == 3 * 6  # 5 steps and a clean pass a block
    assert main(["generate", *three, "--vae", str(vae), "--parallel", "2"]) == 2
    assert "cannot be combined with parallel 2" in capsys.readouterr().err


def test_framewise_family_with_a_first_block_schedule(capsys):
    assert main(["generate", *SMALL, "--blocks", "4", "--family", "causal-forcing-framewise-1step"]) == 0
    s = _summary(capsys)
    assert s["latent_frames"] == 4 and s["forwards"] == 5 + 3 * 2  # block 0: 4 steps + clean; then 1 + clean


def test_reward_forcing_runs_with_its_ema_sink_and_slot_positions(capsys):
    assert main(["generate", *SMALL, "--blocks", "4", "--family", "reward-forcing"]) == 0  # block 3 drops 1
    s = _summary(capsys)["settings"]
    assert (s["window"], s["sink"], s["rope_positions"], s["sink_ema"]) == (9, 3, "slots", 0.999)


def test_the_family_read_off_the_checkpoint_path_is_said(tmp_path, capsys):
    path = tiny_checkpoint_at(tmp_path, "framewise/causal_forcing.safetensors")
    assert main(["generate", *SMALL, "--checkpoint", path]) == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out.strip().splitlines()[-1])
    assert s["family"] == "causal-forcing-framewise" and s["settings"]["frames_per_block"] == 1
    assert "note: family causal-forcing-framewise assumed" in captured.err and "framewise" in s["family_assumed"]
    assert main(["generate", *SMALL, "--checkpoint", path, "--family", "self-forcing"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and _summary_of(captured)["settings"]["frames_per_block"] == 3


def _summary_of(captured):
    return json.loads(captured.out.strip().splitlines()[-1])


def test_prompt_switches_from_files_and_their_modes(tmp_path, capsys):
    paths = []
    for i in (1, 2):
        paths.append(str(tmp_path / f"p{i}.safetensors"))
        save_safetensors({"e": torch.randn(5, 4096, generator=torch.Generator().manual_seed(i))}, paths[-1])
    switches = ["--switch", f"2:{paths[0]}", "--switch", f"3:{paths[1]}"]
    base = ["generate", *SMALL, "--blocks", "4", "--window", "6", "--sink", "3"]
    assert main([*base, *switches, "--switch-mode", "none"]) == 0
    none = _summary(capsys)
    assert main([*base, *switches, "--switch-mode", "recache"]) == 0
    recache = _summary(capsys)
    assert none["prompt_switches"] == [2, 3] and none["forwards"] == 4 * 5
    assert recache["forwards"] == 4 * 5 + 2 and recache["settings"]["switch_mode"] == "recache"
    assert main(["generate", *SMALL, "--blocks", "4", "--family", "longlive", *switches]) == 0
    assert _summary(capsys)["forwards"] == 4 * 5 + 2  # LongLive re-caches by default


def test_a_switch_may_blend_over_blocks(tmp_path, capsys):
    """--switch BLOCK~N:FILE: the engine's blended switch (sampling.blend) on the CLI's model, prompt and seed;
    ~0 is the hard switch bit for bit; with recache every block whose conditioning changes re-caches."""
    from cascade_core.cli.inputs import BUILTIN
    from cascade_core.model.dit import WanModel
    from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate

    path = str(tmp_path / "p.safetensors")
    other = torch.randn(5, 4096, generator=torch.Generator().manual_seed(1))
    save_safetensors({"e": other}, path)
    base = ["generate", *SMALL, "--blocks", "3", "--seed", "3"]
    out = {}
    for spec in ("1", "1~0", "1~1"):
        assert main([*base, "--switch", f"{spec}:{path}", "--latents-out", str(tmp_path / f"{spec}.safetensors")]) == 0
        out[spec] = read_tensor_file(str(tmp_path / f"{spec}.safetensors"))["latents"], _summary(capsys)
    assert torch.equal(out["1"][0], out["1~0"][0]) and "prompt_blend_blocks" not in out["1~0"][1]
    assert out["1~1"][1]["prompt_blend_blocks"] == [1]
    first = torch.randn(16, 4096, generator=torch.Generator().manual_seed(3))  # the CLI's prompt without --embeds
    ref = generate(WanModel.random(BUILTIN, seed=0), PromptSchedule([(0, first), (1, other)], {1: 1}), CascadeConfig(),
                   blocks=3, width=64, height=32, seed=3)
    assert torch.equal(out["1~1"][0], ref.latents) and not torch.equal(out["1~1"][0], out["1"][0])
    assert main([*base, "--switch", f"1~1:{path}", "--switch-mode", "recache"]) == 0
    assert _summary(capsys)["forwards"] == 3 * 5 + 2  # blocks 1 (blended) and 2 (the new prompt alone)


@pytest.mark.parametrize("args,message", [
    (["--switch", "2~65:a.safetensors"], "blend_blocks must be an int in 0..64"),
    (["--switch", "1~x:a cat"], "BLOCK~N:... to blend the prompts over N blocks"),
    (["--switch", "x:a.safetensors"], "expected BLOCK:FILE"),
    (["--switch", "5:a text"], "the block must lie in 1..1"),
    (["--switch", "1:missing.safetensors"], "no such file"),
    (["--switch", "1:a cat"], "--switch BLOCK:TEXT needs --text-encoder"),
    (["--switch-mode", "recache"], "needs a --switch"),
    (["--family", "longlive", "--window", "0", "--sink", "3"], "a sink (3 frames) is kept only inside a local window"),
    (["--family", "krea-realtime", "--window", "9"], "cannot be combined with window 9"),
    (["--family", "krea-realtime", "--blocks", "3"], "from block 3 on (block index 2): pass --vae FILE"),
    (["--family", "krea-realtime", "--image", "a.png"], "a context prefix is not defined with a KV cache recomputed"),
    (["--family", "reward-forcing", "--parallel", "2"], "need one block in flight"),
    (["--family", "reward-forcing", "--window", "10"], "a window that ends on a block"),
    (["--first-block-steps", "250,500"], "strictly decrease"),
    (["--independent-first-frame", "--parallel", "3", "--attention", "bidirectional"], "blocks of one size"),
    (["--independent-first-frame", "--frames-per-block", "1"], "does nothing"),
    (["--switch", "1:a cat", "--switch-mode", "recache", "--parallel", "2"], "needs parallel 1"),
    (["--switch", "1:a cat", "--family", "longlive", "--fold-clean"], "turn fold-clean off"),
])
def test_bad_family_settings_give_one_line(args, message, capsys):
    assert main(["generate", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_kv_recompute_on_several_devices_is_refused_before_the_workers_start(capsys):
    small = [a for a in SMALL if a not in ("--device", "cpu")]
    assert main(["generate", *small, "--family", "krea-realtime", "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs one block at a time on one device" in err, err


def test_a_recache_on_several_devices_is_refused_before_the_workers_start(capsys):
    small = [a for a in SMALL if a not in ("--device", "cpu")]
    assert main(["generate", *small, "--switch", "1:a cat", "--family", "longlive", "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs on one device for now" in err, err


def test_rolling_forcing_from_the_cli_runs_its_joint_window(capsys):
    assert main(["generate", *SMALL, "--blocks", "7", "--family", "rolling-forcing"]) == 0
    s = _summary(capsys)
    assert s["parallel"] == 6 and s["settings"]["rolling_window"] and s["settings"]["attention"] == "bidirectional"
    assert s["forwards"] == 7 + 5  # one forward a tick: blocks + steps


# ---- a start image, a continuation (--image, --continue) -------------------------------------

def direct_run(prefix, seed=0, blocks=2, **settings):
    """The oracle of a CLI run after a prefix: the CLI's built-in model, prompt and family settings
    through generate(prefix=...) here, the generated frames only."""
    from cascade_core.cli.inputs import BUILTIN
    from cascade_core.model.dit import WanModel
    from cascade_core.sampling.families import family_config
    from cascade_core.sampling.loop import PromptSchedule, generate

    model = WanModel.random(BUILTIN, seed=0)
    embeds = torch.randn(16, BUILTIN.text_dim, generator=torch.Generator().manual_seed(seed))
    return generate(model, PromptSchedule([(0, embeds)]), family_config("self-forcing", **settings), blocks=blocks,
                    width=64, height=32, seed=seed, prefix=prefix, include_prefix=False).latents


def test_a_start_image_is_the_first_latent_frame_then_the_blocks_generated_after_it(tmp_path, capsys):
    import av
    from PIL import Image
    from test_vae_encode import as_pixels, diffusers_vae, noise_image, their_latents

    sd = tiny_models().vae_state_dict("tiny")
    save_safetensors(sd, str(tmp_path / "vae.safetensors"))
    image = noise_image(48, 64, seed=3)  # cover scale 1 onto 64 x 32: rows 8..39
    Image.fromarray(image).save(tmp_path / "start.png")
    out, video = tmp_path / "out.safetensors", tmp_path / "out.mp4"
    assert main(["generate", *SMALL, "--image", str(tmp_path / "start.png"), "--vae", str(tmp_path / "vae.safetensors"),
                 "--latents-out", str(out), "--video-out", str(video)]) == 0
    s = _summary(capsys)
    image_latent = their_latents(diffusers_vae(sd), as_pixels(image[None, 8:40]))
    latents = read_tensor_file(str(out))["latents"]
    assert latents.shape == (1, 16, 1 + 6, 4, 8) and s["latent_frames"] == 7 and s["prefix_frames"] == 1
    assert (s["prefix_source"], s["prefix_file"]) == ("image", str(tmp_path / "start.png"))
    torch.testing.assert_close(latents[:, :, :1], image_latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(latents[:, :, 1:], direct_run(image_latent), atol=1e-4, rtol=0)
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == s["video_frames"] == 1 + 4 * 6


@pytest.mark.parametrize("options,context", [(["--context-frames", "2"], 2), (["--window", "6"], 6), ([], 8),
                                             (["--context-frames", "20"], 8)])
def test_continuing_latents_keeps_them_all_then_the_frames_generated_after_their_context(tmp_path, capsys,
                                                                                         options, context):
    given = torch.randn(1, 16, 8, 4, 8, generator=torch.Generator().manual_seed(4))
    save_safetensors({"latents": given}, str(tmp_path / "given.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["generate", *SMALL, "--continue", str(tmp_path / "given.safetensors"), *options,
                 "--latents-out", str(out)]) == 0
    captured = capsys.readouterr()
    s = _summary_of(captured)
    latents = read_tensor_file(str(out))["latents"]
    assert latents.shape == (1, 16, 8 + 6, 4, 8) and s["prefix_frames"] == context and s["prefix_source"] == "latents"
    assert s["given_frames"] == 8
    cut = "note: 20 context frames asked for, the video has 8 latent frames: all 8 are the context"
    assert (cut in captured.err) == ("20" in options), captured.err
    assert torch.equal(latents[:, :, :8], given)
    settings = {"window": 6} if "--window" in options else {}
    assert torch.equal(latents[:, :, 8:], direct_run(given[:, :, 8 - context:], **settings))


def test_continuing_an_mp4_encodes_its_last_frames_as_the_context(tmp_path, capsys):
    from test_vae_encode import write_mp4

    save_safetensors(tiny_models().vae_state_dict("tiny"), str(tmp_path / "vae.safetensors"))
    frames = np.random.default_rng(5).integers(0, 256, (11, 32, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "given.mp4", frames)
    out = tmp_path / "out.safetensors"
    for asked, context in (("2", 2), ("0", 3)):  # 0 without a window: every 1 + 4k of its last frames, 9 of 11
        assert main(["generate", *SMALL, "--continue", str(tmp_path / "given.mp4"), "--context-frames", asked,
                     "--vae", str(tmp_path / "vae.safetensors"), "--latents-out", str(out),
                     "--video-out", str(tmp_path / "out.mp4")]) == 0
        s = _summary(capsys)
        latents = read_tensor_file(str(out))["latents"]
        assert latents.shape == (1, 16, context + 6, 4, 8) and s["prefix_frames"] == context
        assert s["prefix_source"] == "video" and s["video_frames"] == 1 + 4 * (context + 6 - 1)
        torch.testing.assert_close(latents[:, :, context:], direct_run(latents[:, :, :context]), atol=1e-4, rtol=0)


def test_a_prefix_changes_the_config_with_a_note(tmp_path, capsys):
    save_safetensors({"latents": torch.randn(1, 16, 4, 4, 8)}, str(tmp_path / "given.safetensors"))
    assert main(["generate", *SMALL, "--family", "causal-forcing-framewise-1step",
                 "--continue", str(tmp_path / "given.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "note: block 0's own step list is not used" in captured.err
    s = _summary_of(captured)
    # the 4 context frames as 4 frame-wise blocks, then 2 blocks of 1 step + a clean pass
    assert s["settings"]["first_block_steps"] is None and s["forwards"] == 4 + 2 * 2


def test_continuing_fp8_latents_runs(tmp_path, capsys):
    save_safetensors({"latents": torch.randn(1, 16, 3, 4, 8).to(torch.float8_e4m3fn)}, str(tmp_path / "g.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["generate", *SMALL, "--continue", str(tmp_path / "g.safetensors"), "--latents-out", str(out)]) == 0
    assert read_tensor_file(str(out))["latents"].shape[2] == 3 + 6


@pytest.mark.parametrize("space,fps", [("Wan2.1", 16), ("Wan2.2", 24)])
def test_mp4s_play_at_the_frame_rate_of_the_models_latent_space(tmp_path, capsys, space, fps):
    """Wan2.1 models' videos are 16 fps, Wan2.2-TI2V-5B's (LongLive 2.0's) 24: the video, the live preview and
    ``decode``'s MP4 all play at the rate of the run's latent space (the tiny files of make_tiny_models)."""
    import av

    tiny = tiny_models()
    dit, vae, preview = (str(tmp_path / f"{n}.safetensors") for n in ("dit", "vae", "preview"))
    if space == "Wan2.1":
        save_safetensors(tiny.tiny_dit_state_dict(), dit)
        weights, family = tiny.vae_state_dict("tiny"), []
    else:
        save_safetensors(tiny.tiny_dit_state_dict(cfg=tiny.TINY_WAN22_DIT), dit)
        weights, family = tiny.wan22_vae_state_dict(), ["--family", "longlive-2", "--blocks", "1"]
    for path in (vae, preview):  # the same decoder twice: --preview-vae needs another file than --vae
        save_safetensors(weights, path)
    video, latents = str(tmp_path / "video.mp4"), str(tmp_path / "latents.safetensors")
    assert main(["generate", *SMALL, *family, "--compile", "off", "--checkpoint", dit, "--vae", vae,
                 "--preview-vae", preview, "--video-out", video, "--latents-out", latents]) == 0
    assert space in _summary(capsys)["model"]
    assert main(["decode", "--latents", latents, "--vae", vae, "--video-out", str(tmp_path / "decoded.mp4"),
                 "--quiet"]) == 0
    for name in ("video.mp4", "video.preview.mp4", "decoded.mp4"):
        with av.open(str(tmp_path / name)) as container:
            assert container.streams.video[0].average_rate == fps, name


def test_help_describes_the_command_in_whole_sentences(capsys):
    """The top-level --help line is complete (not a docstring cut mid-sentence) and names every kind of run; the
    size options tell Wan2.2's 32-pixel rule."""
    from cascade_core.cli.parser import build_parser

    parser = build_parser()
    for words in ("text-to-video", "image-to-video (--image)", "video-to-video (--video-in)", "Wan2.2"):
        assert words in parser.description, words
    shown = "".join(parser.format_help().split())  # wrapped at any space or hyphen
    assert parser.description.endswith(".") and "".join(parser.description.split()) in shown
    generate = parser._subparsers._group_actions[0].choices["generate"]
    helps = {a.dest: a.help for a in generate._actions}
    assert "32 for a Wan2.2 model" in helps["width"] and "32 for a Wan2.2 model" in helps["height"]
