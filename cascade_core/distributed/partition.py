"""The partition of a tick over the ranks: block b belongs to rank b % ranks; one all-gather of
k/v per layer (see :mod:`cascade_core.distributed`), metered (:class:`ExchangeMeter`)."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from ..sampling.loop import Partition
from ..sampling.schedule import Tick

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

class ExchangeMeter:
    """What one rank's K/V exchange cost over a run: ``received_bytes``, the bytes the all-gathers
    brought from the other ranks (their share of each layer's buffer, padding included), and
    :meth:`exposed_seconds`, the time this rank's work waited for them after its own attention was
    queued. On CUDA that is the stall of the compute stream, timed by events recorded around each
    wait (the wait itself returns at once on the host); elsewhere the host's time in the wait."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received_bytes = 0
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def waiting(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_seconds += time.perf_counter() - t0

    def exposed_seconds(self) -> float:
        """Seconds waited over the run (synchronises with the last wait's event on CUDA)."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1000


class _TickExchange:
    """All-gather of one tick's k/v, layer after layer (see the module docstring)."""

    def __init__(self, rank: int, world: int, owners: list[int], meter: ExchangeMeter):
        self.rank, self.world, self.meter = rank, world, meter
        self.rows = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
        self.share = max(len(r) for r in self.rows)
        self.send = self.recv = None

    def start(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> "_Pending":
        if self.send is None:
            self.send = k.new_empty(self.share, 2, *k.shape[1:])  # [share, k|v, L, heads, hd]
            self.recv = k.new_empty(self.world * self.share, 2, *k.shape[1:])
        n = k.shape[0]
        if n:
            self.send[:n, 0] = k
            self.send[:n, 1] = v
        self.meter.received_bytes += (self.world - 1) * self.send.numel() * self.send.element_size()
        return _Pending(self, _all_gather(self.recv, self.send, async_op=True))


class _Pending:
    def __init__(self, exchange: _TickExchange, work):
        self.exchange, self.work = exchange, work

    def wait(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        with self.exchange.meter.waiting():
            self.work.wait()
        ex = self.exchange
        return [(i, ex.recv[r * ex.share + j, 0], ex.recv[r * ex.share + j, 1])
                for r in range(ex.world) if r != ex.rank for j, i in enumerate(ex.rows[r])]


class RankPartition(Partition):
    """One rank's share: blocks b with b % ranks == rank; K/V by all-gather; blocks reported on rank 0."""

    def __init__(self, rank: int, world: int, ctrl, block_shape: tuple, dtype: torch.dtype,
                 device: torch.device):
        self.rank, self.world, self.ctrl = rank, world, ctrl
        self.block_shape, self.dtype, self.device = block_shape, dtype, device
        self.stopped_at: int | None = None
        self.meter = ExchangeMeter(device)

    def owner(self, block: int) -> int:
        return block % self.world

    def owns(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def exchange(self, blocks: list[int], local: list[int]) -> _TickExchange:
        return _TickExchange(self.rank, self.world, [self.owner(b) for b in blocks], self.meter)

    def collect(self, block: int, x0: torch.Tensor | None, frames: int) -> torch.Tensor | None:
        owner = self.owner(block)
        if owner == 0 or self.rank not in (0, owner):
            return x0 if self.rank == 0 else None
        if self.rank == owner:
            dist.send(x0.contiguous(), dst=0)
            return None
        shape = (*self.block_shape[:2], frames, *self.block_shape[3:])  # [1, 16, frames, h, w]
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=owner)
        return buf

    def stop(self, tick: Tick, requested: bool) -> bool:
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self.ctrl)
        if flag.item():
            self.stopped_at = tick.index
        return bool(flag.item())
