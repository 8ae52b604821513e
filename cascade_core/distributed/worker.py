"""The worker process: its entry point (imported by its stable name in the spawned process), the
outbox of messages to the caller and the watch that ends it with its caller."""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import queue
import signal
import sys
import threading
import types

import torch
import torch.distributed as dist

from ..common.transfer import to_host_async
from ..sampling.loop import BlockEvent, Interrupted, TickEvent
from .devices import _free_bytes, _missing_peer_access
from .faults import _describe
from .rank import _control_group, _Rank
from .wire import _from_wire, _to_wire

STABLE_NAME = "cascade_core.distributed.worker"

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
            with torch.cuda.stream(self.stream):  # the copy is queued on the outbox's own stream
                host, event = to_host_async(lat)
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


WATCH_EVERY = 0.25  # seconds between two looks at this process's parent


def _watch_caller(lifeline, caller: int) -> None:
    """End this process (``os._exit``, from a thread of its own, which runs whatever the main thread is
    doing: torch's collectives and tensor ops release the GIL) as soon as either says the caller is gone:
    - the caller's end of the lifeline closed (the caller exited, was killed, or closed it to stop us);
      seen at once;
    - this process's parent is no longer ``caller``'s pid (the kernel handed the orphan to init or a
      subreaper; POSIX); seen within ``WATCH_EVERY`` seconds. This one holds where the first cannot: a process
      the caller forked (``os.fork``, a fork-started multiprocessing child of another package) holds a
      copy of the lifeline's end, so that end stays open after the caller died.
    (Linux's PR_SET_PDEATHSIG is not used: it fires when the *thread* that started the worker ends,
    and a pool may be started by a thread that ends before the process does.)"""
    def watch():
        while True:
            try:
                if lifeline.poll(WATCH_EVERY):  # EOF (nothing is ever sent on it)
                    break
            except (EOFError, OSError):
                break
            if os.getppid() != caller:
                break
        os._exit(0)
    threading.Thread(target=watch, name="block-cascade-lifeline", daemon=True).start()


def _worker_main(rank: int, devices: list[str], port: int, cmd, events, lifeline, stop_flag,
                 options: dict) -> None:
    """Entry point of one worker process (spawned; see WorkerPool)."""
    _watch_caller(lifeline, options["caller"])
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
                               **{k: None if tensors.get(k) is None else _from_wire(tensors[k])
                                  for k in ("noise", "prefix", "image_latent")}}
                callbacks = {}
                if rank == 0:
                    callbacks = dict(on_tick=outbox.tick, on_block=outbox.block,
                                     should_stop=lambda: bool(stop_flag.value))
                result = engine.run(job, tensors, **callbacks)
                stats = None if rank else (result.ticks, result.forwards, result.seconds, result.first_block_seconds)
                outbox.send(("done", rank, stats, _free_bytes(device), torch.get_num_threads(), engine.last_exchange))
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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above cascade_core/
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
