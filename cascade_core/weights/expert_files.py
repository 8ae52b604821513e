"""Two-expert (Wan2.2 A14B) diffusers folders: a pipeline folder whose ``transformer/`` holds the high-noise expert
and ``transformer_2/`` the low-noise one, with the boundary in ``model_index.json`` (diffusers' Wan2.2 layout, as
FastVideo's causal Wan2.2-A14B preview ships it: ``docs/references/causal_wan22_a14b.md``).

Guarantees: only folder names and ``model_index.json`` are read here (the weights: :func:`weights.checkpoint.
load_expert_pair`); one half given alone, or a pipeline folder with a half missing, is refused in one line naming
the folder (:class:`weights.safe_io.CheckpointError`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .safe_io import CheckpointError

EXPERT_FOLDERS = ("transformer", "transformer_2")  # high-noise, low-noise (diffusers' WanPipeline names)
MODEL_INDEX = "model_index.json"
# used where model_index.json gives no boundary_ratio: FastVideo's SelfForcingWan2_2_T2V480PConfig
# (fastvideo/configs/pipelines/wan.py:319)
DEFAULT_BOUNDARY_RATIO = 0.875


@dataclass(frozen=True)
class ExpertFolders:
    """The two experts' folders of a pipeline folder and its boundary (a whole timestep, ratio x 1000);
    ``boundary_given``: model_index.json said it (else :data:`DEFAULT_BOUNDARY_RATIO` was assumed)."""

    high: str
    low: str
    boundary: int
    boundary_given: bool


def _index(folder: str) -> dict:
    """The folder's model_index.json ({} when absent or unreadable)."""
    try:
        with open(os.path.join(folder, MODEL_INDEX), encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _names_two(folder: str) -> bool:
    """Whether a pipeline folder names a second transformer (a folder of it, or model_index.json)."""
    index = _index(folder)
    return os.path.isdir(os.path.join(folder, EXPERT_FOLDERS[1])) or bool(index.get(EXPERT_FOLDERS[1])) \
        or index.get("boundary_ratio") is not None


def expert_half(path: str) -> str | None:
    """Why ``path`` is no single DiT because it belongs to a two-expert model (None: it does not): the pipeline
    folder itself, or one expert's folder inside one."""
    path = os.path.normpath(os.fspath(path))
    if os.path.isdir(path) and _names_two(path):
        return ("holds two experts (transformer/: high-noise, transformer_2/: low-noise): a Wan2.2 A14B model, read "
                "as an expert pair (weights.checkpoint.load_expert_pair, family causal-wan2.2-a14b), not as one DiT")
    parent, name = os.path.split(path)
    if name in EXPERT_FOLDERS and os.path.isdir(path) and _names_two(parent):
        which = "high-noise" if name == EXPERT_FOLDERS[0] else "low-noise"
        return f"is one expert ({which}) of a two-expert Wan2.2 A14B model: give the folder above it, {parent}"
    return None


def expert_folders(path: str) -> ExpertFolders | None:
    """The experts of a two-expert pipeline folder (None: ``path`` is not one). Raises CheckpointError naming the
    folder when a half is missing or model_index.json's boundary_ratio is not a number in (0, 1)."""
    path = os.fspath(path)
    if not (os.path.isdir(path) and _names_two(path)):
        return None
    high, low = (os.path.join(path, name) for name in EXPERT_FOLDERS)
    missing = [f"{name}/" for name, p in zip(EXPERT_FOLDERS, (high, low)) if not os.path.isdir(p)]
    if missing:
        raise CheckpointError(path, f"a two-expert (Wan2.2 A14B) folder without {' and '.join(missing)}: both "
                                    f"transformer/ (high-noise) and transformer_2/ (low-noise) are needed")
    ratio = _index(path).get("boundary_ratio")
    given = ratio is not None
    ratio = DEFAULT_BOUNDARY_RATIO if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise CheckpointError(path, f"{MODEL_INDEX} gives boundary_ratio {ratio!r}; a number in (0, 1) is needed")
    return ExpertFolders(high, low, round(ratio * 1000), given)
