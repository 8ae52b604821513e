"""The KV pool shared across processes (gloo on the CPU): equal results, faults, interrupts, the CLI.

Tolerance. One segment per tick (P1), and a pool of one rank at any P, give bit-identical latents:
the owner then runs exactly the single-process forward. With several segments per tick on several
ranks the results agree to fp32 rounding only: each rank's matrix products see fewer segments than
the single process's batched forward (other blocking, other summation order), and attention to
another rank's in-flight segment is merged in by log-sum-exp instead of one softmax. Both are exact
in real arithmetic; we observe at most ~1.5e-6 absolute on latents of magnitude ~5 (a few ulps) and
assert <= 1e-4: a wide margin for the rounding to accumulate over steps and blocks, yet three orders
of magnitude below what cascading itself changes (~1e-1, see test_engine).
"""
import json
import os
import signal
import subprocess
import tempfile
import sys
import textwrap
import time

import pytest
import torch
from conftest import TINY

from cascade_core import distributed
from cascade_core.cli.command import main
from cascade_core.distributed import WorkerError, WorkerPool, parse_devices
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.loop import CascadeConfig, Interrupted, PromptSchedule, generate
from cascade_core.weights.safe_io import read_tensor_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-4
RUN = dict(width=64, height=32, seed=7)


pytestmark = pytest.mark.usefixtures("one_thread")


_SHARED: dict[str, WorkerPool] = {}
# the workers of this module's pools fail where this file says (fault_injection/sitecustomize.py)
FAULT_FILE = os.path.join(tempfile.mkdtemp(prefix="bc-faults-"), "fault")


@pytest.fixture(scope="module", autouse=True)
def _close_shared_pools():
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "BLOCK_CASCADE_TEST_FAULT_FILE")}
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_injection")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved["PYTHONPATH"]) if p)
    os.environ["BLOCK_CASCADE_TEST_FAULT_FILE"] = FAULT_FILE
    yield
    for pool in _SHARED.values():
        pool.close()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def inject_fault(spec: str) -> None:
    """"rank:tick:kind" (kind exit, oom or raise) for the next runs of this module's pools; "" for none."""
    with open(FAULT_FILE, "w") as f:
        f.write(spec)


def shared_pool(devices: str) -> WorkerPool:
    """One pool per device list for the module, started again where a test closed it (close_pools
    closes every pool of the process)."""
    pool = _SHARED.get(devices)
    if pool is None or pool.closed:
        pool = _SHARED[devices] = WorkerPool(devices, threads=1, timeout=60)
    return pool


@pytest.fixture
def pool2():
    return shared_pool("cpu,cpu")


@pytest.fixture
def pool3():
    return shared_pool("cpu,cpu,cpu")


def gone(pid: int) -> bool:
    """No such process (reaped), or only a zombie left by someone else's parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def single(model, prompts, cfg, blocks, **kw):
    return generate(model, prompts, cfg, blocks=blocks, **{**RUN, **kw})


# ---- equal results --------------------------------------------------------------------------------

CASES = [  # (parallel, attention, flashblock, window, sink)
    (3, "causal", "off", None, 0),
    (5, "bidirectional", "off", None, 0),
    (2, "causal", "exact", None, 0),
    (4, "causal", "reuse", None, 0),
    (3, "bidirectional", "off", 6, 2),
]


@pytest.mark.parametrize("ranks", [2, 3])
def test_one_segment_per_tick_is_bit_identical(model, prompt, pool2, pool3, ranks):
    pool = pool2 if ranks == 2 else pool3
    cfg = CascadeConfig(frames_per_block=2, parallel=1)
    ref = single(model, PromptSchedule.single(prompt), cfg, 4)
    ticks, blocks = [], []
    res = pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=4, on_tick=ticks.append,
                        on_block=blocks.append, **RUN)
    assert torch.equal(res.latents, ref.latents)
    assert (res.ticks, res.forwards, res.blocks) == (ref.ticks, ref.forwards, 4)
    assert [t.tick for t in ticks] == list(range(ref.ticks)) and ticks[-1].done_blocks == 4
    assert [b.block for b in blocks] == [0, 1, 2, 3]
    for b in blocks:
        assert torch.equal(b.latents, ref.latents[:, :, 2 * b.block:2 * b.block + 2])


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("parallel,attn,flashblock,window,sink", CASES)
def test_every_setting_equals_the_single_process_cascade(model, prompt, pool2, pool3, ranks, parallel, attn,
                                                         flashblock, window, sink):
    pool = pool2 if ranks == 2 else pool3
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, attention=attn, flashblock=flashblock,
                        window=window, sink=sink)
    ref = single(model, PromptSchedule.single(prompt), cfg, 6)
    res = pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=6, **RUN)
    assert (res.latents - ref.latents).abs().max() <= TOL
    assert res.ticks == ref.ticks


def test_prompt_switch_given_noise_and_new_weights(model, prompt, pool3):
    other = torch.randn(9, TINY.text_dim, generator=torch.Generator().manual_seed(4))
    prompts = PromptSchedule([(0, prompt), (2, other)])
    cfg = CascadeConfig(frames_per_block=2, parallel=3)
    noise = torch.randn(1, 16, 10, 4, 8, generator=torch.Generator().manual_seed(5))
    ref = single(model, prompts, cfg, 5, noise=noise)
    res = pool3.generate(model, prompts, cfg, blocks=5, noise=noise, **RUN)
    assert (res.latents - ref.latents).abs().max() <= TOL
    # a switch blending over 2 blocks (blend_blocks) reaches every rank: the blocks of another rank included
    blended = PromptSchedule(prompts.entries, {2: 2})
    res_b = pool3.generate(model, blended, cfg, blocks=5, noise=noise, **RUN)
    ref_b = single(model, blended, cfg, 5, noise=noise)
    assert (res_b.latents - ref_b.latents).abs().max() <= TOL < (ref_b.latents - ref.latents).abs().max()
    # weights changed in place (as a LoRA patch does) are uploaded again before the next run
    bias = model.blocks[0].ffn[0].bias
    with torch.no_grad():
        bias.add_(0.5)
    try:
        ref2 = single(model, prompts, cfg, 5, noise=noise)
        res2 = pool3.generate(model, prompts, cfg, blocks=5, noise=noise, **RUN)
    finally:
        with torch.no_grad():
            bias.sub_(0.5)
    assert (res2.latents - ref2.latents).abs().max() <= TOL
    assert (ref2.latents - ref.latents).abs().max() > 1e-3
    # and so is another model
    fresh = WanModel.random(TINY, seed=1)
    res3 = pool3.generate(fresh, prompts, cfg, blocks=5, noise=noise, **RUN)
    assert (res3.latents - single(fresh, prompts, cfg, 5, noise=noise).latents).abs().max() <= TOL


def test_one_rank_is_bit_identical_at_every_level(model, prompt):
    """A pool of one rank runs the distributed code path with nothing remote: the seam adds nothing."""
    pool = WorkerPool("cpu", threads=1, timeout=60)
    try:
        for parallel, attn, flashblock, window, sink in CASES:
            cfg = CascadeConfig(frames_per_block=2, parallel=parallel, attention=attn, flashblock=flashblock,
                                window=window, sink=sink)
            res = pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=5, **RUN)
            assert torch.equal(res.latents, single(model, PromptSchedule.single(prompt), cfg, 5).latents)
    finally:
        pool.close()


# ---- faults ---------------------------------------------------------------------------------------

def test_killed_worker_gives_a_clear_error_leaves_nothing_and_the_next_run_works(model, prompt, pool2):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    pids = pool2.pids
    victim = pids[1]

    def kill_at_tick_2(event):
        if event.tick == 2:
            os.kill(victim, signal.SIGKILL)

    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 \(cpu\) died: killed by SIGKILL") as info:
        pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=6, on_tick=kill_at_tick_2, **RUN)
    assert time.monotonic() - t0 < 20
    assert info.value.rank == 1 and info.value.device == "cpu"
    assert "the next run starts the pool again" in str(info.value)
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    res = pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=4, **RUN)
    assert (res.latents - single(model, PromptSchedule.single(prompt), cfg, 4).latents).abs().max() <= TOL
    assert set(pool2.pids).isdisjoint(pids)


@pytest.mark.parametrize("kind,message", [("oom", r"rank 1 \(cpu\) ran out of memory: .*simulated out of memory"),
                                          ("exit", r"rank 1 \(cpu\) died: exit code 3")])
def test_worker_failure_names_rank_and_device(model, prompt, pool2, monkeypatch, kind, message):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    pids = pool2.pids
    inject_fault(f"1:3:{kind}")
    try:
        with pytest.raises(WorkerError, match=message):
            pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=4, **RUN)
    finally:
        inject_fault("")
    assert all(gone(p) for p in pids)
    res = pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=3, **RUN)
    assert (res.latents - single(model, PromptSchedule.single(prompt), cfg, 3).latents).abs().max() <= TOL


def test_interrupt_stops_every_rank_within_a_tick_and_the_pool_stays(model, prompt, pool3):
    cfg = CascadeConfig(frames_per_block=2, parallel=3)
    pids = pool3.pids
    seen = {"last": -1, "asked_at": None}

    def on_tick(e):
        seen["last"] = e.tick

    def should_stop():
        if seen["last"] >= 2 and seen["asked_at"] is None:
            seen["asked_at"] = seen["last"]
        return seen["asked_at"] is not None

    slower = WanModel.random(WanConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=8, text_dim=32))
    with pytest.raises(Interrupted, match="stopped at tick") as info:  # ticks of ~0.1 s
        pool3.generate(slower, PromptSchedule.single(prompt), cfg, blocks=10, on_tick=on_tick,
                       should_stop=should_stop, width=256, height=128, seed=7)
    # every rank stopped before the same tick (the pool checks that they agree), at most two ticks
    # after the last one the caller had seen when it asked: the one running then, and the next check
    assert seen["asked_at"] < info.value.tick <= seen["asked_at"] + 2, (seen, info.value.tick)
    assert seen["last"] < info.value.tick
    assert pool3.pids == pids  # nobody restarted
    res = pool3.generate(model, PromptSchedule.single(prompt), cfg, blocks=4, **RUN)
    assert (res.latents - single(model, PromptSchedule.single(prompt), cfg, 4).latents).abs().max() <= TOL


def test_a_failing_callback_stops_the_ranks_and_is_raised(model, prompt, pool3):
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    pids = pool3.pids

    def on_block(e):
        raise KeyError("the caller's own failure")

    with pytest.raises(KeyError, match="the caller's own failure"):
        pool3.generate(model, PromptSchedule.single(prompt), cfg, blocks=8, on_block=on_block, **RUN)
    assert pool3.pids == pids and pool3.alive
    res = pool3.generate(model, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
    assert (res.latents - single(model, PromptSchedule.single(prompt), cfg, 2).latents).abs().max() <= TOL


def test_full_device_is_refused_naming_devices_and_free_memory(model, prompt, pool2):
    for w in pool2._workers:  # what a CUDA worker reports: (usable, total) bytes
        w.memory = (1 << 20, 80 << 30)
    try:
        with pytest.raises(ValueError, match=r"not enough GPU memory on cpu, cpu: .*cpu 0.00 of 80.0 GiB free"):
            pool2.generate(model, PromptSchedule.single(prompt), CascadeConfig(frames_per_block=2), blocks=2, **RUN)
    finally:
        for w in pool2._workers:
            w.memory = None
    assert pool2.alive


def test_new_weights_may_use_the_memory_of_the_weights_they_replace(prompt, pool2):
    """A pool that holds weights W and reports u usable bytes per GPU takes new weights of the same
    size when u + W covers them and the run (the workers drop W first); it refuses them when even
    u + W does not. (What the workers' caching allocators keep unused is in u already.)"""
    from cascade_core.sampling.memory import estimate_run_bytes
    from cascade_core.sampling.plan import plan_run

    cfg = CascadeConfig(frames_per_block=2)
    first, second = WanModel.random(TINY, seed=11), WanModel.random(TINY, seed=12)
    pool2.generate(first, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)  # the pool holds `first`
    weights = sum(t.numel() * t.element_size() for t in first.state_dict().values())
    plan = plan_run(cfg, blocks=2, width=RUN["width"], height=RUN["height"], devices=2)
    run, _ = estimate_run_bytes(plan, first.cfg, first.dtype, 1, 0, ranks=2)
    try:
        for w in pool2._workers:  # what a CUDA worker reports: (usable, total) bytes
            w.memory = (run + weights // 2, 80 << 30)  # too little beside `first`, enough instead of it
        pool2.generate(second, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
        for w in pool2._workers:
            w.memory = (run // 2, 80 << 30)  # not enough even without the held weights
        with pytest.raises(ValueError, match="not enough GPU memory"):
            pool2.generate(first, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
    finally:
        for w in pool2._workers:
            w.memory = None
    assert pool2.alive


def test_each_rank_is_held_to_the_engines_one_memory_estimate(model, prompt, pool2):
    """The pool refuses a run exactly when a rank has less room than memory.estimate_run_bytes says
    one of its ranks needs (the nodes' and the command line's estimate, per-rank share)."""
    from cascade_core.sampling.memory import estimate_run_bytes
    from cascade_core.sampling.plan import plan_run

    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)  # weights uploaded
    plan = plan_run(cfg, blocks=2, width=RUN["width"], height=RUN["height"], devices=2)
    need, what = estimate_run_bytes(plan, model.cfg, model.dtype, 1, 0, ranks=2)
    assert need < estimate_run_bytes(plan, model.cfg, model.dtype, 1, 0)[0]
    try:
        for w in pool2._workers:
            w.memory = (need - 1, 80 << 30)
        with pytest.raises(ValueError, match=rf"each rank needs about {need / (1 << 30):.2f} GiB \({what}\)"):
            pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
        for w in pool2._workers:
            w.memory = (need, 80 << 30)
        pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
    finally:
        for w in pool2._workers:
            w.memory = None


def test_device_lists_are_checked():
    assert parse_devices("cpu, cpu,cpu") == [torch.device("cpu")] * 3
    assert parse_devices(["cpu", torch.device("cpu")]) == [torch.device("cpu")] * 2
    for spec, message in (("cpu,cuda:0", "mixes CPU and CUDA"), ("cuda:1,cuda:1", "listed twice"),
                          ("tpu", "not a device|not supported"), ("", "none given")):
        with pytest.raises(ValueError, match=message):
            parse_devices(spec)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match=r"cuda:7 is not present; .* CUDA device\(s\)"):
            parse_devices("cuda:0,cuda:7")


def test_get_pool_reuses_one_pool(model, prompt):
    pool = distributed.get_pool("cpu")
    try:
        assert distributed.get_pool(["cpu"]) is pool
        cfg = CascadeConfig(frames_per_block=2, parallel=3)
        res = distributed.generate(model, PromptSchedule.single(prompt), cfg, devices="cpu", blocks=3, **RUN)
        assert torch.equal(res.latents, single(model, PromptSchedule.single(prompt), cfg, 3).latents)
        assert distributed.get_pool("cpu") is pool
    finally:
        distributed.close_pools()
    assert pool.closed and not pool.alive


def test_close_pools_during_a_run_returns_within_two_ticks_and_leaves_nothing(model, prompt):
    """close_pools() (Ctrl-C's and ComfyUI's exit path) from another thread interrupts a long run
    at its next tick instead of waiting for the video to end; every worker is gone after it. (It
    closes every pool of the process: it runs after the tests that share the module's pools.)"""
    import threading

    pool = distributed.get_pool("cpu,cpu")
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    ticks, outcome = [], {}

    def run():
        try:
            pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=400,
                          on_tick=lambda e: ticks.append(e.tick), **RUN)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["raised"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    try:
        while len(ticks) < 5 and runner.is_alive():
            time.sleep(0.01)
        assert runner.is_alive(), outcome
        pids, seen = pool.pids, len(ticks)
        distributed.close_pools()
        after = len(ticks)
        runner.join(30)
        assert not runner.is_alive()
        # the workers stop at the tick after the one running then; ticks they finished before that
        # but this thread had not read yet (a busy machine) come on top: far fewer than the 1000 left
        assert after - seen <= 10, (seen, after)
        assert isinstance(outcome.get("raised"), Interrupted), outcome
        assert pool.closed and not pool.alive and all(gone(p) for p in pids)
    finally:
        distributed.close_pools()
        runner.join(60)


def test_workers_run_the_callers_thread_count_at_every_run(model, prompt):
    """On some CPUs the thread count changes the rounding of matrix products, so a default pool's
    workers take the caller's count at each run (whatever the machine's core count): a pool of one
    rank then does the caller's arithmetic. An explicit ``threads`` wins."""
    cfg = CascadeConfig(frames_per_block=2, parallel=3)
    pool = WorkerPool("cpu,cpu", timeout=60)
    try:
        for threads in (1, 3, 2):
            torch.set_num_threads(threads)
            res = pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=3, **RUN)
            assert pool.worker_threads == [threads, threads]
            assert (res.latents - single(model, PromptSchedule.single(prompt), cfg, 3).latents).abs().max() <= TOL
    finally:
        torch.set_num_threads(1)
        pool.close()
    fixed = WorkerPool("cpu", threads=2, timeout=60)
    try:
        fixed.generate(model, PromptSchedule.single(prompt), cfg, blocks=2, **RUN)
        assert fixed.worker_threads == [2]
    finally:
        fixed.close()


# ---- processes ------------------------------------------------------------------------------------

def test_workers_exit_with_their_host_and_import_the_pack_by_its_stable_name(tmp_path):
    """A host that imported the pack under a path-derived name (as ComfyUI does) and lacks it on
    sys.path runs a pool; when the host is killed, its workers go too."""
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, sys, torch
        sys.path = [p for p in sys.path if p not in ({ROOT!r}, "")]
        spec = importlib.util.spec_from_file_location("custom_nodes_x1", {os.path.join(ROOT, "__init__.py")!r},
                                                      submodule_search_locations=[{ROOT!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["custom_nodes_x1"] = pack
        spec.loader.exec_module(pack)
        sys.path.remove({ROOT!r})  # the pack's __init__ put it there; a host may not have it
        import custom_nodes_x1.cascade_core.distributed as d
        from custom_nodes_x1.cascade_core.model.dit import WanConfig, WanModel
        from custom_nodes_x1.cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
        assert "cascade_core" not in sys.modules
        m = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32))
        p = PromptSchedule.single(torch.ones(3, 32))
        cfg = CascadeConfig(frames_per_block=2, parallel=2)
        pool = d.WorkerPool("cpu,cpu", threads=1, timeout=60)
        r = pool.generate(m, p, cfg, blocks=3, width=64, height=32)
        ref = generate(m, p, cfg, blocks=3, width=64, height=32)
        print("PIDS", *pool.pids, float((r.latents - ref.latents).abs().max()), flush=True)
        sys.stdin.read()
    """))
    host = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        line = host.stdout.readline()
        assert line.startswith("PIDS"), host.stderr.read() if host.poll() is not None else line
        *pids, dev = line.split()[1:]
        pids = [int(p) for p in pids]
        assert float(dev) <= TOL
        assert not any(gone(p) for p in pids)
        host.kill()  # no atexit, no cleanup: only the lifeline tells the workers
        host.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(p) for p in pids):
            time.sleep(0.1)
        assert all(gone(p) for p in pids)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


# ---- the command line -----------------------------------------------------------------------------

def test_cli_devices_gives_the_latents_of_one_device(tmp_path):
    """Bit for bit at P1. On some CPUs the thread count changes the rounding of matrix products, so
    both sides run one thread (the workers take the CLI process's count)."""
    args = ["generate", "--width", "64", "--height", "32", "--blocks", "3", "--quiet", "--dtype", "fp32",
            "--seed", "5"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert torch.get_num_threads() == 1  # the module's fixture
    assert main([*args, "--device", "cpu", "--latents-out", str(one)]) == 0
    r = subprocess.run([sys.executable, "-m", "cascade_core", *args, "--devices", "cpu,cpu",
                        "--latents-out", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu,cpu" and summary["ticks"] == 15
    assert torch.equal(read_tensor_file(str(one))["latents"], read_tensor_file(str(two))["latents"])


def test_cli_under_torchrun_matches_one_device(tmp_path):
    """The same per-rank engine in a process group torchrun made (how it runs across machines)."""
    args = ["generate", "--width", "64", "--height", "32", "--blocks", "3", "--quiet", "--dtype", "fp32",
            "--seed", "5", "--parallel", "2"]
    one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
    assert main([*args, "--device", "cpu", "--latents-out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cascade_core", *args, "--devices", "torchrun", "--latents-out", str(many)]
    r = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = r.communicate(timeout=180)
    finally:
        if r.poll() is None:  # torchrun and its ranks form one session: leave nothing behind
            os.killpg(r.pid, signal.SIGKILL)
            r.wait()
    assert r.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["device"] == "2 ranks (torchrun)"  # rank 0 reports
    a, b = read_tensor_file(str(one))["latents"], read_tensor_file(str(many))["latents"]
    assert (a - b).abs().max() <= TOL


def test_a_run_rank_0_refuses_ends_every_rank_at_once(tmp_path):
    """Under torchrun, a bad run on rank 0 reaches the other ranks as CollectiveRefused right away
    (not after the collective timeout), and no process group is left behind on any rank."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {ROOT!r})
        import torch.distributed as dist
        from cascade_core import distributed as d
        from cascade_core.model.dit import WanConfig, WanModel
        from cascade_core.sampling.loop import CascadeConfig, PromptSchedule
        d.init_from_env(timeout=120)
        start = time.monotonic()
        model = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32))
        lines = []
        try:
            if dist.get_rank() == 0:
                d.generate_collective(model, PromptSchedule.single(torch.ones(3, 32)), CascadeConfig(),
                                      blocks=-1, width=64, height=32)
            else:
                d.generate_collective(None, None, None)
        except ValueError as exc:
            lines.append(f"{{dist.get_rank()}} {{type(exc).__name__}} {{exc}} {{time.monotonic() - start:.1f}}")
        lines.append(f"groups {{len(dist.distributed_c10d._world.pg_map)}}")
        rank = dist.get_rank()
        dist.destroy_process_group()
        with open({str(tmp_path)!r} + f"/rank{{rank}}.txt", "w") as f:  # the ranks' stdout interleaves
            f.write(chr(10).join(lines))
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    r = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = r.communicate(timeout=100)
    finally:
        if r.poll() is None:
            os.killpg(r.pid, signal.SIGKILL)
            r.wait()
    assert r.returncode == 0, stderr[-3000:]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
    refused = [line for line in lines if line[:1] in "01"]
    assert [line.split()[:2] for line in refused] == [["0", "ValueError"], ["1", "CollectiveRefused"]], lines
    assert all("at least 1 block" in line for line in refused), lines
    assert all(float(line.split()[-1]) < 60 for line in refused), lines  # not the 120 s timeout
    assert [line for line in lines if line.startswith("groups")] == ["groups 1"] * 2, lines  # only WORLD


@pytest.mark.parametrize("args,message", [
    (["--devices", "cpu,cuda:0"], "mixes CPU and CUDA"),
    (["--devices", "cuda:0,cuda:0"], "listed twice"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "--device and --devices exclude each other"),
])
def test_bad_device_lists_give_one_line_and_exit_2(args, message, capsys):
    assert main(["generate", "--width", "64", "--height", "32", "--blocks", "1", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("first_frame,first_steps,parallel", [(True, None, 3), (False, (1000, 750, 500, 250), 2),
                                                               (True, (1000, 750, 500), 1)])
def test_block0_of_its_own_size_or_schedule_equals_one_process(model, prompt, pool2, first_frame, first_steps,
                                                               parallel):
    """An independent first frame (block 0 alone in its forward) and a first-block step list on two
    ranks give one process's latents, block by block."""
    cfg = CascadeConfig(frames_per_block=2, parallel=parallel, steps=(1000, 500) if first_steps else
                        (1000, 750, 500, 250), first_block_steps=first_steps, independent_first_frame=first_frame)
    ref = single(model, PromptSchedule.single(prompt), cfg, 5)
    blocks = []
    res = pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=5, on_block=blocks.append, **RUN)
    assert res.latents.shape == ref.latents.shape
    assert (res.latents - ref.latents).abs().max() <= TOL
    assert (res.ticks, res.forwards) == (ref.ticks, ref.forwards)
    assert [b.latents.shape[2] for b in blocks] == [1 if first_frame else 2] + [2] * 4


def test_a_recache_switch_is_refused_on_several_devices(model, prompt, pool2):
    other = torch.randn(9, TINY.text_dim, generator=torch.Generator().manual_seed(4))
    prompts = PromptSchedule([(0, prompt), (2, other)])
    with pytest.raises(ValueError, match=r"re-cache at a prompt switch \(switch mode recache\) runs on one device"):
        pool2.generate(model, prompts, CascadeConfig(frames_per_block=2, switch_mode="recache"), blocks=4, **RUN)


@pytest.mark.parametrize("cfg", [
    CascadeConfig(frames_per_block=2, parallel=4, window=4, sink=2, rolling_window=True),
    CascadeConfig(frames_per_block=2, parallel=5, attention="bidirectional", window=11, sink=1, rolling_window=True),
    CascadeConfig(frames_per_block=2, parallel=3, flashblock="exact", window=5, sink=1, rolling_window=True),
], ids=["causal", "bidirectional", "exact"])
def test_a_rolling_window_equals_one_process_while_its_sink_is_in_flight_elsewhere(model, prompt, pool2, cfg):
    """Rolling Forcing's anchor (the sink's keys re-positioned) is filled once the sink's own block,
    still in flight on another rank, has arrived."""
    ref = single(model, PromptSchedule.single(prompt), cfg, 5)
    res = pool2.generate(model, PromptSchedule.single(prompt), cfg, blocks=5, **RUN)
    assert (res.latents - ref.latents).abs().max() <= TOL


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_reports_the_bytes_its_exchange_brought_and_its_wait(model, prompt, pool2, pool3, ranks):
    """Counted here: at P2 every forward holds at most one block per rank, so each layer's all-gather
    brings each rank the k and v of one block (16 tokens: 2 latent frames of 2x4 patches) from each
    other rank, in float32, every tick, whether the rank has a block in it or not."""
    pool = pool2 if ranks == 2 else pool3
    cfg = CascadeConfig(frames_per_block=2, parallel=2)
    res = pool.generate(model, PromptSchedule.single(prompt), cfg, blocks=4, **RUN)
    c = model.cfg
    per_layer = (ranks - 1) * 2 * 16 * c.num_heads * (c.dim // c.num_heads) * 4  # others x (k, v) x tokens x width
    assert set(pool.last_exchange) == set(range(ranks))
    for received, waited in pool.last_exchange.values():
        assert received == res.ticks * c.num_layers * per_layer
        assert 0 <= waited <= res.seconds
