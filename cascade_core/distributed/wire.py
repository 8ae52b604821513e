"""What crosses process boundaries (builtins and tensors only): the tensor wire format, the
weights' plan, chunks and fingerprint, and the job every rank runs."""
from __future__ import annotations

import dataclasses

import torch

from ..model import attention
from ..model.dit import WanModel
from ..model.experts import ExpertPair
from ..model.fp8 import Fp8Linear
from ..sampling.config import CascadeConfig, PromptSchedule
from ..sampling.plan import RunPlan, check_inputs, plan_run, prefix_frames_of
from ..sampling.ticks import check_image_latent

CHUNK_BYTES = 256 << 20  # weights travel in chunks of about this size
ALIGN = 64

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
    spec = {"cfg": dataclasses.asdict(model.cfg),
            "fast_fp8": any(isinstance(m, Fp8Linear) and m.fast for m in model.modules()),
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
              height: int, seed: int, noise: torch.Tensor | None, devices: int,
              prefix: torch.Tensor | None = None, include_prefix: bool = True,
              block_offset: int = 0, plan: RunPlan | None = None,
              image_latent: torch.Tensor | None = None) -> tuple[RunPlan, dict, dict]:
    """Plan and check a run as :func:`sampling.loop.generate` does, for ``devices`` devices (``plan``: the
    caller's, made at its entry); (its plan, the job for every rank, tensors for rank 0).
    ``job["prefix"]``: the context prefix's frames (0: none); ``job["scene_cuts"]``: the schedule's scene cuts
    (LongLive 2.0), sorted; ``job["image_latent"]``: whether block 0 holds an image latent (LongLive 2.0's
    image-to-video, ``tensors["image_latent"]`` [1, C, 1, h, w]). ValueError for a two-expert model (one device)."""
    if isinstance(model, ExpertPair):
        model.check_run(cfg, several_processes=True)
    run = plan or plan_run(cfg, blocks=blocks, width=width, height=height, patch=model.cfg.patch_size,
                           prefix_frames=prefix_frames_of(prefix), switches=len(prompts.entries) - 1, devices=devices,
                           latent_space=model.cfg.latent_space)
    if not run.fits(cfg, blocks, width, height, model.cfg.patch_size, model.cfg.latent_space) \
            or run.devices != devices:
        raise ValueError("the plan given to the pool is the plan of another run (its settings, size or devices)")
    check_inputs(run, prompts, model.cfg.text_dim, noise=noise, prefix=prefix, block_offset=block_offset,
                 dtype=model.dtype)
    check_image_latent(image_latent, run)
    embeds = [e.detach() for _, e in prompts.entries]
    job = {"cfg": dataclasses.asdict(cfg), "blocks": blocks, "width": width, "height": height, "seed": seed,
           "starts": [s for s, _ in prompts.entries], "blend_blocks": dict(prompts.blend_blocks),
           "scene_cuts": sorted(prompts.scene_cuts), "image_latent": image_latent is not None,
           "embeds": [(tuple(e.shape), _dtype_name(e.dtype)) for e in embeds],
           "noise": noise is not None, "prefix": run.grid.offset, "include_prefix": include_prefix,
           "block_offset": block_offset,
           "backend": attention.get_backend()}
    return run, job, {"embeds": embeds, "noise": noise, "prefix": prefix, "image_latent": image_latent}
