"""Block swap: transformer blocks whose weights stay in (pinned) CPU memory and reach the GPU as the forward does.

For a model larger than the card: the first ``resident`` blocks, the embeddings and the head live on the
device; each of the other blocks' tensors is copied from pinned host memory into one of two device *slots*
(blocks of the same layout) on a side CUDA stream while the block before it computes, and the compute
stream waits for that copy only when the block is needed. A slot is refilled only after the kernels of the
block that used it have run (an event per slot), so the copies never race the compute. The weights are
the same numbers wherever they sit: a swapped run gives the resident run's outputs exactly.

What it moves per forward: every swapped block's bytes (14B: about 0.33 GiB a block in fp8, 0.66 in
bf16). It costs nothing where a block's compute takes longer than its copy (host-to-device at about
25 GB/s: 13 ms for an fp8 14B block, against about 6 ms of compute at 4680 tokens and 30 ms at five
blocks in flight on an H100), so it is cheapest with several blocks in flight.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn


class BlockSwap:
    """Streams the last ``swapped`` of ``model.blocks`` from host memory (see the module docstring).

    Attach with :meth:`WanModel.swap_blocks`; the model's forward and prompt encoding then take their blocks
    from :meth:`layers`. :meth:`detach` takes every weight back to the CPU (nothing stays on the device)."""

    def __init__(self, model: nn.Module, device: torch.device, swapped: int):
        blocks = model.blocks
        if not 0 < swapped <= len(blocks):
            raise ValueError(f"blocks to swap must lie in 1..{len(blocks)}, got {swapped}")
        self.model, self.device, self.first = model, torch.device(device), len(blocks) - swapped
        layouts = {_layout(blocks[i]) for i in range(self.first, len(blocks))}
        if len(layouts) > 1:  # the slots hold one layout; a tensor copied into another's would be read wrongly
            raise ValueError(f"block swap needs the swapped blocks stored alike; blocks {self.first}..{len(blocks) - 1} "
                             f"mix storages (e.g. GGUF types or fp8 and bf16 layers): swap fewer blocks or use a "
                             f"file stored alike")
        cuda = self.device.type == "cuda"
        for name, child in model.named_children():  # embeddings, head and the resident blocks on the device
            if name != "blocks":
                child.to(self.device)
        for i, block in enumerate(blocks):
            block.to(self.device if i < self.first else "cpu")
        for p in self._swapped_tensors():  # pinned: copies run asynchronously, at the bus's full rate
            if cuda and not p.is_pinned():
                p.data = p.data.pin_memory()
        self.slots = [copy.deepcopy(blocks[self.first]).to(self.device) for _ in range(min(2, swapped))]
        self._pairs = [[list(zip(_tensors(slot), _tensors(blocks[i]))) for i in range(self.first, len(blocks))]
                       for slot in self.slots]  # [slot][swapped block] -> (device tensor, host tensor)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in self.slots]  # slot filled
        self.free = [None for _ in self.slots]  # slot's last use recorded on the compute stream

    def _swapped_tensors(self) -> list[torch.Tensor]:
        return [t for block in self.model.blocks[self.first:] for t in _tensors(block)]

    @property
    def swapped(self) -> int:
        return len(self.model.blocks) - self.first

    def device_bytes(self) -> int:
        """Bytes of the model's tensors on the device: everything but the swapped blocks, and the slots."""
        held = sum(t.numel() * t.element_size() for t in self.model.state_dict().values() if t.device == self.device)
        return held + sum(t.numel() * t.element_size() for slot in self.slots for t in _tensors(slot))

    def _load(self, j: int, s: int) -> None:
        """Start copying swapped block j into slot s (after the slot's last use)."""
        if self.stream is None:
            for dst, src in self._pairs[s][j]:
                dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            if self.free[s] is not None:
                self.stream.wait_event(self.free[s])
            for dst, src in self._pairs[s][j]:
                dst.copy_(src, non_blocking=True)
            self.ready[s].record(self.stream)

    def layers(self) -> Iterator[nn.Module]:
        """The model's blocks in order, each on the device when the caller runs it (queue its kernels before
        asking for the next one)."""
        blocks, n = self.model.blocks, self.swapped
        self._load(0, 0)  # the first swapped block's copy overlaps the resident blocks
        yield from blocks[:self.first]
        for j in range(n):
            s = j % len(self.slots)
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            if j + 1 < n and len(self.slots) > 1:
                self._load(j + 1, 1 - s)
            yield self.slots[s]
            if self.stream is not None:
                self.free[s] = torch.cuda.current_stream(self.device).record_event()
            if j + 1 < n and len(self.slots) == 1:
                self._load(j + 1, 0)

    def detach(self) -> None:
        """Every weight back on the CPU, the slots dropped; the model runs its blocks in place again."""
        if self.stream is not None:
            self.stream.synchronize()
        self.model.to("cpu")
        self.slots, self._pairs = [], []
        self.model.swap = None


def _layout(block: nn.Module) -> tuple:
    """What a slot must match to hold ``block``: every tensor's name, shape and dtype, and each layer's product
    settings (an fp8 layer's ``fast``, a GGUF layer's type)."""
    tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in block.state_dict().items())
    return tensors + tuple((n, getattr(m, "fast", None), getattr(m, "qtype", None)) for n, m in block.named_modules())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """A block's parameters and buffers, in a fixed order."""
    return [t for t in module.state_dict(keep_vars=True).values() if t is not None]
