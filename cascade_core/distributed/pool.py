"""The pool on the caller's side: :class:`WorkerPool` uploads the weights, checks each GPU's memory
and runs jobs on its worker processes (:mod:`.processes` starts, watches and stops them; the whole is
described in :mod:`cascade_core.distributed`), and the module's pool (:func:`get_pool`).

Guarantees:
- One command at a time: every upload and run holds the pool's lock; a run that fails half-way
  (the caller's KeyboardInterrupt, a broken pipe) stops the workers, so no half-done command survives.
- The weights go to the workers only when they do not hold this model's current weights; nothing
  is sent while a GPU that reports its memory lacks room for the weights and the run
  (:func:`sampling.memory.estimate_run_bytes`, per rank): that is a ValueError naming the devices.
- A run's callbacks run in the caller's thread; one that raises stops every rank at the same tick
  and its exception is raised once they all stopped, leaving the pool usable.
- :func:`close_pools` closes every pool of the process at exit, a busy one first.
- After a run, :attr:`WorkerPool.last_exchange` gives each rank's K/V exchange of that run: bytes
  received from the other ranks and seconds its work waited for them
  (:class:`~.partition.ExchangeMeter`); empty after a run that was stopped or failed.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import threading
import weakref
from typing import Callable, Sequence

import torch

from ..common.constants import GIB
from ..model.dit import WanModel
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.loop import BlockEvent, Interrupted, Result, TickEvent
from ..sampling.memory import estimate_run_bytes
from ..sampling.plan import RunPlan, latent_size
from .devices import parse_devices
from .faults import WorkerError
from .processes import WorkerProcesses
from .rank import DEFAULT_TIMEOUT
from .wire import _fingerprint, _from_wire, _make_job, _pack, _to_wire, _weights_plan

log = logging.getLogger("block_cascade")
CLOSE_WAIT = 10.0  # seconds close() waits for an interrupted run to end before killing the workers


class WorkerPool(WorkerProcesses):
    """Persistent workers, one rank per device; see :mod:`cascade_core.distributed`."""

    def __init__(self, devices: str | Sequence[str | torch.device], *, timeout: float = DEFAULT_TIMEOUT,
                 threads: int | None = None):
        super().__init__(devices, timeout)
        self.threads = threads  # None: the caller's thread count at each run
        self._lock = threading.RLock()
        self._closed = False
        self._busy = False  # the workers are in the middle of a command
        self._options: dict = {}
        self.last_exchange: dict[int, tuple[int, float]] = {}  # rank -> (bytes received, seconds waited)
        _POOLS.add(self)
        self._start()

    # ---- state and stop ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"WorkerPool({','.join(map(str, self.devices))}, alive={self.alive})"

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop every worker and wait for them; idempotent. A run in progress (in another thread) is
        interrupted at its next tick and given ``wait`` seconds to end (it raises
        :class:`sampling.loop.Interrupted`); if it has not by then (a rank stuck in a collective), the
        workers are killed, which ends that run with a :class:`WorkerError`."""
        self._closed = True
        if self._workers:
            self._stop_flag.value = 1
        if not self._lock.acquire(timeout=wait):
            for w in list(self._workers):  # the running thread sees the deaths and tears down
                with contextlib.suppress(OSError, ValueError):
                    w.process.kill()
            return
        try:
            self._shutdown(graceful=True)
        finally:
            self._lock.release()

    def drop_weights(self) -> None:
        """Forget the uploaded weights; the next run uploads them again (for in-place edits the
        version counters cannot see, e.g. of inference tensors)."""
        with self._lock:
            self._weights = None
            for w in self._workers:
                with contextlib.suppress(OSError):
                    w.cmd.send(("drop",))

    # ---- weights ----------------------------------------------------------------------------------
    def _check_memory(self, need: int, what: str, reusable: int = 0) -> None:
        """Refuse ``need`` bytes per rank unless each GPU has them: its last reported usable memory
        (free, plus what its own caching allocator keeps unused) plus ``reusable`` bytes the worker
        frees before it allocates (the weights it holds, when new ones replace them)."""
        short = [w for w in self._workers if w.memory is not None and w.memory[0] + reusable < need]
        if short:
            listing = ", ".join(f"{w.device} {w.memory[0] / GIB:.2f} of {w.memory[1] / GIB:.1f} GiB free"
                                for w in self._workers if w.memory is not None)
            raise ValueError(f"not enough GPU memory on {', '.join(w.device for w in short)}: each rank needs "
                             f"about {need / GIB:.2f} GiB ({what}); {listing}. Free the GPUs, use fewer blocks, "
                             f"a window, a smaller size, or other devices.")

    def _upload(self, model: WanModel, run_bytes: int, what: str) -> None:
        spec, sd = _weights_plan(model)
        self._check_memory(spec["bytes"] + run_bytes, f"weights {spec['bytes'] / GIB:.2f} GiB, {what}",
                           reusable=self._held_bytes)
        self._busy = True
        for w in self._workers:
            w.cmd.send(("load", spec))
        loaded, acked = set(), set()

        def on_msg(msg):
            if msg[0] == "chunk_ok":
                acked.add(msg[1])
            elif msg[0] == "loaded":
                loaded.add(msg[1])
                self._workers[msg[1]].memory = msg[2]
        for index, (metas, size) in enumerate(zip(spec["chunks"], spec["sizes"])):
            flat = _pack(sd, metas, size, "cpu", shared=True)
            self._workers[0].cmd.send(("chunk", index, flat))
            self._pump(on_msg, lambda: index in acked, "the weight upload", self.timeout + 30)
            del flat
        self._pump(on_msg, lambda: len(loaded) == len(self._workers), "the weight upload", self.timeout + 30)
        self._busy = False
        self._weights, self._held_bytes = (weakref.ref(model), _fingerprint(model)), spec["bytes"]

    def _weights_current(self, model: WanModel) -> bool:
        if self._weights is None:
            return False
        ref, fingerprint = self._weights
        return ref() is model and fingerprint == _fingerprint(model)

    # ---- a run ------------------------------------------------------------------------------------
    def generate(self, model: WanModel, prompts: PromptSchedule, cfg: CascadeConfig, *, blocks: int,
                 width: int, height: int, seed: int = 0, noise: torch.Tensor | None = None,
                 on_tick: Callable[[TickEvent], None] | None = None,
                 on_block: Callable[[BlockEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, prefix: torch.Tensor | None = None,
                 include_prefix: bool = True, block_offset: int = 0, plan: RunPlan | None = None,
                 image_latent: torch.Tensor | None = None) -> Result:
        """Like :func:`sampling.loop.generate`, spread over the pool's devices (see the module docstring);
        ``plan``: the caller's plan of the run for this pool's devices (:func:`sampling.plan.plan_run`);
        ``image_latent``: LongLive 2.0's image latent, as generate takes it (every rank gets it)."""
        run, job, tensors = _make_job(model, prompts, cfg, blocks, width, height, seed, noise, self.world_size,
                                      prefix, include_prefix, block_offset, plan, image_latent)
        with self._lock:
            if self._closed:
                raise RuntimeError("this WorkerPool was closed")
            if not self.alive:
                if self._workers:
                    log.warning("Block Cascade: a worker of %s is gone; starting the pool again", self)
                self._shutdown(graceful=False)
                self._start()
            try:
                run_bytes, what = estimate_run_bytes(run, model.cfg, model.dtype, prompts.text_sets(run.schedule.max_in_flight), 0,
                                                     ranks=self.world_size)
                if not self._weights_current(model):
                    self._upload(model, run_bytes, what)
                else:
                    self._check_memory(run_bytes, what)
                return self._run(model, job, tensors, on_tick, on_block, should_stop)
            except BaseException:
                if self._busy:  # KeyboardInterrupt, a broken pipe, ...: no half-done command survives
                    self._shutdown(graceful=False)
                raise
            finally:
                self._busy = False

    def _run(self, model, job, tensors, on_tick, on_block, should_stop) -> Result:
        wire = {"embeds": [_to_wire(e) for e in tensors["embeds"]],
                **{k: None if tensors[k] is None else _to_wire(tensors[k])
                   for k in ("noise", "prefix", "image_latent")}}
        self._stop_flag.value = int(self._closed)  # a close() from another thread stops it at once
        self._busy = True
        job = {**job, "threads": self.threads or torch.get_num_threads()}
        for w in self._workers:
            w.cmd.send(("run", job, wire if w.rank == 0 else None))
        grid = dataclasses.replace(CascadeConfig(**job["cfg"]).grid, offset=job["prefix"])
        space = model.cfg.latent_space  # the result's channels and size: the model's latent space
        h, w_ = latent_size(job["width"], job["height"], model.cfg.patch_size, space)
        out = torch.empty((1, space.channels, grid.total(job["blocks"]), h, w_), dtype=model.dtype,
                          device=model.device)
        if job["prefix"]:
            out[:, :, :job["prefix"]] = tensors["prefix"].to(model.device, model.dtype)
        finished, interrupted, state = set(), {}, {"stats": None, "error": None, "blocks": 0}
        self.last_exchange = {}

        def stop_all(exc: BaseException | None = None) -> None:
            if exc is not None and state["error"] is None:
                state["error"] = exc
            self._stop_flag.value = 1

        def on_msg(msg):
            tag = msg[0]
            if tag == "done":
                finished.add(msg[1])
                self._workers[msg[1]].memory = msg[3]
                self._workers[msg[1]].threads = msg[4]
                self.last_exchange[msg[1]] = msg[5]
                if msg[1] == 0:
                    state["stats"] = msg[2]
            elif tag == "interrupted":
                finished.add(msg[1])
                interrupted[msg[1]] = (msg[2], msg[3])
            elif state["error"] is not None:
                return  # the caller's code failed: only wait for the ranks to stop
            elif tag == "tick" and on_tick is not None:
                try:
                    on_tick(TickEvent(*msg[1:]))
                except BaseException as exc:  # noqa: BLE001 - re-raised once every rank stopped
                    stop_all(exc)
            elif tag == "block":
                latents = _from_wire(msg[2]).to(model.device, model.dtype)
                b = msg[1]
                out[:, :, grid.start(b):grid.end(b)] = latents
                state["blocks"] += 1
                if on_block is not None:
                    try:
                        on_block(BlockEvent(b, latents, msg[3], msg[4]))
                    except BaseException as exc:  # noqa: BLE001
                        stop_all(exc)

        def poll():
            if should_stop is not None and not self._stop_flag.value and state["error"] is None:
                try:
                    if should_stop():
                        stop_all()
                except BaseException as exc:  # noqa: BLE001
                    stop_all(exc)

        self._pump(on_msg, lambda: len(finished) == len(self._workers), "a run", self.timeout + 30, poll)
        self._busy = False  # every rank is idle again: whatever follows leaves the pool usable
        if state["error"] is not None:
            raise state["error"]
        if interrupted:
            if len(interrupted) != len(self._workers):  # cannot happen: the ranks agree on the tick
                self._shutdown(graceful=False)
                raise WorkerError(f"the ranks did not stop together ({interrupted}); the pool was shut down")
            tick, message = interrupted[0]
            exc = Interrupted(message)
            exc.tick = tick
            raise exc
        ticks, forwards, seconds, first = state["stats"]
        if state["blocks"] != job["blocks"]:
            raise WorkerError(f"rank 0 reported {state['blocks']} of {job['blocks']} blocks")
        return Result.of_run(out, 0, job["prefix"], job["include_prefix"], job["blocks"], ticks, forwards, seconds, first)


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
_CURRENT: WorkerPool | None = None
_CURRENT_LOCK = threading.Lock()


def get_pool(devices: str | Sequence[str | torch.device], **options) -> WorkerPool:
    """The pool for ``devices`` (started on first use, reused after; a failed pool restarts itself
    on its next run). Another device list or other options close the current pool first."""
    global _CURRENT
    key = tuple(parse_devices(devices))
    with _CURRENT_LOCK:
        pool = _CURRENT
        if pool is not None and not pool.closed and tuple(pool.devices) == key and pool._options == options:
            return pool
        if pool is not None:
            pool.close()
        _CURRENT = None
        pool = WorkerPool(list(key), **options)
        pool._options = options
        _CURRENT = pool
        return pool


def generate(model: WanModel, prompts: PromptSchedule, cfg: CascadeConfig, *,
             devices: str | Sequence[str | torch.device], **kw) -> Result:
    """:func:`sampling.loop.generate` on several devices through the module's pool."""
    return get_pool(devices).generate(model, prompts, cfg, **kw)


def close_pools() -> None:
    """Close every pool of this process (registered with atexit); a pool in the middle of a run
    first, so that run stops at its next tick rather than after the idle pools have shut down."""
    global _CURRENT
    _CURRENT = None
    for pool in sorted(_POOLS, key=lambda p: not p._busy):
        with contextlib.suppress(Exception):
            pool.close()


atexit.register(close_pools)
