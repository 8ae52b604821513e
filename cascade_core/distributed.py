"""Several devices, one video: the KV pool shared across GPUs (or CPU processes) with torch.distributed.

Public API
----------
``WorkerPool(devices, *, timeout=600.0, threads=None)``
    A persistent pool of worker processes (torch.multiprocessing, spawn), one rank per device,
    alive between prompts. ``devices``: "cuda:0,cuda:1,..." (NCCL) or "cpu,cpu,..." (gloo), or a
    list of such names / torch devices. ``timeout``: seconds any collective may wait (a stuck rank
    turns into an error after it). ``threads``: CPU threads per worker (default: the caller's
    ``torch.get_num_threads()`` at each run, so every rank does the caller's arithmetic: on some
    CPUs the thread count changes the rounding of matrix products).
``WorkerPool.generate(model, prompts, cfg, *, blocks, width, height, seed=0, noise=None,
on_tick=None, on_block=None, should_stop=None) -> Result``
    Same signature and result as :func:`sampler.generate`; the callbacks run in the caller's thread,
    the latents land on ``model.device``. The weights go to the workers on the first run and again
    only when the model (or any of its tensors) changed; ``drop_weights()`` forces a new upload.
``WorkerPool.close()``; ``.devices``, ``.world_size``, ``.pids``, ``.worker_threads``, ``.alive``.
``get_pool(devices, **options) -> WorkerPool``
    The module's pool for this device list, reused between calls; asking for other devices closes
    the old pool first. ``generate(model, prompts, cfg, *, devices, **kw)`` runs through it.
    ``close_pools()`` closes it (also registered with atexit).
``parse_devices(spec) -> list[torch.device]``: the device list syntax, checked against the machine.
``WorkerError(RuntimeError)``: a worker crashed, ran out of memory or failed; ``.rank``, ``.device``.
``generate_collective(model, prompts, cfg, *, blocks, width, height, ...) -> Result | None`` and
``init_from_env()``: the same per-rank engine for a process group made by someone else (torchrun,
across machines): every rank calls it, rank 0 passes the model, prompts and config and gets the
Result; the other ranks may pass None and get None. A run rank 0 refuses (or
``refuse_collective(message)``, for a failure before it) ends the others at once with
``CollectiveRefused``.

How the work is shared
----------------------
Every rank runs :func:`sampler.generate`'s own loop over every tick and keeps a full replica of the
KV pool; a :class:`RankPartition` is the only difference. Block b belongs to rank ``b % ranks`` for
its whole life (its x_t never moves), so the blocks in flight spread over the ranks. In each layer
of a tick a rank computes q/k/v of its own segments, starts an all-gather of every rank's k/v (one
collective per layer, padded to the largest share), writes its own k/v into its pool and attends to
the keys that are already final (committed frames, its own segments) while the gather is in flight;
then it writes the other segments' k/v into its pool and merges the attention to them in by
log-sum-exp. A segment that sees no other rank's segment (P1, the oldest block under causal
visibility, FlashBlock reuse steps) takes exactly the single-process path. A clean pass is a segment
like the others, so a finished block's clean K/V reach every replica once, through the same gather.
Noise is the single-process noise: the initial noise comes from rank 0 (drawn there from the seed,
or given) by broadcast, re-noising noise from (seed, block, step) on the block's owner. Text K/V are
computed on every rank from the broadcast weights and prompt embeddings. Each finished block's
latents go from its owner to rank 0, which streams it (and each tick) to the pool's caller.

Weights: the caller's state dict goes to rank 0 in chunks through shared memory (so LoRA-patched or
any loaded weights work and no worker reads the disk); rank 0 broadcasts each chunk once.
Interrupts: rank 0 reads the caller's stop flag at every tick and broadcasts it (gloo, host side),
so all ranks stop before the same tick and the pool stays usable.

Faults
------
The caller's thread watches every worker while it waits: a worker that dies, runs out of memory or
raises makes ``generate`` raise :class:`WorkerError` naming the rank and device (within about a
second of a death; a rank stuck in a collective fails after ``timeout``); then every worker is
stopped (SIGTERM, then SIGKILL) and reaped, and the next ``generate`` starts a fresh pool. Workers
exit by themselves when the caller's process goes away (a lifeline pipe) and ignore SIGINT (the
caller decides). Rendezvous: a store in the caller listening on 127.0.0.1 and a free port only
(gloo and NCCL bootstrap on the loopback interface). Workers import this package under its stable
name ``cascade_core`` (ComfyUI imports custom nodes under path-derived names) and never re-run the
caller's ``__main__``. On CUDA: one process per GPU; NCCL_P2P_DISABLE=1 when a pair of the GPUs lacks
peer access; NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 always (no NVLink multicast).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import gc
import importlib
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
import types
import weakref
from multiprocessing import connection as mp_connection
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from . import attention
from .fp8 import Fp8Linear, quantize_layers
from .memory import estimate_run_bytes
from .model import WanConfig, WanModel
from .parallel.devices import parse_devices
from .sampler import (LATENT_CHANNELS, BlockEvent, CascadeConfig, Interrupted, Partition, PromptSchedule, Result,
                      TickEvent, generate as run_loop, initial_noise, latent_size)
from .schedule import CascadeSchedule, FlowSchedule, Tick

log = logging.getLogger("block_cascade")

STABLE_NAME = "cascade_core.distributed"
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait
START_TIMEOUT = 180.0  # seconds for every worker to start and meet
GRACE = 2.0  # seconds to gather what the other ranks say after a failure
CLOSE_WAIT = 10.0  # seconds close() waits for an interrupted run to end before killing the workers
CHUNK_BYTES = 256 << 20  # weights travel in chunks of about this size
ALIGN = 64
GIB = 1 << 30
TEST_FAULT_ENV = "BLOCK_CASCADE_TEST_FAULT"  # tests only: see _test_fault
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class WorkerError(RuntimeError):
    """A worker of the pool crashed, ran out of memory or failed; names the rank and device."""

    def __init__(self, message: str, rank: int | None = None, device: str | None = None,
                 worker_traceback: str | None = None):
        super().__init__(message)
        self.rank, self.device, self.worker_traceback = rank, device, worker_traceback


# ---- devices --------------------------------------------------------------------------------------

def _loopback_interface() -> str | None:
    try:
        names = {name for _, name in socket.if_nameindex()}
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _worker_env() -> dict[str, str]:
    """Environment every worker sets before it touches NCCL or gloo."""
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    lo = _loopback_interface()
    if lo:  # the pool is one host: bootstrap and gloo traffic stay on the loopback interface
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


def _missing_peer_access(devices: Sequence[torch.device]) -> list[tuple[int, int]]:
    idx = [d.index for d in devices if d.type == "cuda"]
    return [(a, b) for a in idx for b in idx if a != b and not torch.cuda.can_device_access_peer(a, b)]


def _free_bytes(device: torch.device) -> tuple[int, int] | None:
    """(usable, total) bytes of a CUDA device for this process (free + cached but unused)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)), int(total)


# ---- small things that cross process boundaries (builtins and tensors only) ----------------------

def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_wire(t: torch.Tensor) -> dict:
    t = t.detach().to("cpu").contiguous()
    return {"dtype": _dtype_name(t.dtype), "shape": tuple(t.shape),
            "data": t.reshape(-1).view(torch.uint8).numpy().tobytes()}


def _from_wire(w: dict) -> torch.Tensor:
    dtype, shape = _dtype(w["dtype"]), tuple(w["shape"])
    if not w["data"]:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(w["data"]), dtype=torch.uint8).view(dtype).reshape(shape)


def _weights_plan(model: WanModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """The spec every rank builds the model from, and the state dict it describes."""
    sd = model.state_dict()
    chunks, sizes, size = [[]], [0], 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if size and size + n > CHUNK_BYTES:
            chunks.append([])
            sizes.append(0)
            size = 0
        chunks[-1].append((name, _dtype_name(t.dtype), tuple(t.shape), size, n))
        size += -(-n // ALIGN) * ALIGN
        sizes[-1] = size
    spec = {"cfg": dataclasses.asdict(model.cfg), "fp8": any(isinstance(m, Fp8Linear) for m in model.modules()),
            "compile": model.compiled, "chunks": chunks, "sizes": sizes, "bytes": sum(sizes)}
    return spec, sd


def _pack(sd: dict[str, torch.Tensor], metas: list, size: int, device: torch.device | str,
          shared: bool = False) -> torch.Tensor:
    """One chunk of the weights as a flat byte tensor (``shared``: in shared memory)."""
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    if shared:
        flat.share_memory_()
    for name, _, _, offset, n in metas:
        flat[offset:offset + n].copy_(sd[name].detach().contiguous().reshape(-1).view(torch.uint8))
    return flat


def _fingerprint(model: WanModel) -> tuple:
    """Changes when the model's tensors are replaced or modified in place (version counters)."""
    out = [model.compiled]
    for name, t in model.state_dict().items():
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = None
        out.append((name, t.data_ptr(), version, t.dtype, tuple(t.shape), str(t.device)))
    return tuple(out)


def _make_job(model: WanModel, prompts: PromptSchedule, cfg: CascadeConfig, blocks: int, width: int,
              height: int, seed: int, noise: torch.Tensor | None) -> tuple[dict, dict]:
    """Validate a run as :func:`sampler.generate` does; (job for every rank, tensors for rank 0)."""
    cfg.validate()
    flow = FlowSchedule(cfg.steps, cfg.shift, cfg.warp)
    CascadeSchedule(blocks, len(flow), cfg.parallel)
    prompts.validate(blocks, model.cfg.text_dim)
    h, w = latent_size(width, height, model.cfg.patch_size)
    shape = (1, LATENT_CHANNELS, blocks * cfg.frames_per_block, h, w)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"the initial noise must be {list(shape)}, got {list(noise.shape)}")
    embeds = [e.detach() for _, e in prompts.entries]
    job = {"cfg": dataclasses.asdict(cfg), "blocks": blocks, "width": width, "height": height, "seed": seed,
           "starts": [s for s, _ in prompts.entries],
           "embeds": [(tuple(e.shape), _dtype_name(e.dtype)) for e in embeds],
           "noise": noise is not None, "backend": attention.get_backend(),
           "fault": os.environ.get(TEST_FAULT_ENV) or None}
    return job, {"embeds": embeds, "noise": noise}


# ---- one rank: the same loop as one process, through a RankPartition ------------------------------

class _TickExchange:
    """All-gather of one tick's k/v, layer after layer (see the module docstring)."""

    def __init__(self, rank: int, world: int, owners: list[int]):
        self.rank, self.world = rank, world
        self.rows = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
        self.share = max(len(r) for r in self.rows)
        self.send = self.recv = None

    def start(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> "_Pending":
        if self.send is None:
            self.send = k.new_empty(self.share, 2, *k.shape[1:])
            self.recv = k.new_empty(self.world * self.share, 2, *k.shape[1:])
        n = k.shape[0]
        if n:
            self.send[:n, 0] = k
            self.send[:n, 1] = v
        return _Pending(self, _all_gather(self.recv, self.send, async_op=True))


class _Pending:
    def __init__(self, exchange: _TickExchange, work):
        self.exchange, self.work = exchange, work

    def wait(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        self.work.wait()
        ex = self.exchange
        return [(i, ex.recv[r * ex.share + j, 0], ex.recv[r * ex.share + j, 1])
                for r in range(ex.world) if r != ex.rank for j, i in enumerate(ex.rows[r])]


class RankPartition(Partition):
    """One rank's share: blocks b with b % ranks == rank; K/V by all-gather; blocks reported on rank 0."""

    def __init__(self, rank: int, world: int, ctrl, block_shape: tuple, dtype: torch.dtype,
                 device: torch.device, fault: Callable[[int], None] | None = None):
        self.rank, self.world, self.ctrl = rank, world, ctrl
        self.block_shape, self.dtype, self.device, self.fault = block_shape, dtype, device, fault
        self.stopped_at: int | None = None

    def owner(self, block: int) -> int:
        return block % self.world

    def owns(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def exchange(self, blocks: list[int], local: list[int]) -> _TickExchange:
        return _TickExchange(self.rank, self.world, [self.owner(b) for b in blocks])

    def collect(self, block: int, x0: torch.Tensor | None) -> torch.Tensor | None:
        owner = self.owner(block)
        if owner == 0 or self.rank not in (0, owner):
            return x0 if self.rank == 0 else None
        if self.rank == owner:
            dist.send(x0.contiguous(), dst=0)
            return None
        buf = torch.empty(self.block_shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=owner)
        return buf

    def stop(self, tick: Tick, requested: bool) -> bool:
        if self.fault is not None:
            self.fault(tick.index)
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self.ctrl)
        if flag.item():
            self.stopped_at = tick.index
        return bool(flag.item())


class _Rank:
    """The per-rank engine, shared by the pool's workers and :func:`generate_collective`."""

    def __init__(self, rank: int, world: int, device: torch.device, ctrl):
        self.rank, self.world, self.device, self.ctrl = rank, world, device, ctrl
        self.model: WanModel | None = None

    def drop_model(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def load(self, spec: dict, chunks=None, own_model: WanModel | None = None) -> None:
        """Build the model from chunks broadcast by rank 0 (``chunks``: rank 0's flat byte tensors)."""
        self.drop_model()
        sd = {}
        for metas, size in zip(spec["chunks"], spec["sizes"]):
            if self.rank == 0:
                flat = next(chunks).to(self.device)
            else:
                flat = torch.empty(size, dtype=torch.uint8, device=self.device)
            dist.broadcast(flat, src=0)
            if own_model is None:
                for name, dtype, shape, offset, n in metas:
                    sd[name] = flat[offset:offset + n].view(_dtype(dtype)).reshape(shape)
            del flat
        if own_model is not None:
            self.model = own_model
            return
        with torch.device("meta"):
            model = WanModel(WanConfig(**spec["cfg"]))
        if spec["fp8"]:
            quantize_layers(model)
        model.load_state_dict(sd, strict=True, assign=True)
        self.model = model.eval().requires_grad_(False).compile_layers(spec["compile"])

    def run(self, job: dict, tensors: dict | None, *, on_tick=None, on_block=None, should_stop=None) -> Result:
        """One video; ``tensors`` (prompt embeddings, optional noise) and the callbacks on rank 0 only."""
        model, device = self.model, self.device
        attention.set_backend(job["backend"])
        embeds = []
        for k, (shape, dtype) in enumerate(job["embeds"]):
            e = tensors["embeds"][k].to(device) if self.rank == 0 else torch.empty(shape, dtype=_dtype(dtype),
                                                                                   device=device)
            dist.broadcast(e, src=0)
            embeds.append(e)
        cfg = CascadeConfig(**job["cfg"])
        h, w = latent_size(job["width"], job["height"], model.cfg.patch_size)
        fpb = cfg.frames_per_block
        shape = (1, LATENT_CHANNELS, job["blocks"] * fpb, h, w)
        if self.rank != 0:
            noise = torch.empty(shape, dtype=model.dtype, device=device)
        elif job["noise"]:
            noise = tensors["noise"].to(device, model.dtype)
        else:  # exactly as the single-process loop draws it
            noise = initial_noise(job["seed"], shape, device, model.dtype)
        dist.broadcast(noise, src=0)
        part = RankPartition(self.rank, self.world, self.ctrl, (1, LATENT_CHANNELS, fpb, h, w), model.dtype,
                             device, _test_fault(job.get("fault"), self.rank))
        try:
            return run_loop(model, PromptSchedule(list(zip(job["starts"], embeds))), cfg, blocks=job["blocks"],
                            width=job["width"], height=job["height"], seed=job["seed"], noise=noise,
                            on_tick=on_tick, on_block=on_block, should_stop=should_stop, partition=part)
        except Interrupted as exc:
            exc.tick = part.stopped_at
            raise


def rank_device(rank_local: int) -> torch.device:
    """The device of the rank with this local rank: cuda:LOCAL_RANK where CUDA is present, else the CPU."""
    return torch.device("cuda", rank_local) if torch.cuda.is_available() else torch.device("cpu")


def _control_group():
    """A gloo group for host-side flags (the default group itself when it is gloo)."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


# ---- the worker process ---------------------------------------------------------------------------

class _Outbox:
    """Messages to the pool's caller, sent by a thread (device-to-host copies do not stall the loop)."""

    def __init__(self, conn, device: torch.device):
        self.conn, self.q, self.device, self.stream = conn, queue.Queue(), device, None
        self.thread = threading.Thread(target=self._run, name="block-cascade-outbox", daemon=True)
        self.thread.start()

    def send(self, msg: tuple, event=None) -> None:
        self.q.put((msg, event))

    def tick(self, e: TickEvent) -> None:
        self.send(("tick", e.tick, e.ticks, e.pairs, e.done_blocks, e.seconds))

    def block(self, e: BlockEvent) -> None:
        lat, event = e.latents, None
        if lat.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(lat.device)
            self.stream.wait_stream(torch.cuda.current_stream(lat.device))
            with torch.cuda.stream(self.stream):
                host = torch.empty(lat.shape, dtype=lat.dtype, pin_memory=True)
                host.copy_(lat, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            lat.record_stream(self.stream)
        else:
            host = lat.clone()
        self.send(("block", e.block, host, e.tick, e.seconds), event)

    def _run(self) -> None:
        while True:
            msg, event = self.q.get()
            if msg is None:
                return
            if event is not None:
                event.synchronize()
            try:
                self.conn.send(tuple(_to_wire(x) if isinstance(x, torch.Tensor) else x for x in msg))
            except (OSError, ValueError):  # the caller is gone
                return

    def close(self, timeout: float = 10.0) -> None:
        self.q.put((None, None))
        self.thread.join(timeout)


def _watch_lifeline(lifeline) -> None:
    """Exit as soon as the caller's end of the lifeline closes (caller exited, crashed or closed us)."""
    def watch():
        try:
            lifeline.recv()
        except BaseException:  # noqa: BLE001 - EOF or anything: the caller is gone
            pass
        os._exit(0)
    threading.Thread(target=watch, name="block-cascade-lifeline", daemon=True).start()


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


def _test_fault(spec: str | None, rank: int) -> Callable[[int], None] | None:
    """Tests only: BLOCK_CASCADE_TEST_FAULT="rank:tick:kind" in the caller's environment makes that
    rank fail at that tick of the next runs (exit: the process exits; oom: out of memory; raise)."""
    if not spec:
        return None
    r, at, kind = spec.split(":")
    if int(r) != rank:
        return None

    def fault(tick: int) -> None:
        if tick != int(at):
            return
        if kind == "exit":
            os._exit(3)
        if kind == "oom":
            raise OOM(f"test: simulated out of memory at tick {tick}")
        raise RuntimeError(f"test: simulated failure at tick {tick}")
    return fault


def _worker_main(rank: int, devices: list[str], port: int, cmd, events, lifeline, stop_flag,
                 options: dict) -> None:
    """Entry point of one worker process (spawned; see WorkerPool)."""
    _watch_lifeline(lifeline)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(options["env"])
    device = torch.device(devices[rank])
    outbox = _Outbox(events, device)
    timeout = datetime.timedelta(seconds=options["timeout"])
    try:
        info = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            missing = _missing_peer_access([torch.device(d) for d in devices])
            if missing and "NCCL_P2P_DISABLE" not in os.environ:
                os.environ["NCCL_P2P_DISABLE"] = "1"
            info["p2p_disabled"] = os.environ.get("NCCL_P2P_DISABLE") == "1"
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=len(devices), timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        engine = _Rank(rank, len(devices), device, _control_group())
        outbox.send(("ready", rank, _free_bytes(device), info))
    except BaseException as exc:  # noqa: BLE001 - reported, then the caller tears the pool down
        outbox.send(("error", rank, _describe(exc, device)))
        outbox.close()
        os._exit(1)

    def chunks():  # rank 0: the caller's chunks, each acknowledged on arrival (it may pack the next)
        while True:
            _, index, flat = cmd.recv()
            outbox.send(("chunk_ok", index))
            yield flat

    while True:
        try:
            msg = cmd.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            if msg[0] == "close":
                break
            if msg[0] == "load":
                engine.load(msg[1], chunks() if rank == 0 else None)
                outbox.send(("loaded", rank, _free_bytes(device)))
            elif msg[0] == "drop":
                engine.drop_model()
            elif msg[0] == "run":
                job, tensors = msg[1], msg[2]
                torch.set_num_threads(job["threads"])
                if tensors is not None:
                    tensors = {"embeds": [_from_wire(e) for e in tensors["embeds"]],
                               "noise": None if tensors["noise"] is None else _from_wire(tensors["noise"])}
                callbacks = {}
                if rank == 0:
                    callbacks = dict(on_tick=outbox.tick, on_block=outbox.block,
                                     should_stop=lambda: bool(stop_flag.value))
                result = engine.run(job, tensors, **callbacks)
                stats = None if rank else (result.ticks, result.forwards, result.seconds, result.first_block_seconds)
                outbox.send(("done", rank, stats, _free_bytes(device), torch.get_num_threads()))
        except Interrupted as exc:
            outbox.send(("interrupted", rank, getattr(exc, "tick", None), str(exc)))
        except BaseException as exc:  # noqa: BLE001 - reported; the caller tears the pool down
            outbox.send(("error", rank, _describe(exc, device)))
            outbox.close()
            os._exit(1)
    outbox.close()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    os._exit(0)


# ---- the pool (the caller's side) -----------------------------------------------------------------

@contextlib.contextmanager
def _spawn_without_main():
    """Spawned children re-import the parent's ``__main__`` (ComfyUI's main.py, a user script);
    ours need nothing from it, so they are started while a bare stand-in is ``__main__``."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@contextlib.contextmanager
def _stable_target():
    """The worker entry point under the stable package name (importable in a fresh process)."""
    if __name__ == STABLE_NAME:
        yield _worker_main
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        mod = importlib.import_module(STABLE_NAME)
        if os.path.realpath(mod.__file__) != os.path.realpath(__file__):
            raise RuntimeError(f"{STABLE_NAME} resolves to {mod.__file__}, not to this pack ({__file__}); "
                               f"remove the other copy from the Python path")
        yield mod._worker_main
    finally:
        if added and root in sys.path:
            sys.path.remove(root)


class _Worker:
    def __init__(self, rank, device, process, cmd, events, lifeline):
        self.rank, self.device, self.process = rank, device, process
        self.cmd, self.events, self.lifeline = cmd, events, lifeline
        self.memory = None  # (usable, total) bytes on its GPU, as last reported
        self.threads = None  # CPU threads it ran its last job with


class WorkerPool:
    """Persistent workers, one rank per device; see the module docstring."""

    def __init__(self, devices: str | Sequence[str | torch.device], *, timeout: float = DEFAULT_TIMEOUT,
                 threads: int | None = None):
        self.devices = parse_devices(devices)
        self.timeout = float(timeout)
        self.threads = threads  # None: the caller's thread count at each run
        self._workers: list[_Worker] = []
        self._lock = threading.RLock()
        self._weights = None  # (weakref to the model, fingerprint) of the weights the workers hold
        self._store = None
        self._closed = False
        self._busy = False  # the workers are in the middle of a command
        self._options: dict = {}
        self.p2p_disabled = False
        _POOLS.add(self)
        self._start()

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

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"WorkerPool({','.join(map(str, self.devices))}, alive={self.alive})"

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
        options = {"env": _worker_env(), "timeout": self.timeout}
        names = [str(d) for d in self.devices]
        self._weights = None
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

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop every worker and wait for them; idempotent. A run in progress (in another thread) is
        interrupted at its next tick and given ``wait`` seconds to end (it raises
        :class:`sampler.Interrupted`); if it has not by then (a rank stuck in a collective), the
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

    # ---- weights ----------------------------------------------------------------------------------
    def _check_memory(self, need: int, what: str) -> None:
        short = [w for w in self._workers if w.memory is not None and w.memory[0] < need]
        if short:
            listing = ", ".join(f"{w.device} {w.memory[0] / GIB:.2f} of {w.memory[1] / GIB:.1f} GiB free"
                                for w in self._workers if w.memory is not None)
            raise ValueError(f"not enough GPU memory on {', '.join(w.device for w in short)}: each rank needs "
                             f"about {need / GIB:.2f} GiB ({what}); {listing}. Free the GPUs, use fewer blocks, "
                             f"a window, a smaller size, or other devices.")

    def _upload(self, model: WanModel, run_bytes: int, what: str) -> None:
        spec, sd = _weights_plan(model)
        self._check_memory(spec["bytes"] + run_bytes, f"weights {spec['bytes'] / GIB:.2f} GiB, {what}")
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
        self._weights = (weakref.ref(model), _fingerprint(model))

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
                 should_stop: Callable[[], bool] | None = None) -> Result:
        """Like :func:`sampler.generate`, spread over the pool's devices (see the module docstring)."""
        job, tensors = _make_job(model, prompts, cfg, blocks, width, height, seed, noise)
        with self._lock:
            if self._closed:
                raise RuntimeError("this WorkerPool was closed")
            if not self.alive:
                if self._workers:
                    log.warning("Block Cascade: a worker of %s is gone; starting the pool again", self)
                self._shutdown(graceful=False)
                self._start()
            try:
                run_bytes, what = estimate_run_bytes(model.cfg, model.dtype, cfg, blocks, width, height,
                                                     len(prompts.entries), 0, ranks=self.world_size)
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
                "noise": None if tensors["noise"] is None else _to_wire(tensors["noise"])}
        self._stop_flag.value = int(self._closed)  # a close() from another thread stops it at once
        self._busy = True
        job = {**job, "threads": self.threads or torch.get_num_threads()}
        for w in self._workers:
            w.cmd.send(("run", job, wire if w.rank == 0 else None))
        fpb = job["cfg"]["frames_per_block"]
        h, w_ = latent_size(job["width"], job["height"], model.cfg.patch_size)
        out = torch.empty((1, LATENT_CHANNELS, job["blocks"] * fpb, h, w_), dtype=model.dtype, device=model.device)
        finished, interrupted, state = set(), {}, {"stats": None, "error": None, "blocks": 0}

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
                out[:, :, b * fpb:(b + 1) * fpb] = latents
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
        return Result(out, job["blocks"], ticks, forwards, seconds, first)


def _short(message: str, limit: int = 160) -> str:
    """A communication library's error in a few words (no source paths, no advice)."""
    text = re.sub(r"\[[^\]]*\.(?:cpp|cc|h|hpp):\d+\]\s*", "", message)
    text = text.split(" This is typically")[0].strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _compose_error(workers: list[_Worker], phase: str, errors: dict, dead: dict, silent) -> WorkerError:
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


# ---- the module's pool ----------------------------------------------------------------------------

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
    """:func:`sampler.generate` on several devices through the module's pool."""
    return get_pool(devices).generate(model, prompts, cfg, **kw)


def close_pools() -> None:
    """Close every pool of this process (registered with atexit)."""
    global _CURRENT
    _CURRENT = None
    for pool in list(_POOLS):
        with contextlib.suppress(Exception):
            pool.close()


atexit.register(close_pools)


# ---- a process group made by someone else (torchrun, several machines) ---------------------------

def init_from_env(timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL with
    cuda:LOCAL_RANK where CUDA is present, else gloo on the CPU. Returns this rank's device."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"--devices torchrun needs the environment torchrun sets ({key} is missing); "
                             f"start with torchrun --nproc-per-node N -m cascade_core generate --devices torchrun")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    return device


class CollectiveRefused(ValueError):
    """Raised on the ranks other than 0 when rank 0 refused the run (rank 0 reports the reason)."""


def refuse_collective(message: str) -> None:
    """Rank 0 tells the other ranks, which wait in :func:`generate_collective`, that there is no run
    (a bad argument, an unreadable file): they raise :class:`CollectiveRefused` at once instead of
    waiting out the collective timeout."""
    ctrl = _control_group()
    try:
        dist.broadcast_object_list([("refused", message)], src=0, group=ctrl)
    finally:
        _destroy(ctrl)


def _destroy(group) -> None:
    if group is not dist.group.WORLD:
        dist.destroy_process_group(group)


def generate_collective(model: WanModel | None, prompts: PromptSchedule | None, cfg: CascadeConfig | None, *,
                        blocks: int = 0, width: int = 0, height: int = 0, seed: int = 0,
                        noise: torch.Tensor | None = None, on_tick=None, on_block=None, should_stop=None,
                        device: torch.device | None = None) -> Result | None:
    """Every rank of the initialised default process group calls this; rank 0 passes the model,
    prompts, config and run arguments (the others' are ignored: the weights, prompt embeddings and
    noise come from rank 0) and gets the Result, the others get None. ``device``: this rank's device
    (default: cuda:LOCAL_RANK or the CPU). The weights are broadcast on every call; the caller's model
    is never moved or changed (rank 0 runs it in place only when it already lies on ``device``).

    Raises on rank 0 what :func:`sampler.generate` raises for bad arguments, before any collective
    but the one that tells the other ranks (they raise :class:`CollectiveRefused`, see also
    :func:`refuse_collective`)."""
    rank = dist.get_rank()
    device = device or rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    ctrl = _control_group()
    try:
        head: list = [None]
        if rank == 0:
            try:
                if model is None or prompts is None or cfg is None:
                    raise ValueError("rank 0 needs the model, the prompts and the config")
                job, tensors = _make_job(model, prompts, cfg, blocks, width, height, seed, noise)
            except Exception as exc:
                dist.broadcast_object_list([("refused", str(exc))], src=0, group=ctrl)
                raise
            spec, sd = _weights_plan(model)
            head = [("run", spec, job)]
        dist.broadcast_object_list(head, src=0, group=ctrl)
        if head[0][0] == "refused":
            raise CollectiveRefused(head[0][1])
        _, spec, job = head[0]
        engine = _Rank(rank, dist.get_world_size(), device, ctrl)
        if rank == 0:
            chunks = (_pack(sd, metas, size, device) for metas, size in zip(spec["chunks"], spec["sizes"]))
            engine.load(spec, chunks, own_model=model if model.device == device else None)
            return engine.run(job, tensors, on_tick=on_tick, on_block=on_block, should_stop=should_stop)
        engine.load(spec)
        engine.run(job, None)
        return None
    finally:
        _destroy(ctrl)
