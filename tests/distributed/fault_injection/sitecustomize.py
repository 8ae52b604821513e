"""Faults for the worker-pool tests, from outside the engine: every Python process started with this folder
on PYTHONPATH (the test module's pool workers) imports this file at start-up. Where
BLOCK_CASCADE_TEST_FAULT_FILE is set, ``RankPartition.stop`` of cascade_core.distributed.partition first
reads that file: "rank:tick:kind" makes that rank fail before that tick (kind: exit, the process exits
with code 3; oom, out of memory; raise, an error); an empty or missing file, no fault."""
import importlib.abc
import importlib.machinery
import os
import sys

FAULT_FILE = os.environ.get("BLOCK_CASCADE_TEST_FAULT_FILE")
TARGET = "cascade_core.distributed.partition"


def fail_if_asked(rank: int, tick: int) -> None:
    try:
        with open(FAULT_FILE) as f:
            spec = f.read().strip()
    except OSError:
        return
    if not spec:
        return
    at_rank, at_tick, kind = spec.split(":")
    if rank != int(at_rank) or tick != int(at_tick):
        return
    if kind == "exit":
        os._exit(3)
    if kind == "oom":
        from cascade_core.distributed.faults import OOM

        raise OOM(f"test: simulated out of memory at tick {tick}")
    raise RuntimeError(f"test: simulated failure at tick {tick}")


def with_faults(module) -> None:
    stop = module.RankPartition.stop

    def stop_or_fail(self, tick, requested):
        fail_if_asked(self.rank, tick.index)
        return stop(self, tick, requested)

    module.RankPartition.stop = stop_or_fail


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the partition module as the path finder does and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            with_faults(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULT_FILE:
    sys.meta_path.insert(0, PatchAfterImport())
