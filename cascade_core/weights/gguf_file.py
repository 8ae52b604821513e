"""Reading ComfyUI-GGUF's ``.gguf`` diffusion model files through the ``gguf`` package's reader.

Tensors come back named as stored (Wan's own names), on the CPU: float tensors (F32, F16, BF16) as torch
tensors of their shape; quantised ones as their raw blocks uint8 [..., bytes a row] with a
``<name minus .weight>.gguf_type`` entry (see :mod:`model.gguf`). GGUF lists dimensions fastest first and
holds at most four; a tensor ComfyUI-GGUF had to flatten (the 5-D patch embedding) is reshaped from its
``comfy.gguf.orig_shape.<name>`` field. Nothing is executed: GGUF holds data only.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.gguf import TYPE_SUFFIX

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_gguf(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.gguf`` file (see the module docstring). Raises ValueError (one line, without the
    path: :func:`safe_io.read_tensor_file` names it) for a file the reader cannot parse or a tensor type
    diffusers cannot dequantise."""
    try:
        import gguf
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

        reader = gguf.GGUFReader(path)
    except ImportError as exc:
        raise ValueError(f"reading .gguf files needs the gguf and diffusers packages ({exc})") from None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    shapes = {}
    for name, field in reader.fields.items():
        if name.startswith("comfy.gguf.orig_shape."):
            shapes[name.removeprefix("comfy.gguf.orig_shape.")] = tuple(int(field.parts[i][0]) for i in field.data)
    out = {}
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
        data = np.array(t.data)  # a copy: the file's memory map is not kept
        if kind.name in FLOAT_TYPES:
            tensor = torch.from_numpy(data.view(np.uint16 if kind.name != "F32" else np.float32).copy())
            if kind.name != "F32":
                tensor = tensor.view(FLOAT_TYPES[kind.name])
            out[t.name] = tensor.reshape(shapes.get(t.name, shape))
        elif kind in SUPPORTED_GGUF_QUANT_TYPES:
            out[t.name] = torch.from_numpy(data.reshape(shape[0], -1).copy())  # uint8 [out, bytes a row]
            out[t.name.removesuffix(".weight") + TYPE_SUFFIX] = torch.tensor(int(kind))
        else:
            raise ValueError(f"{t.name} is stored as {kind.name}, a GGUF type this loader does not dequantise; use "
                             f"a Q8_0, Q6_K, Q5_K or Q4_K file")
    return out
