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
on_tick=None, on_block=None, should_stop=None, prefix=None, include_prefix=True, block_offset=0, plan=None)
-> Result``
    Same signature and result as :func:`sampling.loop.generate` (``plan``: the caller's plan of the run for the
    pool's devices, :func:`sampling.plan.plan_run`); the callbacks run in the caller's thread,
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
Every rank runs :func:`sampling.loop.generate`'s own loop over every tick and keeps a full replica of the
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
or given) by broadcast, re-noising noise from (seed, block, step) on the block's owner. A context
prefix comes from rank 0 by broadcast too, and every rank writes its K/V itself. Text K/V are
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
exit by themselves within a second when the caller's process goes away, even SIGKILLed mid-run with
a rank waiting in a collective (a lifeline pipe, and a watch on their parent process for where a fork
of the caller keeps the pipe open), and ignore SIGINT (the caller decides). Rendezvous: a store in
the caller listening on 127.0.0.1 and a free port only (gloo and NCCL bootstrap on the loopback
interface). Workers import this package under its stable
name ``cascade_core`` (ComfyUI imports custom nodes under path-derived names) and never re-run the
caller's ``__main__``. On CUDA: one process per GPU; NCCL_P2P_DISABLE=1 when a pair of the GPUs lacks
peer access; NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 always (no NVLink multicast).
"""
from __future__ import annotations

from .devices import parse_devices
from .faults import OOM, WorkerError
from .partition import RankPartition
from .pool import WorkerPool, close_pools, generate, get_pool
from .rank import DEFAULT_TIMEOUT, CollectiveRefused, generate_collective, init_from_env, rank_device, refuse_collective

__all__ = ["DEFAULT_TIMEOUT", "OOM", "CollectiveRefused", "RankPartition", "WorkerError",
           "WorkerPool", "close_pools", "generate", "generate_collective", "get_pool", "init_from_env",
           "parse_devices", "rank_device", "refuse_collective"]
