"""A pool's caller SIGKILLed in the middle of a run (ComfyUI killed mid-stream): no worker outlives it.

The caller gets no say (no atexit, no close): each worker must see by itself that the caller is gone
and end, whatever it is doing, within seconds. The case made here is the hard one: one rank waits in a
gloo collective for a rank that is stopped (SIGSTOP), and a process the caller forked holds copies of
the caller's pipe ends, so the lifeline pipe never reads EOF and only the workers' watch on their
parent process can tell them (:func:`cascade_core.distributed.worker._watch_caller`). Linux only (/proc,
SIGSTOP, os.fork); one CPU thread per process, so the machine's core count does not matter.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from test_distributed import gone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: /proc, SIGSTOP, fork")
GONE_WITHIN = 10.0  # seconds; the watch takes a quarter of one

CALLER = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from cascade_core.distributed import WorkerPool
from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.sampling.loop import CascadeConfig, PromptSchedule
torch.set_num_threads(1)
model = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32))
pool = WorkerPool("cpu,cpu", threads=1, timeout=120)

def on_tick(event):
    if event.tick != 2:
        return
    fork = os.fork()  # holds a copy of every pipe end of the caller, the lifelines' included
    if fork == 0:
        time.sleep(600)
        os._exit(0)
    print("PIDS", *pool.pids, fork, flush=True)

# far longer than the test (a window keeps the memory flat): the workers are busy when the caller dies
pool.generate(model, PromptSchedule.single(torch.ones(3, 32)), CascadeConfig(frames_per_block=2, parallel=2,
              window=6, sink=2), blocks=5000, width=64, height=32, on_tick=on_tick)
print("FINISHED", flush=True)
"""


def wait_gone(pids: list[int], within: float) -> float:
    """Seconds until every pid is gone (polled); raises AssertionError naming those left after ``within``."""
    t0 = time.monotonic()
    while not all(gone(p) for p in pids):
        assert time.monotonic() - t0 < within, f"still there after {within} s: {[p for p in pids if not gone(p)]}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_workers_end_within_seconds_of_a_sigkilled_caller_even_blocked_in_a_collective(tmp_path):
    caller = subprocess.Popen([sys.executable, "-c", CALLER, ROOT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    pids = []
    try:
        line = caller.stdout.readline()
        assert line.startswith("PIDS"), caller.stderr.read() if caller.poll() is not None else line
        *workers, fork = [int(p) for p in line.split()[1:]]
        pids = [*workers, fork]
        assert not any(gone(p) for p in pids)
        os.kill(workers[0], signal.SIGSTOP)  # rank 1 soon waits for it in the tick's next collective
        time.sleep(1.0)  # (a tick of this model takes milliseconds)
        caller.kill()
        caller.wait(10)
        took = wait_gone([workers[1]], GONE_WITHIN)  # in a gloo collective; the lifeline kept open by the fork
        assert not gone(fork)  # so the lifeline alone could not have told it
        os.kill(workers[0], signal.SIGCONT)
        took0 = wait_gone([workers[0]], GONE_WITHIN)  # stopped when its caller died: ends once it runs again
        print(f"rank 1 gone {took:.2f} s after the kill, rank 0 {took0:.2f} s after SIGCONT")
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        for pid in pids:  # whatever is left (the fork, always; the workers where the test failed)
            if not gone(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
