"""The speed tool on the CPU (tiny shapes): what each row reports and what it refuses, not its timing."""
import json

import pytest

from cascade_core.cli import bench


def rows(capsys, *args):
    bench.main(["--size", "tiny", "--width", "64", "--height", "32", "--blocks", "5", "--runs", "1", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_switch_ticks_and_steered_latency_per_mode(capsys, one_thread):
    out = rows(capsys, "--parallel", "1,5", "--switch-every", "2", "--switch-mode", "none,recache",
               "--steer-runs", "2", "--window", "9", "--sink", "3")
    ticks = {(r["parallel"], r["switch_mode"]): r for r in out if r["figure"] == "switch_ticks" and r["run"] == 0}
    assert set(ticks) == {(1, "none"), (1, "recache"), (5, "none")}
    assert ticks[1, "recache"]["forwards"] == ticks[1, "none"]["forwards"] + 2  # switches at blocks 2 and 4
    assert ticks[1, "none"]["switch_ticks"] == [2 * 5, 4 * 5] and ticks[5, "none"]["switch_ticks"] == [2, 4]
    skipped = [r for r in out if r["figure"] == "switch_skipped"]  # once for the ticks, once for the latency
    assert len(skipped) == 2 and all((r["parallel"], r["switch_mode"]) == (5, "recache") and "needs parallel 1"
                                     in r["why"] for r in skipped)
    steered = [r for r in out if r["figure"] == "steer_latency"]
    assert {(r["parallel"], r["switch_mode"]) for r in steered} == set(ticks)
    for r in steered:  # it lands at the next block to enter: at P1 every 5 ticks, at P5 every tick
        assert r["landed_block"] == (-(-r["steered_before_tick"] // 5) if r["parallel"] == 1
                                     else r["steered_before_tick"]) and r["seconds"] > 0
    assert len([r for r in out if r["figure"] == "steer_latency_summary"]) == 3


def test_endless_rows_report_the_blocks_asked_for_and_per_block_memory(capsys, one_thread):
    out = rows(capsys, "--parallel", "1,4", "--window", "6", "--sink", "3", "--endless", "12", "--switch-every", "4")
    endless = [r for r in out if r["figure"] == "endless"]
    assert [r["parallel"] for r in endless] == [1, 4]
    for r in endless:
        assert r["blocks"] == 12 and set(r["gib_at_block"]) == {"10", "6", "12"} and r["steady_fps"] > 0


def test_end_to_end_rows_per_decoder_count_the_videos_frames_and_the_first_frames_time(capsys, one_thread,
                                                                                         monkeypatch):
    """--vae with either decoder: every run's row has the whole video (5 blocks of 3 latent frames:
    1 + 4 * 14 = 57 frames) and the time to its first frames, inside the run's time."""
    built = []

    def spy(name):
        cls = getattr(bench, name)

        def build(*args, **kwargs):
            built.append(name)
            return cls(*args, **kwargs)
        return build

    for name in ("WanVAEDecoder", "TinyWanDecoder", "LightTAEDecoder"):
        monkeypatch.setattr(bench, name, spy(name))
    out = rows(capsys, "--parallel", "2", "--vae", "--decoder", "wan,lighttae")
    assert built == ["WanVAEDecoder", "LightTAEDecoder"]
    for decoder in ("wan", "lighttae"):
        ends = [r for r in out if r["figure"] == "end_to_end" and r["decoder"] == decoder]
        assert len(ends) == 4 and all(r["decoder"] == decoder and r["frames"] == 57 for r in ends)
        assert sorted(r["overlap"] for r in ends) == [False, False, True, True]  # beside the DiT, and after it
        assert all(0 < r["first_frames_s"] < r["seconds"] for r in ends)
    assert {r["decoder"] for r in out if r["figure"] == "vae_stream"} == {"wan", "lighttae"}


def test_a_wan22_size_times_the_wan22_decoders_on_blocks_of_its_familys_length(capsys, one_thread, monkeypatch):
    """--size tiny-5b (LongLive 2.0's shapes, 48 latent channels) with --vae: the Wan2.2 VAE and taew2_2 decode its
    blocks of 8 latent frames (2 blocks: 1 + 4 * 15 = 61 frames); Wan2.1's LightVAE is refused in one line."""
    built = []
    for name in ("Wan22VAEDecoder", "TinyWan22Decoder", "WanVAEDecoder", "TinyWanDecoder"):
        cls = getattr(bench, name)
        monkeypatch.setattr(bench, name, lambda *a, _cls=cls, _name=name, **k: built.append(_name) or _cls(*a, **k))
    bench.main(["--size", "tiny-5b", "--width", "64", "--height", "32", "--blocks", "2", "--runs", "1",
                "--parallel", "1", "--vae", "--decoder", "wan,taew"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert built == ["Wan22VAEDecoder", "TinyWan22Decoder"]
    ends = [r for r in out if r["figure"] == "end_to_end"]
    assert len(ends) == 8 and all(r["frames"] == 61 for r in ends)
    assert {r["latent_frames"] for r in out if r["figure"] == "vae_stream"} == {16}
    with pytest.raises(SystemExit) as stop:
        bench.main(["--size", "tiny-5b", "--vae", "--decoder", "wan,lightvae"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--decoder lightvae is Wan2.1's LightVAE" in err[0], err


def test_bad_backends_and_a_decoder_without_vae_are_refused_before_any_work(capsys, monkeypatch):
    """Every --backend is checked first (cudnn on the CPU would fail only after the earlier backends'
    runs); one line on stderr, exit 2, no model built."""
    monkeypatch.setattr(bench.WanModel, "random", lambda *a, **k: pytest.fail("a model was built"))
    for args, message in ((["--backend", "auto,cudnn"], "--backend: attention backend cudnn is not available"),
                          (["--backend", "flash4"], "--backend: attention backend flash4 runs only on NVIDIA Hopper"),
                          (["--decoder", "taew"], "--decoder is for the decoder runs of --vae"),
                          (["--vae", "--decoder", "wan,bogus"], "--decoder wan,bogus: choose from wan, lightvae, taew, lighttae"),
                          (["--parallel", "1,x"], "comma-separated integers"),
                          (["--flashblock", "exact,bogus"], "flashblock must be one of"),
                          (["--steps", "1000,500", "--parallel", "1,4"], "parallelism must lie in 1..3"),
                          (["--window", "6", "--endless", "4"], "--endless 4: at least 10 blocks"),
                          (["--bogus"], "unrecognized arguments: --bogus"),
                          (["--blocks", "0"], "--blocks must be at least 1"),
                          (["--runs", "0"], "--runs must be at least 1"),
                          (["--width", "70"], "width must be a positive multiple of 16"),
                          (["--device", "meta"], "'meta' is not supported"),
                          (["--devices", "bogus"], "'bogus' is not a device"),
                          (["--endless", "12"], "needs a local window"),
                          (["--window", "6", "--endless", "12", "--devices", "cpu,cpu"],
                           "--endless runs on one device"),
                          (["--switch-every=-1"], "--switch-every must be 0 (off) or more"),
                          (["--switch-every", "1", "--switch-mode", "bogus"], "--switch-mode bogus: choose from")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--size", "tiny", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and message in err[0], err


def test_end_to_end_runs_take_the_command_lines_step_list(capsys, one_thread):
    """The decoder rows sample with the settings the DiT rows use: 2 steps + a clean pass per block at
    P1 are 3 ticks a block, where the default step list would give 5."""
    out = rows(capsys, "--steps", "1000,500", "--parallel", "1", "--blocks", "2", "--vae", "--decoder", "taew")
    ends = [r for r in out if r["figure"] == "end_to_end"]
    assert ends and all(r["ticks"] == 2 * 3 for r in ends)


def test_several_devices_report_each_ranks_exchange_per_tick(capsys, one_thread):
    from cascade_core import distributed

    try:
        out = rows(capsys, "--parallel", "2", "--blocks", "2", "--devices", "cpu,cpu")
    finally:
        distributed.close_pools()
    dit = [r for r in out if r["figure"] == "cascade_dit"]
    exchange = [r for r in out if r["figure"] == "exchange"]
    assert [r["run"] for r in exchange] == [r["run"] for r in dit] == [0]
    for r in exchange:
        assert set(r["mib_per_tick"]) == set(r["exposed_ms_per_tick"]) == {"0", "1"}
        assert all(v > 0 for v in r["mib_per_tick"].values())
        assert all(v >= 0 for v in r["exposed_ms_per_tick"].values())
