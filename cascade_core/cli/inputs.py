"""What the command line's options load: the device, tensors of files, the DiT and its weights, prompt
embeddings; and the refusal of text options that do not fit together."""
from __future__ import annotations

import torch

from .. import distributed
from ..model.dit import WanConfig, WanModel
from ..weights.checkpoint import load_dit
from ..weights.safe_io import CheckpointError, read_tensor_file
from .checks import UsageError

BUILTIN = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2)  # untrained demo model


def single_tensor(path: str, what: str) -> torch.Tensor:
    tensors = read_tensor_file(path)
    if not isinstance(tensors, dict) or len(tensors) != 1:
        raise CheckpointError(path, f"expected exactly one tensor ({what})")
    return next(iter(tensors.values()))


def _auto_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str) -> torch.device:
    devices = distributed.parse_devices(name, auto=_auto_device)  # the one parser of device names
    if len(devices) > 1:
        raise UsageError(f"--device takes one device; for several use --devices {name}")
    return devices[0]


def decode_device_choice(args) -> torch.device | None:
    """The device --decode-device names (None for auto: the session's rule); UsageError naming the flag."""
    if args.decode_device == "auto":
        return None
    if not args.vae:
        raise UsageError("--decode-device places the decoders of --vae and --preview-vae; add --vae")
    if "," in args.decode_device:
        raise UsageError(f"--decode-device takes one device, got {args.decode_device}")
    try:
        return resolve_device(args.decode_device)
    except ValueError as exc:
        raise UsageError(f"--decode-device: {exc}") from None


def several_devices(args):
    """None (one device, --device), "torchrun", or the two or more devices of --devices."""
    if args.devices is None:
        return None
    if args.device != "auto":
        raise UsageError("--device and --devices exclude each other")
    if args.devices.strip().lower() == "torchrun":
        return "torchrun"
    devices = distributed.parse_devices(args.devices)
    if len(devices) == 1:
        args.device = str(devices[0])
        return None
    return devices


def load_weights(args, dtype: torch.dtype):
    """(state dict on the CPU, CheckpointInfo) of --checkpoint with --lora merged; None without one."""
    if args.checkpoint is None:
        return None
    return load_dit(args.checkpoint, dtype=dtype, ema=args.ema, lora=args.lora, lora_scale=args.lora_scale,
                    weight_dtype=args.weight_dtype)


def build_model(weights, device: torch.device, dtype: torch.dtype, weight_dtype: str = "default"
                ) -> tuple[WanModel, str]:
    """The DiT on ``device`` from :func:`load_weights`' result (its block weights stored as read), or the
    built-in untrained model with ``weight_dtype``; (model, one line saying what it is)."""
    if weights is None:
        model = WanModel.random(BUILTIN, seed=0).to(dtype).with_weight_dtype(weight_dtype).to(device)
        return model, "built-in untrained model (random weights)"
    sd, info = weights
    return (WanModel.from_state_dict(sd, device=device, num_heads=info.num_heads, fast_fp8=info.fast_fp8),
            info.describe())


def check_text_arguments(args, switch_texts: int = 0) -> None:
    """Refuse text options that do not fit together; ``switch_texts``: --switch values that are texts."""
    if args.lora and not args.checkpoint:
        raise UsageError("--lora needs --checkpoint (the base weights it is merged into)")
    if (args.prompt is not None or switch_texts) and not args.text_encoder:
        what = "--prompt" if args.prompt is not None else "--switch BLOCK:TEXT"
        raise UsageError(f"{what} needs --text-encoder FILE (umt5-xxl weights) and, unless that file carries "
                         f"its tokenizer, --tokenizer DIR")
    if args.prompt is None and not switch_texts and (args.text_encoder or args.tokenizer):
        raise UsageError("--text-encoder and --tokenizer are used only with --prompt or a --switch text")


def prompt_embeddings(args, texts: list[str], device: torch.device) -> list[torch.Tensor]:
    """Prompt texts through the umt5 encoder ([L, 4096] each), which is freed before the DiT loads."""
    from ..weights.text import TextEncoder

    encoder = TextEncoder.load(args.text_encoder, args.tokenizer, device=device,
                               dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    embeds = encoder(texts)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(embeds)
