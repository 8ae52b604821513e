"""One rank: the same loop as one process through a RankPartition; used by the pool's workers and
by :func:`generate_collective` for a process group made by someone else (torchrun, several machines)."""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from ..model import attention
from ..model.dit import WanConfig, WanModel
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.loop import Interrupted, Result
from ..sampling.loop import generate as run_loop
from ..sampling.noise import initial_noise
from ..sampling.plan import latent_size
from .partition import RankPartition
from .wire import _dtype, _make_job, _pack, _weights_plan

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait

class _Rank:
    """The per-rank engine, shared by the pool's workers and :func:`generate_collective`."""

    def __init__(self, rank: int, world: int, device: torch.device, ctrl):
        self.rank, self.world, self.device, self.ctrl = rank, world, device, ctrl
        self.model: WanModel | None = None
        self.last_exchange = (0, 0.0)  # the last run's K/V exchange: (bytes received, seconds waited)

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
        cfg = WanConfig(**spec["cfg"])
        model = WanModel.from_state_dict(sd, num_heads=cfg.num_heads, fast_fp8=spec["fast_fp8"])
        self.model = model.compile_layers(spec["compile"])

    def run(self, job: dict, tensors: dict | None, *, on_tick=None, on_block=None, should_stop=None) -> Result:
        """One video; ``tensors`` (prompt embeddings, optional noise, context prefix and image latent) and the
        callbacks on rank 0 only. Every rank gets the prefix and writes its K/V itself, and the image latent;
        the prompt schedule's blends and scene cuts come with the job."""
        model, device = self.model, self.device
        attention.set_backend(job["backend"])
        embeds = []
        for k, (shape, dtype) in enumerate(job["embeds"]):
            e = tensors["embeds"][k].to(device) if self.rank == 0 else torch.empty(shape, dtype=_dtype(dtype),
                                                                                   device=device)
            dist.broadcast(e, src=0)
            embeds.append(e)
        cfg = CascadeConfig(**job["cfg"])
        space = model.cfg.latent_space  # the buffers' channels and size: the model's latent space
        h, w = latent_size(job["width"], job["height"], model.cfg.patch_size, space)
        shape = (1, space.channels, cfg.grid.total(job["blocks"]), h, w)
        if self.rank != 0:
            noise = torch.empty(shape, dtype=model.dtype, device=device)
        elif job["noise"]:
            noise = tensors["noise"].to(device, model.dtype)
        else:  # exactly as the single-process loop draws it
            noise = initial_noise(job["seed"], shape, device, model.dtype)
        dist.broadcast(noise, src=0)
        prefix = None
        if job.get("prefix"):
            prefix = tensors["prefix"].to(device, model.dtype) if self.rank == 0 else \
                torch.empty((1, space.channels, job["prefix"], h, w), dtype=model.dtype, device=device)
            dist.broadcast(prefix, src=0)
        image = None  # LongLive 2.0's image latent, block 0's frame 0 on every rank
        if job.get("image_latent"):
            image = tensors["image_latent"].to(device, model.dtype) if self.rank == 0 else \
                torch.empty((1, space.channels, 1, h, w), dtype=model.dtype, device=device)
            dist.broadcast(image, src=0)
        part = RankPartition(self.rank, self.world, self.ctrl, (1, space.channels, cfg.frames_per_block, h, w),
                             model.dtype, device)
        try:
            prompts = PromptSchedule(list(zip(job["starts"], embeds)), job.get("blend_blocks", {}),
                                     set(job.get("scene_cuts", ())))
            result = run_loop(model, prompts, cfg, blocks=job["blocks"],
                              width=job["width"], height=job["height"], seed=job["seed"], noise=noise,
                              on_tick=on_tick, on_block=on_block, should_stop=should_stop, partition=part,
                              prefix=prefix, include_prefix=job.get("include_prefix", True),
                              block_offset=job.get("block_offset", 0), image_latent=image)
        except Interrupted as exc:
            exc.tick = part.stopped_at
            raise
        self.last_exchange = (part.meter.received_bytes, part.meter.exposed_seconds())
        return result


def rank_device(rank_local: int) -> torch.device:
    """The device of the rank with this local rank: cuda:LOCAL_RANK where CUDA is present, else the CPU."""
    return torch.device("cuda", rank_local) if torch.cuda.is_available() else torch.device("cpu")


def _control_group():
    """A gloo group for host-side flags (the default group itself when it is gloo)."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


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
                        device: torch.device | None = None, prefix: torch.Tensor | None = None,
                        include_prefix: bool = True, block_offset: int = 0, plan=None,
                        image_latent: torch.Tensor | None = None) -> Result | None:
    """Every rank of the initialised default process group calls this; rank 0 passes the model,
    prompts, config and run arguments (the others' are ignored: the weights, prompt embeddings and
    noise come from rank 0) and gets the Result, the others get None; ``plan``: rank 0's plan of the run
    (:func:`sampling.plan.plan_run`, made at the caller's entry; else made here); ``image_latent``: as
    :func:`sampling.loop.generate` takes it (rank 0's, broadcast). ``device``: this rank's device
    (default: cuda:LOCAL_RANK or the CPU). The weights are broadcast on every call; the caller's model
    is never moved or changed (rank 0 runs it in place only when it already lies on ``device``).

    Raises on rank 0 what :func:`sampling.loop.generate` raises for bad arguments, before any collective
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
                _, job, tensors = _make_job(model, prompts, cfg, blocks, width, height, seed, noise,
                                            dist.get_world_size(), prefix, include_prefix, block_offset, plan,
                                            image_latent)
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
