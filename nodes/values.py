"""The values that travel on the pack's own sockets, and the engine-model handles.

A ``BLOCK_CASCADE_MODEL`` is an :class:`EngineModel`: it knows the model's configuration without
touching a GPU, and hands out a :class:`cascade_core.model.dit.WanModel` on a device for one run
(:meth:`EngineModel.acquire`). Two kinds:

- :class:`FileModel` (Load Causal Video Model): the weights live on the offload device and are
  managed by ComfyUI's model management like any core model (so ComfyUI can unload them when it needs
  room), loaded fully before a run.
- :class:`CoreModel` (Causal Model from MODEL): a core ``MODEL``; ComfyUI loads and patches it first
  (LoRAs and other weight patches applied), then a WanModel is built around its very tensors (no
  copy) for the run and dropped after it.

Several devices (a worker pool) take :meth:`EngineModel.acquire_for_pool` instead: the weights on the
CPU, the same WanModel while they are unchanged, so the pool uploads them once and no GPU of
ComfyUI's process holds a copy beside a worker's.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from cascade_core.model.dit import WanConfig, WanModel
from cascade_core.model.fp8 import DROP_SUFFIXES, FP8_DTYPES, MARKER, SCALE_SUFFIXES, prepare_weights, weight_dtype_of
from cascade_core.sampling.config import CascadeConfig
from cascade_core.sampling.families import DEFAULT_FAMILY, family_with

log = logging.getLogger("block_cascade")


def state_dict_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _mm():
    try:
        import comfy.model_management as mm
        return mm
    except ImportError:
        return None


@dataclass(frozen=True)
class Settings:
    """What the Block Cascade Config node produces.

    ``cascade``: the config as the node resolved it (its family, "auto" read as self-forcing);
    ``family``: the node's family choice ("auto": the model's, see :meth:`config_for`); ``explicit``:
    the config fields the node's widgets set (over any family's), None when ``cascade`` is given whole.
    """

    cascade: CascadeConfig = CascadeConfig()
    devices: str = "auto"
    attention_backend: str = "auto"
    flashblock: bool = False
    family: str = "auto"
    explicit: tuple[str, ...] | None = None
    compile: str = "auto"
    swap_blocks: int = -1  # transformer blocks streamed from CPU memory (-1: as the memory estimate says)

    def config_for(self, model_family: str | None, switch_mode: str = "auto") -> tuple[CascadeConfig, str, bool]:
        """(config, family, whether the family was the model's guess) of a run: with family "auto"
        the model's family (from its file name) fills every setting the widgets left to the family;
        ``switch_mode`` (from the prompt schedule, "auto" = the family's) wins over both.
        Raises ValueError for a combination out of range."""
        family = self.family if self.family != "auto" else (model_family or DEFAULT_FAMILY)
        assumed = self.family == "auto" and model_family is not None
        if self.explicit is None:
            cfg = self.cascade
        else:
            given = {f: getattr(self.cascade, f) for f in self.explicit}
            cfg = family_with(family, given)
        if switch_mode != "auto":
            cfg = dataclasses.replace(cfg, switch_mode=switch_mode)
        cfg.validate(unlimited_window="0")
        return cfg, family, assumed


@dataclass(frozen=True)
class ScheduleValue:
    """A prompt schedule: (start block, prompt embeddings [L, text_dim]) sorted by start block, what a
    switch does (``switch_mode``: "auto" = the family's, or one of sampler.SWITCH_MODES) and (start block,
    N) of the switches that blend the old and new prompts over N > 0 blocks (``blends``)."""

    entries: tuple[tuple[int, torch.Tensor], ...] = field(default_factory=tuple)
    switch_mode: str = "auto"
    blends: tuple[tuple[int, int], ...] = ()

    def with_entry(self, start: int, embeds: torch.Tensor, switch_mode: str = "auto",
                   blend_blocks: int = 0) -> "ScheduleValue":
        if any(s == start for s, _ in self.entries):
            raise ValueError(f"the prompt schedule already has a prompt at block {start}; each start "
                             f"block may hold one prompt")
        if "auto" not in (switch_mode, self.switch_mode) and switch_mode != self.switch_mode:
            raise ValueError(f"the prompt schedule's entries ask for switch modes {self.switch_mode} and "
                             f"{switch_mode}: a schedule has one mode; set it on one entry (the others auto)")
        mode = self.switch_mode if switch_mode == "auto" else switch_mode
        return ScheduleValue(tuple(sorted(self.entries + ((start, embeds),), key=lambda e: e[0])), mode,
                             self.blends + (((start, blend_blocks),) if blend_blocks else ()))


class EngineModel:
    """Base of the BLOCK_CASCADE_MODEL values (see the module docstring)."""

    label: str = "model"
    cfg: WanConfig
    family: tuple[str, str] | None = None  # (family, why) read off the file names; None: not said
    experts: int = 1  # 2: a Wan2.2 A14B pair (nodes.experts.PairModel), counted so by the memory estimate

    def check_run(self, cfg, several_devices: bool) -> None:
        """ValueError (one line) for sampling settings this model does not run, before any GPU work (none for one
        DiT; a pair's: :meth:`nodes.experts.PairModel.check_run`)."""

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        raise NotImplementedError

    def block_bytes(self) -> int:
        """Bytes of the largest transformer block's weights (what a swap slot holds)."""
        raise NotImplementedError

    def weight_dtype(self) -> str:
        """The block weights' storage in the loader's words (:func:`cascade_core.model.fp8.weight_dtype_of`)."""
        return str(self.dtype).removeprefix("torch.")

    def acquire_swapped(self, device: torch.device, swapped: int) -> WanModel:
        """The model running on ``device`` with its last ``swapped`` blocks streamed from host memory (the
        weights taken off ComfyUI's device first, as for a pool; ``model.swap.detach()`` after the run)."""
        return self.acquire_for_pool().swap_blocks(device, swapped)

    def resident_on(self, device: torch.device) -> bool:
        return False

    def acquire(self, device: torch.device, extra_bytes: int) -> WanModel:
        raise NotImplementedError

    def acquire_for_pool(self) -> WanModel:
        """The model with its weights on the CPU, for a worker pool (which uploads them to its GPUs
        only when they changed since its last run): no copy of the weights stays on a GPU of this
        process beside the workers' copies. The same WanModel object is returned run after run while
        the weights are unchanged (that identity is what spares the pool an upload)."""
        raise NotImplementedError

    def describe(self) -> str:
        c = self.cfg
        return (f"{self.label}: Wan2.1 DiT, width {c.dim}, {c.num_layers} layers, {c.num_heads} heads, "
                f"text width {c.text_dim}")


class _Holder(torch.nn.Module):
    """Wraps a WanModel for ComfyUI's ModelPatcher (which sets attributes such as ``device`` on it)."""

    def __init__(self, model: WanModel):
        super().__init__()
        self.diffusion_model = model


class FileModel(EngineModel):
    def __init__(self, model: WanModel, label: str, info: str = ""):
        self.model, self.label, self.info = model, label, info
        self.cfg = model.cfg
        self._patcher = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def weight_bytes(self) -> int:
        return state_dict_bytes(self.model.state_dict())

    def block_bytes(self) -> int:
        return max(state_dict_bytes(b.state_dict()) for b in self.model.blocks)

    def weight_dtype(self) -> str:
        return weight_dtype_of(self.model)

    def resident_on(self, device: torch.device) -> bool:
        return self.model.device == device

    def _unload(self, mm) -> None:
        """Take the weights off ComfyUI's load device (back to the offload device) and forget the patcher."""
        for loaded in list(getattr(mm, "current_loaded_models", [])):
            if getattr(loaded, "model", None) is self._patcher:
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)
        self._patcher = None

    def _patcher_for(self, device: torch.device, mm):
        try:
            from comfy.model_patcher import ModelPatcher
        except ImportError:
            return None
        if self._patcher is not None and torch.device(self._patcher.load_device) != device:
            self._unload(mm)
        if self._patcher is None:
            offload = mm.unet_offload_device() if hasattr(mm, "unet_offload_device") else torch.device("cpu")
            self._patcher = ModelPatcher(_Holder(self.model), load_device=device, offload_device=offload)
        return self._patcher

    def acquire(self, device: torch.device, extra_bytes: int) -> WanModel:
        mm = _mm()
        patcher = self._patcher_for(device, mm) if mm is not None else None
        if patcher is not None:
            mm.load_models_gpu([patcher], memory_required=extra_bytes, force_full_load=True)
        if self.model.device != device:  # no ModelPatcher (outside ComfyUI), or it left the weights elsewhere
            self.model.to(device)
        return self.model

    def acquire_for_pool(self) -> WanModel:
        mm = _mm()
        if self._patcher is not None and mm is not None:
            self._unload(mm)
        if self.model.device.type != "cpu":
            self.model.to("cpu")
        return self.model


class CoreModel(EngineModel):
    def __init__(self, patcher, label: str = "MODEL"):
        self.patcher, self.label = patcher, label
        sd = self._module().state_dict()  # shapes only; nothing moves
        self.cfg = WanConfig.from_state_dict(sd)
        self._bytes = state_dict_bytes(sd)
        self._block_bytes = max(state_dict_bytes({k: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")})
                                for i in range(self.cfg.num_layers))
        self._pool_model: tuple | None = None  # (patches key, WanModel on the CPU) of the last pool run

    def _module(self) -> torch.nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: ComfyUI's manual cast dtype where the weights are stored fp8."""
        stored = self._module().patch_embedding.weight.dtype
        cast = getattr(self.patcher.model, "manual_cast_dtype", None)
        return stored if stored not in FP8_DTYPES else cast if cast not in (None, *FP8_DTYPES) else torch.bfloat16

    def weight_bytes(self) -> int:
        return self._bytes

    def block_bytes(self) -> int:
        return self._block_bytes

    def weight_dtype(self) -> str:
        """fp8 where ComfyUI holds the blocks' weights as fp8 (they stay so in the run), else the compute dtype."""
        stored = self._module().blocks[0].ffn[0].weight.dtype
        if stored not in FP8_DTYPES:
            return super().weight_dtype()
        return "fp8_" + str(stored).removeprefix("torch.float8_") + ("_fast" if _fast_fp8(self.patcher) else "")

    def resident_on(self, device: torch.device) -> bool:
        return self._module().patch_embedding.weight.device == device

    def acquire(self, device: torch.device, extra_bytes: int) -> WanModel:
        mm = _mm()
        if mm is not None and hasattr(mm, "load_models_gpu"):
            # Loads the weights onto the patcher's device with every weight patch (LoRA, ...) applied.
            mm.load_models_gpu([self.patcher], memory_required=extra_bytes, force_patch_weights=True,
                               force_full_load=True)
        return self._engine_model(device)

    def _engine_model(self, device: torch.device) -> WanModel:
        """A WanModel around the live (patched) tensors, shared where they already lie on ``device``; block
        weights ComfyUI holds as fp8 stay fp8 (fp8 products where ComfyUI's own "fast" choice asked)."""
        sd, dtype, fast = compute_weights(self._module().state_dict(),
                                          getattr(self.patcher.model, "manual_cast_dtype", None),
                                          fast=_fast_fp8(self.patcher))
        first = next(iter(sd.values()))
        return WanModel.from_state_dict(sd, dtype=dtype, device=device if first.device != device else None,
                                        fast_fp8=fast)

    def acquire_swapped(self, device: torch.device, swapped: int) -> WanModel:
        """As the base, with the CPU model not kept for a later pool run: swapping moves its tensors into copies
        of its own (pinned, or moved back from the device), which must not stay beside ComfyUI's."""
        model = self.acquire_for_pool()
        self._pool_model = None
        return model.swap_blocks(device, swapped)

    def acquire_for_pool(self) -> WanModel:
        # ComfyUI's patches (LoRAs, ...) are identified by the patcher's patches_uuid: while it stays
        # the same, so do the weights, and the pool keeps what it has.
        key = getattr(self.patcher, "patches_uuid", None)
        if self._pool_model is not None and key is not None and self._pool_model[0] == key:
            return self._pool_model[1]
        cpu = torch.device("cpu")
        mm = _mm()
        if mm is not None and hasattr(mm, "load_models_gpu") and hasattr(self.patcher, "clone"):
            # ComfyUI itself applies the patches, into the weights on the CPU (a clone whose load device
            # is the CPU): its GPU copy, if any, goes, and no second copy is made.
            on_cpu = self.patcher.clone()
            on_cpu.load_device = cpu
            mm.load_models_gpu([on_cpu], force_patch_weights=True, force_full_load=True)
        model = self._engine_model(cpu)
        self._pool_model = (key, model)
        return model


def _fast_fp8(patcher) -> bool:
    """Whether ComfyUI's model options ask for fp8 products (UNETLoader's fp8_e4m3fn_fast)."""
    options = getattr(getattr(patcher, "model", None), "model_config", None)
    optimizations = getattr(options, "optimizations", None) or {}
    return bool(optimizations.get("fp8", False)) if isinstance(optimizations, dict) else False


def compute_weights(sd: dict[str, torch.Tensor], cast_dtype: torch.dtype | None, fast: bool = False
                    ) -> tuple[dict[str, torch.Tensor], torch.dtype | None, bool]:
    """Make a core model's state dict usable by the engine: one compute dtype, the block weights stored fp8
    kept fp8 (:func:`cascade_core.model.fp8.prepare_weights`, the checkpoint loader's own reader).

    Returns the state dict (the same tensors where nothing changes), the dtype to cast the rest to (None when
    the weights already share one usable dtype: ComfyUI's ``manual_cast_dtype`` when it names one, else the
    model's non-fp8 dtype) and whether the fp8 layers multiply as fp8 (``fast``, or an e4m3 file kept as
    stored). Raises ValueError for a scale that fits no weight.
    """
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    extra = any(k.endswith(SCALE_SUFFIXES + DROP_SUFFIXES) or k == MARKER for k in sd)
    if not dtypes.intersection(FP8_DTYPES) and len(dtypes) == 1 and not extra:
        return sd, None, False
    target = cast_dtype if cast_dtype is not None and cast_dtype not in FP8_DTYPES else None
    if target is None:
        usable = [d for d in dtypes if d not in FP8_DTYPES]
        target = sd["patch_embedding.weight"].dtype if sd["patch_embedding.weight"].dtype in usable else (
            usable[0] if len(usable) == 1 else torch.bfloat16)
    prepared = prepare_weights(sd, target, "fp8_e4m3fn_fast" if fast else "default")
    kept = sum(t.dtype in FP8_DTYPES for t in prepared.sd.values())
    log.info("Block Cascade: the model's weights are used as %s for the run%s", target,
             f" ({kept} block layers kept fp8{', fp8 products' if prepared.fast else ''})" if kept else "")
    return prepared.sd, target, prepared.fast
