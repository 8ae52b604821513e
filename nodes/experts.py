"""A causal Wan2.2-A14B pair in the nodes: Load Causal Video Model given a file of a two-expert diffusers folder
(transformer/ high-noise, transformer_2/ low-noise, model_index.json's boundary) or two files (``model_name`` the
high-noise expert, ``low_noise_model`` the low-noise one), as a :class:`PairModel` the sampler runs on one device:
both experts resident, or each streaming its last blocks from host memory where the run's one memory estimate says
the GPU is short (all of them: the idle expert's blocks stay off the GPU)."""
from __future__ import annotations

import logging
import os

import torch

from cascade_core.model.dit import WanModel
from cascade_core.model.experts import DEFAULT_BOUNDARY, ExpertPair
from cascade_core.weights.checkpoint import load_dit, load_expert_pair
from cascade_core.weights.expert_files import pair_folder_of

from .values import FileModel, state_dict_bytes

log = logging.getLogger("block_cascade")

PAIR_FAMILY = ("causal-wan2.2-a14b", "a two-expert (Wan2.2 A14B) model")


class PairModel(FileModel):
    """An :class:`cascade_core.model.experts.ExpertPair` as a BLOCK_CASCADE_MODEL: ComfyUI's model management
    loads it whole like a file model (both experts), or the sampler streams each expert's last blocks
    (:meth:`acquire_swapped`); ``experts`` 2 makes the sampler's one memory estimate count two KV pools and both
    experts' weights. Several devices and the settings a pair does not run are refused by :meth:`check_run`."""

    experts = 2

    def __init__(self, pair: ExpertPair, label: str, info: str = ""):
        super().__init__(pair, label, info)
        self.family = PAIR_FAMILY

    def block_bytes(self) -> int:
        """Bytes of the largest transformer block of either expert (what each expert's swap slots hold)."""
        return max(state_dict_bytes(b.state_dict()) for e in (self.model.high, self.model.low) for b in e.blocks)

    def check_run(self, cfg, several_devices: bool) -> None:
        """ValueError (one line) for a run a pair does not do (:func:`cascade_core.model.experts.check_pair_run`)."""
        self.model.check_run(cfg, several_devices)

    def acquire_for_pool(self):
        raise ValueError("a two-expert model (Wan2.2 A14B) runs on one device: set the config's devices to one GPU")

    def acquire_swapped(self, device: torch.device, swapped: int) -> ExpertPair:
        """Both experts on ``device`` with their last ``swapped`` blocks streamed from host memory (taken off
        ComfyUI's device first; ``model.swap.detach()`` after the run)."""
        return FileModel.acquire_for_pool(self).swap_blocks(device, swapped)

    def describe(self) -> str:
        c = self.cfg
        return (f"{self.label}: two Wan DiT experts (high- and low-noise, boundary timestep {self.model.boundary}), "
                f"width {c.dim}, {c.num_layers} layers, {c.num_heads} heads each")


def load_pair(path: str, low_path: str | None, dtype: torch.dtype, weight_dtype: str = "default",
              boundary: int = 0, lora: str | None = None, name: str = "") -> PairModel | None:
    """The pair the loader's files name, or None where they name one DiT: ``low_path`` given (``path`` the
    high-noise expert's file, ``low_path`` the low-noise one's; boundary ``boundary``, else 875, FastVideo's), or
    ``path`` a file of a two-expert folder (both halves read from it, its model_index.json's boundary unless
    ``boundary`` > 0). Raises ValueError (one line) for a LoRA, experts of different shapes or a boundary out of
    1..999; CheckpointError naming a file that is not a Wan DiT."""
    folder = None if low_path is not None else pair_folder_of(path)
    if low_path is None and folder is None:
        return None
    if lora is not None:
        raise ValueError("lora: merging a LoRA into a two-expert (Wan2.2 A14B) model is not supported (each expert "
                         "would need its own); set lora to none")
    if folder is not None:
        high, low, found, note = load_expert_pair(folder, dtype=dtype, weight_dtype=weight_dtype)
        label = os.path.basename(folder)
    else:
        high, low = (load_dit(p, dtype=dtype, weight_dtype=weight_dtype, as_expert=True) for p in (path, low_path))
        found = DEFAULT_BOUNDARY
        note = f"boundary timestep {found} (assumed: FastVideo's causal Wan2.2-A14B config)"
        label = f"{name} + {os.path.basename(low_path)}"
    if boundary:
        found, note = boundary, f"boundary timestep {boundary} (the loader's boundary input)"
    experts = [WanModel.from_state_dict(sd, num_heads=info.num_heads, fast_fp8=info.fast_fp8) for sd, info in (high, low)]
    pair = ExpertPair(*experts, boundary=found)
    info = f"two experts (Wan2.2 A14B): high-noise {high[1].describe()}; low-noise {low[1].describe()}; {note}"
    log.info("Block Cascade: %s", info)
    return PairModel(pair, label, info)
