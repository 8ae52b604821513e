"""What the command line's options load: the device, tensors of files, the DiT and its weights (or a Wan2.2 A14B
pair of experts: a diffusers folder with transformer/ and transformer_2/, :class:`PairWeights`), where they sit
(resident or blocks streamed from host memory, by the run's one memory estimate), prompt embeddings; and the
refusal of options that do not fit together."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from .. import distributed
from ..common.constants import GIB
from ..model.dit import WanConfig, WanModel
from ..model.experts import ExpertPair, check_pair_run
from ..sampling.blend import blend_text_sets
from ..sampling.memory import placement_words
from ..weights.checkpoint import load_dit, load_expert_pair
from ..weights.expert_files import EXPERT_FOLDERS, expert_folders, pair_folder_of
from ..weights.probe import shard_words
from ..weights.safe_io import CheckpointError, read_tensor_file
from . import checks as cli_checks
from .checks import BUILTIN, UsageError


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


@dataclasses.dataclass
class PairWeights:
    """A two-expert (Wan2.2 A14B) folder as read (:func:`weights.checkpoint.load_expert_pair`): the high- and
    the low-noise expert's (state dict on the CPU, CheckpointInfo), the boundary timestep and where it came from."""
    high: tuple
    low: tuple
    boundary: int
    note: str

    @property
    def config(self) -> WanConfig:
        return self.high[1].config

    def state_dicts(self) -> list[dict]:
        return [self.high[0], self.low[0]]


def resolve_checkpoint(args) -> list[str]:
    """--checkpoint as the run reads it, settled before anything else looks at it: a file inside a two-expert
    folder's transformer/ or transformer_2/, or that folder (:func:`weights.expert_files.pair_folder_of`, the
    loader node's rule) becomes the two-expert folder, read as the pair; the ``note:`` line saying so (none otherwise). UsageError (one line)
    for one shard of a sharded single model (:func:`weights.probe.shard_words`: its folder is to be given)."""
    path = args.checkpoint
    if not path or not os.path.exists(path):
        return []
    folder = pair_folder_of(path)
    if folder is not None:
        args.checkpoint = folder
        expert = os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        half = "high-noise" if os.path.basename(expert) == EXPERT_FOLDERS[0] else "low-noise"
        what = "the folder" if os.path.isdir(path) else "a file"
        return [f"note: --checkpoint {path} is {what} of the {half} expert of a two-expert (Wan2.2 A14B) model: "
                f"both experts are read from its folder, {folder}"]
    if why := shard_words(path):
        raise UsageError(f"--checkpoint {path} {why}")
    return []


def check_pair(args, cfg, session) -> None:
    """Where --checkpoint is a two-expert folder (Wan2.2 A14B: transformer/ and transformer_2/), refuse in one
    line (UsageError) what a pair does not run, before any weight is read: --lora, several devices and the
    sampling settings :func:`model.experts.check_pair_run` refuses. Nothing for another checkpoint; a pair
    folder with a half missing raises CheckpointError naming it."""
    folders = expert_folders(args.checkpoint) if args.checkpoint else None
    if folders is None:
        return
    if args.lora:
        raise UsageError(f"--lora: {args.checkpoint} holds two experts (Wan2.2 A14B); merging a LoRA into a pair "
                         f"is not supported (each expert would need its own)")
    try:
        check_pair_run(cfg, folders.boundary, session.ranks > 1)
    except ValueError as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None


def load_weights(args, dtype: torch.dtype, pairs: bool = False):
    """(state dict on the CPU, CheckpointInfo) of --checkpoint with --lora merged; None without one. ``pairs``: a
    two-expert folder is read as :class:`PairWeights` (else load_dit refuses it in one line)."""
    if args.checkpoint is None:
        return None
    if pairs and expert_folders(args.checkpoint) is not None:
        high, low, boundary, note = load_expert_pair(args.checkpoint, dtype=dtype, weight_dtype=args.weight_dtype)
        return PairWeights(high, low, boundary, note)
    return load_dit(args.checkpoint, dtype=dtype, ema=args.ema, lora=args.lora, lora_scale=args.lora_scale,
                    weight_dtype=args.weight_dtype)


def build_model(weights, device: torch.device, dtype: torch.dtype, weight_dtype: str = "default"
                ) -> tuple[WanModel, str]:
    """The DiT on ``device`` from :func:`load_weights`' result (its block weights stored as read; a
    :class:`PairWeights`: an :class:`model.experts.ExpertPair` at its boundary, the high expert's text K/V for
    both), or the built-in untrained model with ``weight_dtype``; (model, one line saying what it is)."""
    if weights is None:
        model = WanModel.random(BUILTIN, seed=0).to(dtype).with_weight_dtype(weight_dtype).to(device)
        return model, "built-in untrained model (random weights)"
    if isinstance(weights, PairWeights):
        high, low = (WanModel.from_state_dict(sd, device=device, num_heads=info.num_heads, fast_fp8=info.fast_fp8)
                     for sd, info in (weights.high, weights.low))
        return (ExpertPair(high, low, weights.boundary),
                f"two experts (Wan2.2 A14B), high-noise {weights.high[1].describe()}; low-noise "
                f"{weights.low[1].describe()}; {weights.note}")
    sd, info = weights
    return (WanModel.from_state_dict(sd, device=device, num_heads=info.num_heads, fast_fp8=info.fast_fp8),
            info.describe())


def model_config(weights) -> WanConfig:
    """The configuration of :func:`load_weights`' result (the built-in model's without weights)."""
    if weights is None:
        return BUILTIN
    if isinstance(weights, PairWeights):
        return weights.config
    return WanConfig.from_state_dict(weights[0], weights[1].num_heads)


def weight_bytes(model_cfg: WanConfig, weights, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of the DiT's weights (a pair's: both experts') and of its largest block's: those read (``weights``),
    else the built-in model's in ``dtype``."""
    if weights is None:
        with torch.device("meta"):
            weights = (WanModel(model_cfg).to(dtype).state_dict(), None)
    sds = weights.state_dicts() if isinstance(weights, PairWeights) else [weights[0]]
    size = lambda sd, keys: sum(sd[k].numel() * sd[k].element_size() for k in keys)  # noqa: E731
    layers = 1 + max(int(k.split(".")[1]) for k in sds[0] if k.startswith("blocks."))
    return (sum(size(sd, sd) for sd in sds),
            max(size(sd, [k for k in sd if k.startswith(f"blocks.{i}.")]) for sd in sds for i in range(layers)))


def place_weights(args, run, weights, vae_bytes: int) -> int:
    """Blocks of the DiT (of each expert of a pair) that ``run`` (:class:`cli.run.Checked`) streams from host
    memory on its one device, by the session's one memory estimate of the run (its KV pools, text sets, the
    decoders' ``vae_bytes``) and :func:`cli.checks.place_weights` (--swap-blocks; UsageError where even every block
    swapped cannot fit). A pair: two experts' weights and two KV pools counted; where it is short, as few of each
    expert's blocks as fit streamed (all of them: the idle expert's blocks stay off the GPU); said in a note."""
    session, device, dtype, plan = run.session, run.device, run.dtype, run.session.plan
    model_cfg = model_config(weights)
    experts = 2 if isinstance(weights, PairWeights) else 1
    texts = 1 + len(run.switches) + blend_text_sets([n for *_, n in run.switches], plan.schedule.max_in_flight)
    need, what = session.memory(model_cfg, dtype, texts, vae_bytes, experts=experts)
    total, block = weight_bytes(model_cfg, weights, dtype)
    stored = [w[1].weight_dtype for w in ((weights.high, weights.low) if experts == 2 else (weights,))] \
        if weights is not None else ["default"]
    stored_small = args.weight_dtype != "default" or any(s != "default" for s in stored)
    swapped = cli_checks.place_weights(args, device, plan, model_cfg, dtype, texts, vae_bytes, need, what, total,
                                       block, stored_small, experts)
    if experts == 2:
        stored_as = stored[0] if stored[0] != "default" else str(dtype).removeprefix("torch.")
        words = placement_words(swapped, model_cfg.num_layers, stored_as, experts)
        print(f"note: {words} on {device} (the estimate: {what}, both experts' weights "
              f"{total / GIB:.2f} GiB)", file=sys.stderr)
    return swapped


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
