"""Reading tensor files without ever running a pickle's code.

Guarantees:
- ``.safetensors`` files are read memory-mapped; nothing in them can execute.
- ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files go through ``torch.load(weights_only=True)`` only:
  a pickle that asks for anything beyond tensors and plain containers is refused before any
  of its code runs.
- Every failure is a :class:`CheckpointError` whose message names the file and says what is wrong
  (missing, truncated or corrupt, refused pickle, not a tensor file).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pt", ".pth", ".ckpt", ".bin")


class CheckpointError(ValueError):
    """A file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{os.path.basename(self.path)}: {reason}")


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, memory-mapped (no copy until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"truncated or corrupt safetensors file ({exc})") from None


def read_pickle(path: str) -> Any:
    """A .pt/.pth object through ``torch.load(weights_only=True)``; code-running pickles are refused."""
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:  # a legacy torch file is a pickle, which starts with the protocol byte 0x80
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise CheckpointError(path, "truncated or corrupt file (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "unsupported operand" in text.lower():  # a byte that is no pickle opcode: damage, not code
            raise CheckpointError(path, "truncated or corrupt file (not a readable pickle)") from None
        if "weights only load failed" in text.lower():
            # torch names the blocked global on one of its lines ("... GLOBAL posix.system ...").
            what = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                path,
                "refused: its pickle would import or call code on load, and only plain tensors "
                f"are accepted (nothing of it was run). {what}".rstrip()) from None
        raise CheckpointError(path, f"truncated or corrupt file ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"truncated or corrupt file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_tensor_file(path: str) -> Any:
    """Read a .safetensors (dict of tensors) or a .pt/.pth (tensors in plain containers)."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "the file is empty")
    lower = str(path).lower()
    if lower.endswith(SAFETENSORS_EXT):
        return read_safetensors(path)
    if lower.endswith(PICKLE_EXT):
        return read_pickle(path)
    raise CheckpointError(
        path, f"unknown file type; expected one of {', '.join(SAFETENSORS_EXT + PICKLE_EXT)}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write tensors (made contiguous, on the CPU) to a .safetensors file, creating its folder."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)
