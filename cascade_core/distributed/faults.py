"""Failures of the ranks: the error the caller sees, what a rank reports of an exception, the
one message composed from every rank's report, and the tests' injected faults."""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import traceback

import torch
import torch.distributed as dist

from ..common.constants import GIB
from .devices import _free_bytes

log = logging.getLogger("block_cascade")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

class WorkerError(RuntimeError):
    """A worker of the pool crashed, ran out of memory or failed; names the rank and device."""

    def __init__(self, message: str, rank: int | None = None, device: str | None = None,
                 worker_traceback: str | None = None):
        super().__init__(message)
        self.rank, self.device, self.worker_traceback = rank, device, worker_traceback


def _describe(exc: BaseException, device: torch.device) -> dict:
    text = str(exc).strip()
    oom = isinstance(exc, OOM) or "out of memory" in text.lower()
    comm = isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Gloo", "NCCL", "timed out", "Timed out"))
    memory = None
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            memory = _free_bytes(device)
    first = text.splitlines()[0] if text else ""
    return {"type": type(exc).__name__, "message": first[:600], "oom": oom, "comm": comm and not oom,
            "memory": memory, "traceback": "".join(traceback.format_exception(exc))}


def _short(message: str, limit: int = 160) -> str:
    """A communication library's error in a few words (no source paths, no advice)."""
    text = re.sub(r"\[[^\]]*\.(?:cpp|cc|h|hpp):\d+\]\s*", "", message)
    text = text.split(" This is typically")[0].strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _compose_error(workers: list, phase: str, errors: dict, dead: dict, silent) -> WorkerError:
    """One clear message: the root cause first (an error a rank raised, else a death, else a
    communication failure that follows from someone else's), the other ranks after it."""
    device = {w.rank: w.device for w in workers}
    notes = []
    for rank, code in sorted(dead.items()):
        how = f"exit code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
            if code == -getattr(signal, "SIGKILL", 9):
                how += " (from outside, e.g. the system ran out of host memory)"
        notes.append((1, rank, f"rank {rank} ({device[rank]}) died: {how}", None))
    for rank, d in sorted(errors.items()):
        if d["oom"]:
            mem = ""
            if d["memory"]:
                mem = f"; {device[rank]} has {d['memory'][0] / GIB:.2f} of {d['memory'][1] / GIB:.1f} GiB free"
            notes.append((0, rank, f"rank {rank} ({device[rank]}) ran out of memory: {d['message']}{mem}",
                          d["traceback"]))
        elif d["comm"]:
            notes.append((2, rank, f"rank {rank} ({device[rank]}) lost the others: {_short(d['message'])}",
                          d["traceback"]))
        else:
            notes.append((0, rank, f"rank {rank} ({device[rank]}) failed: {d['type']}: {d['message']}",
                          d["traceback"]))
    if silent is not None and not notes:
        notes.append((3, None, f"no rank answered for {silent:.0f} s", None))
    if not notes:
        notes.append((3, None, "a worker stopped answering", None))
    notes.sort(key=lambda n: (n[0], -1 if n[1] is None else n[1]))
    _, rank, text, tb = notes[0]
    others = "; ".join(n[2] for n in notes[1:])
    message = (f"Block Cascade worker pool failed during {phase}: {text}"
               + (f" (then: {others})" if others else "")
               + ". All workers were stopped; the next run starts the pool again.")
    if tb:
        log.error("Block Cascade: traceback of rank %s:\n%s", rank, tb)
    return WorkerError(message, rank, device.get(rank), tb)
