"""Two-expert (Wan2.2 A14B) diffusers folders: a pipeline folder whose ``transformer/`` holds the high-noise expert
and ``transformer_2/`` the low-noise one, with the boundary in ``model_index.json`` (diffusers' Wan2.2 layout, as
FastVideo's causal Wan2.2-A14B preview ships it: ``docs/references/causal_wan22_a14b.md``).

Guarantees: only folder names and ``model_index.json`` are read here (the weights: :func:`weights.checkpoint.
load_expert_pair`); one half given alone, a pipeline folder with a half missing, a ``model_index.json`` that is
not a JSON object or a boundary_ratio that gives no timestep in 1..999 is refused in one line naming the folder or
the file (:class:`weights.safe_io.CheckpointError`). :func:`pair_folder_of` is the one rule that finds the pair
folder around a file inside one of its experts' folders (the CLI and the loader node both use it).
"""
from __future__ import annotations

import json
import math
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
    """The folder's model_index.json ({} when absent). Raises CheckpointError naming the folder and the file when
    it exists but cannot be read, is not JSON or is not a JSON object."""
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except OSError as exc:
        raise CheckpointError(folder, f"its {MODEL_INDEX} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(folder, f"its {MODEL_INDEX} is not valid JSON ({str(exc).splitlines()[0]}); fix or "
                                      f"remove it") from None
    if not isinstance(found, dict):
        raise CheckpointError(folder, f"its {MODEL_INDEX} holds a JSON {type(found).__name__}, not an object; fix or "
                                      f"remove it")
    return found


def _names_two(folder: str) -> bool:
    """Whether a pipeline folder names a second transformer (a folder of it, or model_index.json; a broken
    model_index.json names nothing here: :func:`expert_folders` refuses it where the folder is a pair)."""
    if os.path.isdir(os.path.join(folder, EXPERT_FOLDERS[1])):
        return True
    try:
        index = _index(folder)
    except CheckpointError:
        return False
    return bool(index.get(EXPERT_FOLDERS[1])) or index.get("boundary_ratio") is not None


def expert_half(path: str) -> str | None:
    """Why ``path`` is no single DiT because it belongs to a two-expert model (None: it does not): the pipeline
    folder itself, one expert's folder inside one, or a file in such an expert's folder (:func:`pair_folder_of`)."""
    path = os.path.normpath(os.fspath(path))
    if os.path.isdir(path) and _names_two(path):
        return ("holds two experts (transformer/: high-noise, transformer_2/: low-noise): a Wan2.2 A14B model, which "
                "runs as a pair of experts (family causal-wan2.2-a14b), not as one DiT")
    parent, name = os.path.split(path)
    if name in EXPERT_FOLDERS and os.path.isdir(path) and _names_two(parent):
        which = "high-noise" if name == EXPERT_FOLDERS[0] else "low-noise"
        return f"is one expert ({which}) of a two-expert Wan2.2 A14B model: give the folder above it, {parent}"
    if not os.path.isdir(path) and (root := pair_folder_of(path)) is not None:
        which = "high-noise" if os.path.basename(parent) == EXPERT_FOLDERS[0] else "low-noise"
        return (f"is a file of one expert ({which}) of a two-expert Wan2.2 A14B model: load the pair from its "
                f"folder, {root}")
    return None


def boundary_timestep(ratio: float) -> int:
    """The boundary timestep of a boundary_ratio: round(ratio x 1000), the whole timestep on the 0..1000 scale
    (a pair runs at one in 1..999: :class:`model.experts.ExpertPair`)."""
    return round(ratio * 1000)


def expert_folders(path: str) -> ExpertFolders | None:
    """The experts of a two-expert pipeline folder (None: ``path`` is not one). Raises CheckpointError naming the
    folder when a half is missing, naming model_index.json when it is not a JSON object or its boundary_ratio is not
    a number whose timestep (:func:`boundary_timestep`) lies in 1..999."""
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
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 1 <= boundary_timestep(ratio) <= 999:
        raise CheckpointError(path, f"its {MODEL_INDEX} gives boundary_ratio {ratio!r}; a number in (0, 1) whose "
                                    f"timestep (ratio x 1000, rounded) lies in 1..999 is needed, e.g. "
                                    f"{DEFAULT_BOUNDARY_RATIO}")
    return ExpertFolders(high, low, boundary_timestep(ratio), given)


def pair_folder_of(path: str) -> str | None:
    """The two-expert folder (absolute) that ``path`` belongs to as a part of one expert: a file in its
    transformer/ or transformer_2/ (e.g. ``transformer/diffusion_pytorch_model.safetensors`` or one of its shards)
    or that expert folder itself; None otherwise (the pair folder itself included: :func:`expert_folders` reads
    it). Raises CheckpointError as :func:`expert_folders` for a broken pair folder."""
    path = os.path.abspath(os.fspath(path))
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    root = os.path.dirname(parent)
    if os.path.basename(parent) in EXPERT_FOLDERS and expert_folders(root) is not None:
        return root
    return None
