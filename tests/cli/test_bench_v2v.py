"""The video-to-video speed tool on the CPU (tiny shapes): what it feeds the engine, what each row counts, what it
refuses; and the text-to-video tool's 5B / --family settings. Not its timing."""
import json

import pytest
import torch

from cascade_core.cli import bench, bench_v2v
from cascade_core.cli.bench_args import SIZES, parse_arguments, run_config
from cascade_core.model.dit import WanModel
from cascade_core.sampling.config import PromptSchedule
from cascade_core.sampling.families import family_config
from cascade_core.sampling.v2v import video_to_video
from cascade_core.sampling.v2v_config import V2VConfig, VideoChunk
from cascade_core.video.vae import WanVAEDecoder
from cascade_core.video.vae_encode import StreamEncoder


def rows(capsys, *args):
    bench_v2v.main(["--size", "tiny", "--width", "32", "--height", "32", "--chunks", "3", "--runs", "1", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_every_level_reports_the_whole_video_and_one_latency_per_chunk(capsys, one_thread):
    out = rows(capsys, "--parallel", "1,2")
    dit = [r for r in out if r["figure"] == "v2v_dit"]
    ends = [r for r in out if r["figure"] == "v2v_end_to_end"]
    assert [(r["parallel"], r["run"]) for r in dit] == [(p, r) for p in (1, 2) for r in (-1, 0)]
    assert [(r["parallel"], r["run"]) for r in ends] == [(p, r) for p in (1, 2) for r in (-1, 0)]
    for r in dit + ends:  # 3 chunks: 5 + 4 + 4 video frames
        assert r["chunks"] == 3 and r["frames"] == 13 and r["fps"] > 0
    # P1: a chunk per two ticks (2 steps); P2: chunk b's last step beside chunk b+1's first (chunk 0 alone)
    assert {r["ticks"] for r in dit if r["parallel"] == 1} == {6} and {r["ticks"] for r in dit if r["parallel"] == 2} \
        == {4}
    # at P = steps = 2 the cascade computes P1's algorithm: equal up to the rounding of batching
    assert all(r["rel_l2_vs_first_level"] == 0.0 for r in dit if r["parallel"] == 1)
    assert all(r["rel_l2_vs_first_level"] < 1e-5 for r in dit if r["parallel"] == 2)
    for r in ends:
        assert 0 < r["first_chunk_latency_ms"] and set(r["latency"]) == {"median_ms", "mean_ms", "p90_ms", "max_ms"}
        assert 0 < r["latency"]["median_ms"] <= r["latency"]["max_ms"] <= 1000 * r["seconds"]
    for figure in ("v2v_encode", "v2v_decode"):
        assert [r["run"] for r in out if r["figure"] == figure] == [-1, 0]


def test_end_to_end_restyles_the_video_as_encoding_denoising_and_decoding_it_in_turn(one_thread):
    """The frames the end-to-end run hands out equal the test's own pipeline: the video cut 5, 4, 4 frames, each
    cut through the streaming encoder, the engine on those chunks, the result decoded chunk by chunk."""
    device, chunks = torch.device("cpu"), 3
    model = WanModel.random(SIZES["tiny"], seed=0)
    prompts = PromptSchedule.single(torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(5)))
    encoder = bench_v2v.random_encoder(device, 8, torch.float32)
    decoder = WanVAEDecoder(dim=8).eval()
    video = bench_v2v.synthetic_video(1 + 4 * chunks, 32, 32, device, torch.float32)
    cfg = V2VConfig(parallel=2)
    timed = bench_v2v.end_to_end(model, prompts, cfg, encoder, decoder, video, chunks, device, keep=True)

    encode = StreamEncoder(encoder)
    cuts = [video[:, :, 0:5], video[:, :, 5:9], video[:, :, 9:13]]
    mine = video_to_video(model, prompts, cfg, [VideoChunk(encode(px), px) for px in cuts], seed=0, chunks=chunks)
    stream = decoder.stream(None)
    frames = torch.cat([stream.decode(mine.latents[:, :, 0:2])] +
                       [stream.decode(mine.latents[:, :, k:k + 1]) for k in (2, 3)], 2)
    assert torch.equal(timed["video"], frames)
    assert timed["frames"] == [5, 4, 4] and len(timed["t_in"]) == len(timed["t_out"]) == chunks
    assert all(i < o for i, o in zip(timed["t_in"], timed["t_out"]))


def test_a_runs_row_from_its_times():
    """Chunks in at 0, 1, 2, 3 s and out at 0.5, 1.7, 2.9, 3.2 s (5, 4, 4, 4 frames): the row's figures by hand."""
    timed = {"t_in": [0.0, 1.0, 2.0, 3.0], "t_out": [0.5, 1.7, 2.9, 3.2], "frames": [5, 4, 4, 4],
             "result": type("R", (), {"ticks": 8})()}
    row = bench_v2v.latency_row(1, 0, timed, torch.device("cpu"))
    assert row["seconds"] == 3.2 and row["frames"] == 17 and row["fps"] == round(17 / 3.2, 2)
    assert row["steady_fps"] == round(8 / (3.2 - 1.7), 2) and row["first_chunk_latency_ms"] == 500.0
    assert row["latency"] == {"median_ms": 700.0, "mean_ms": round(1000 * 1.8 / 3, 2), "p90_ms": 900.0,
                              "max_ms": 900.0}


def test_bad_arguments_are_refused_in_one_line_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr(bench_v2v.WanModel, "random", lambda *a, **k: pytest.fail("a model was built"))
    for args, message in ((["--size", "1.3B"], "the real shapes need a GPU"),
                          (["--parallel", "3"], "parallelism must lie in 1..2"),
                          (["--steps", "500,700"], "the step list must be decreasing"),
                          (["--parallel", "1,x"], "comma-separated integers"),
                          (["--chunks", "1"], "--chunks must be at least 2"),
                          (["--runs", "0"], "--runs must be at least 1"),
                          (["--width", "40"], "width must be a positive multiple of 16"),
                          (["--backend", "cudnn"], "--backend: attention backend cudnn is not available"),
                          (["--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as stop:
            bench_v2v.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], err


def test_the_5b_size_samples_with_longlive_2s_settings_unless_told_otherwise():
    a, _, size, _, steps, levels = parse_arguments(["--size", "tiny-5b", "--parallel", "1,5"], "")
    assert (size, a.family, levels) == ("tiny-5b", "longlive-2", [1, 5]) and SIZES["5B"].in_dim == 48
    for p in levels:
        assert run_config(a, steps, p) == family_config("longlive-2", parallel=p)
    a, *_, steps, _ = parse_arguments(["--size", "tiny-5b", "--window", "40"], "")  # a setting given wins
    assert (run_config(a, steps).sink, run_config(a, steps).window) == (8, 40)
    a, *_, steps, _ = parse_arguments(["--size", "tiny"], "")  # no family: the options' own defaults
    assert (a.family, steps, run_config(a, steps).sink, run_config(a, steps).attention) == (
        None, (1000, 750, 500, 250), 0, "causal")


def test_the_5b_size_refuses_the_wan21_decoders_and_sizes_off_its_grid(capsys):
    for args, message in ((["--vae", "--decoder", "lightvae"], "--decoder lightvae is Wan2.1's LightVAE"),
                          (["--width", "48"], "multiple of 32")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--size", "tiny-5b", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], err


def test_the_5b_size_runs_every_level(capsys, one_thread):
    bench.main(["--size", "tiny-5b", "--width", "32", "--height", "32", "--blocks", "2", "--runs", "1",
                "--parallel", "1,5"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    env = next(r for r in out if r["figure"] == "env")
    assert env["family"] == "longlive-2" and env["steps"] == [999, 937, 833, 624]
    dit = [r for r in out if r["figure"] == "cascade_dit"]
    assert [r["parallel"] for r in dit] == [1, 5] and all(r["frames"] == 1 + 4 * 15 for r in dit)
    assert [r["ticks"] for r in dit] == [2 * 5, 2 + 4]  # 4 UniPC steps + a clean pass a block
