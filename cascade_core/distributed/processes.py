"""The worker processes seen from the caller: one spawned process per device, started together,
watched while the caller waits on them, and stopped; the base of :class:`pool.WorkerPool`.

Guarantees:
- Start-up: a store on 127.0.0.1 and a free port only; each worker gets a command pipe, an event
  pipe and a lifeline, and exits by itself when the caller's end of the lifeline closes or the
  caller's process is gone (:func:`worker._watch_caller`: within a second of a SIGKILL of the caller,
  whatever the worker was doing); start-up ends when every
  rank said it is ready (with its usable GPU memory) or fails after ``START_TIMEOUT`` seconds.
- Watching (:meth:`WorkerProcesses._pump`): the workers' messages are dispatched in the caller's
  thread; a worker that dies, raises or stays silent past the phase's limit fails the whole group:
  what every rank says within ``GRACE`` seconds is gathered into one :class:`faults.WorkerError`
  naming the rank, device and phase, and every worker is stopped before it is raised.
- Stopping (:meth:`WorkerProcesses._shutdown`): a graceful "close" first when asked, then the
  lifelines closed, then SIGTERM and SIGKILL for whatever is left; every process is reaped and
  every pipe closed. The weights the workers held are forgotten with them.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from multiprocessing import connection as mp_connection
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .devices import _worker_env, parse_devices
from .faults import _compose_error
from .worker import _spawn_without_main, _stable_target

log = logging.getLogger("block_cascade")
START_TIMEOUT = 180.0  # seconds for every worker to start and meet
GRACE = 2.0  # seconds to gather what the other ranks say after a failure


class _Worker:
    """The caller's record of one worker: its process, its pipes' caller ends and its last reports."""

    def __init__(self, rank, device, process, cmd, events, lifeline):
        self.rank, self.device, self.process = rank, device, process
        self.cmd, self.events, self.lifeline = cmd, events, lifeline
        self.memory = None  # (usable, total) bytes on its GPU, as last reported
        self.threads = None  # CPU threads it ran its last job with


class WorkerProcesses:
    """One worker process per device (rank = index in ``devices``), not started yet: subclasses
    call :meth:`_start` once their own state is set.

    ``devices``: as :func:`devices.parse_devices` takes them (raises ValueError for a bad list).
    ``timeout``: seconds any collective of the workers may wait. ``_weights`` / ``_held_bytes``:
    the weights the workers hold (set by the subclass that uploads them), cleared on every start and stop.
    """

    def __init__(self, devices: str | Sequence[str | torch.device], timeout: float):
        self.devices = parse_devices(devices)
        self.timeout = float(timeout)
        self._workers: list[_Worker] = []
        self._weights = None  # (weakref to the model, fingerprint) of the weights the workers hold
        self._held_bytes = 0  # bytes of weights each worker holds (reusable for new ones: dropped first)
        self._store = None
        self.p2p_disabled = False

    # ---- state ------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    @property
    def worker_threads(self) -> list[int | None]:
        """CPU threads each worker ran its last run with (None before its first run)."""
        return [w.threads for w in self._workers]

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.process.is_alive() for w in self._workers)


    # ---- start and stop ---------------------------------------------------------------------------
    def _start(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self._store = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=self.timeout),
                                    wait_for_workers=False, master_listen_fd=sock.detach())
        self._stop_flag = ctx.Value("b", 0, lock=False)
        options = {"env": _worker_env(), "timeout": self.timeout, "caller": os.getpid()}
        names = [str(d) for d in self.devices]
        self._weights, self._held_bytes = None, 0
        try:
            with _stable_target() as target, _spawn_without_main():
                for rank, device in enumerate(names):
                    cmd_r, cmd_w = ctx.Pipe(duplex=False)
                    ev_r, ev_w = ctx.Pipe(duplex=False)
                    life_r, life_w = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=target, name=f"block-cascade-rank{rank}",
                                    args=(rank, names, port, cmd_r, ev_w, life_r, self._stop_flag, options))
                    p.start()
                    for end in (cmd_r, ev_w, life_r):
                        end.close()
                    self._workers.append(_Worker(rank, device, p, cmd_w, ev_r, life_w))
            ready = set()

            def on_ready(msg):
                if msg[0] == "ready":
                    ready.add(msg[1])
                    self._workers[msg[1]].memory = msg[2]
                    self.p2p_disabled |= bool(msg[3].get("p2p_disabled"))
            self._pump(on_ready, lambda: len(ready) == len(self._workers), "start-up", START_TIMEOUT)
        except BaseException:
            self._shutdown(graceful=False)
            raise
        if self.p2p_disabled:
            log.warning("Block Cascade: some of %s lack peer access; NCCL_P2P_DISABLE=1 in the workers",
                        ",".join(names))

    def _shutdown(self, graceful: bool) -> None:
        workers, self._workers = self._workers, []
        self._weights = None
        if graceful:
            for w in workers:
                with contextlib.suppress(OSError, ValueError):
                    w.cmd.send(("close",))
            deadline = time.monotonic() + 5.0
            for w in workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:  # the lifeline's end: a worker that is still there exits by itself
            with contextlib.suppress(OSError):
                w.lifeline.close()
        for step in ("wait", "terminate", "kill"):
            alive = [w for w in workers if w.process.is_alive()]
            if not alive:
                break
            for w in alive:
                if step != "wait":
                    with contextlib.suppress(OSError, ValueError):
                        getattr(w.process, step)()
            deadline = time.monotonic() + 2.0
            for w in alive:
                w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            w.process.join(1.0)
            for conn in (w.cmd, w.events):
                with contextlib.suppress(OSError):
                    conn.close()
            with contextlib.suppress(ValueError):
                w.process.close()
        self._store = None

    # ---- waiting on the workers -------------------------------------------------------------------
    def _pump(self, handle: Callable[[tuple], None], finished: Callable[[], bool], phase: str,
              silence: float, poll: Callable[[], None] | None = None) -> None:
        """Dispatch the workers' messages until ``finished()``; any death or error fails the pool."""
        last = time.monotonic()
        while not finished():
            conns = {w.events: w for w in self._workers}
            sentinels = {w.process.sentinel: w for w in self._workers}
            ready = mp_connection.wait(list(conns) + list(sentinels), timeout=0.1)
            for obj in sorted(ready, key=lambda o: o not in conns):  # messages before deaths
                if obj in conns:
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        self._fail(phase)
                    last = time.monotonic()
                    if msg[0] == "error":
                        self._fail(phase, first=msg)
                    handle(msg)
                else:
                    self._fail(phase)
            if poll is not None:
                poll()
            if time.monotonic() - last > silence:
                self._fail(phase, silent=silence)

    def _fail(self, phase: str, first: tuple | None = None, silent: float | None = None):
        """Gather what every rank says for a moment, stop all workers, raise a WorkerError."""
        errors = {first[1]: first[2]} if first else {}
        closed: set[int] = set()
        deadline = time.monotonic() + GRACE
        while True:
            for w in self._workers:
                try:
                    while w.rank not in errors and w.events.poll():
                        msg = w.events.recv()
                        if msg[0] == "error":
                            errors[msg[1]] = msg[2]
                except (EOFError, OSError):
                    closed.add(w.rank)
            waiting = [w for w in self._workers if w.rank not in errors and w.rank not in closed]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        dead = {}
        for w in self._workers:
            w.process.join(0.05 if w.rank in errors else 0.3)
            if w.rank not in errors and w.process.exitcode is not None:
                dead[w.rank] = w.process.exitcode
        workers = list(self._workers)
        self._shutdown(graceful=False)
        raise _compose_error(workers, phase, errors, dead, silent)

