"""The command line of ``python -m cascade_core.bench``: its options, their checks (every refusal one
line, exit status 2, before any model work, as the CLI's), and the engine configuration they describe."""
from __future__ import annotations

import sys

import torch

from ..common.constants import LATENT_CHANNELS
from ..common.messages import first_line
from ..distributed.devices import parse_devices
from ..model.dit import WanConfig
from ..sampling.config import ATTENTION_MODES, FLASHBLOCK_MODES, SWITCH_MODES, CascadeConfig
from ..sampling.families import FAMILIES, family_config
from ..sampling.plan import latent_size
from .checks import UsageError, check_backend
from .inputs import resolve_device
from .parser import OneLineParser

BENCH_DECODERS = ("wan", "lightvae", "taew", "lighttae")  # the decoders --vae times (--decoder)
SIZES = {
    "1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2),
    # Wan2.2-TI2V-5B (LongLive 2.0's base: Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py), 48 latent channels
    "5B": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "tiny-5b": WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=48, out_dim=48),
}
TINY_SIZES = ("tiny", "tiny-5b")  # the shapes the CPU runs
SIZE_FAMILY = {"5B": "longlive-2", "tiny-5b": "longlive-2"}  # a size's family when --family is not given


def parse_arguments(argv: list[str] | None, description: str):
    """(options, device, size, dtype, step list, levels); exits with status 2 and one line on bad input."""
    ap = OneLineParser(prog="python -m cascade_core.bench", description=description)
    ap.add_argument("--size", choices=SIZES, help="model shape (default: 1.3B on CUDA, tiny on CPU)")
    ap.add_argument("--parallel", default="all", help="levels to run, e.g. 1,3,5 (default: 1..steps+1)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--family", choices=FAMILIES, help="sample with a checkpoint family's settings (default: none, "
                                                       "the options below; longlive-2 for --size 5B); explicit "
                                                       "--steps, --attention, --window and --sink override it")
    ap.add_argument("--steps", help="timesteps (default: the family's, else 1000,750,500,250)")
    ap.add_argument("--attention", choices=ATTENTION_MODES, help="in-flight attention (default: the family's, "
                                                                  "else causal)")
    ap.add_argument("--window", type=int)
    ap.add_argument("--sink", type=int, help="default: the family's, else 0")
    ap.add_argument("--backend", default="auto", help="attention backends to compare, e.g. auto,cudnn,flash")
    ap.add_argument("--flashblock", default="off", help=f"modes to compare, of {FLASHBLOCK_MODES}")
    ap.add_argument("--fold-clean", action="store_true", help="fold clean passes into the next block's tick (P1)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per level (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--devices", help="several devices through the worker pool, e.g. cuda:0,cuda:1 (the "
                                      "exact reference still runs on --device); peak memory is then --device's")
    ap.add_argument("--compile", action="store_true", help="torch.compile the layers' non-attention regions")
    ap.add_argument("--fp8", action="store_true", help="fp8 matrix products in the layers")
    ap.add_argument("--kv-dtype", default="default", help="KV cache storages to compare, e.g. default,fp8")
    ap.add_argument("--vae", action="store_true",
                    help="also time the streaming VAE alone and end to end (frames out, decode overlapped)")
    ap.add_argument("--decoder", default="wan",
                    help="with --vae: decoders to time, of wan (the Wan2.1 VAE's), lightvae (LightVAE: the Wan "
                         "decoder pruned to base width 24), taew (the taew2_1 preview decoder) and lighttae "
                         "(LightTAE), e.g. wan,lightvae,taew,lighttae; with a Wan2.2 --size: wan, taew and lighttae "
                         "are the Wan2.2 VAE, taew2_2 and lighttaew2_2")
    ap.add_argument("--switch-every", type=int, default=0, metavar="N",
                    help="also time every tick of runs whose prompt switches every N blocks")
    ap.add_argument("--switch-mode", default="none", help="switch modes of --switch-every and --steer-runs runs: "
                                                          "none, recache or none,recache (recache at P1 only)")
    ap.add_argument("--steer-runs", type=int, default=0, metavar="N",
                    help="also measure N steered switches per level and mode: seconds from the switch to the end of "
                         "the first block that takes it")
    ap.add_argument("--endless", type=int, default=0, metavar="N",
                    help="also run endless videos (blocks 0; needs --window) stopped after N blocks: per-block "
                         "memory and the steady rate (with --switch-every: a steered switch every N blocks)")
    ap.add_argument("--lse", action="store_true",
                    help="also time attention with log-sum-exp per backend and flex_attention (GPU)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one run of the first level")
    try:
        a = ap.parse_args(argv)
        device = checked_device(a)
        size, dtype, steps, levels = checked_arguments(a, device)
    except UsageError as exc:  # one line, exit status 2, before any work (as the CLI refuses)
        print(f"python -m cascade_core.bench: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return a, device, size, dtype, steps, levels


def steps_and_levels(steps: str, parallel: str, beyond_steps: int) -> tuple[tuple[int, ...], list[int]]:
    """``--steps`` and ``--parallel`` read: (the step list, the parallelism levels to time); ``--parallel all`` is
    1 .. steps + ``beyond_steps`` (a block's forwards: its steps, plus its clean pass where it has one). UsageError
    for anything but comma-separated integers."""
    try:
        step_list = tuple(int(t) for t in steps.split(","))
        if parallel == "all":
            return step_list, list(range(1, len(step_list) + beyond_steps + 1))
        return step_list, [int(p) for p in parallel.split(",")]
    except ValueError:
        raise UsageError(f"--steps {steps} --parallel {parallel}: comma-separated integers (or --parallel all)") from None


def checked_device(a) -> torch.device:
    """--device (one device that this machine has) and --devices (the pool's list), by the one parser
    of device names; the endless runs are single-device, as the engine's own check says."""
    try:
        device = resolve_device(a.device)
        if a.devices is not None:
            parse_devices(a.devices)
    except ValueError as exc:
        raise UsageError(first_line(exc)) from None
    if a.devices is not None and a.endless:
        raise UsageError("--endless runs on one device (an endless video runs on one device for now)")
    return device


def checked_arguments(a, device: torch.device):
    """(size, dtype, steps, levels) of the command line, each setting checked before any work: every
    configuration asked for (the engine's own checks), every attention backend, the decoders."""
    size = a.size or ("1.3B" if device.type == "cuda" else "tiny")
    if device.type == "cpu" and size not in TINY_SIZES:
        raise UsageError(f"the real shapes need a GPU; use --size {' or '.join(TINY_SIZES)} on the CPU")
    a.family = a.family or SIZE_FAMILY.get(size)
    if a.family is None:  # the options' own defaults
        a.steps = a.steps or "1000,750,500,250"
        a.attention = a.attention or "causal"
        a.sink = 0 if a.sink is None else a.sink
    elif a.steps is None:
        a.steps = ",".join(str(t) for t in family_config(a.family).steps)
    if a.vae and SIZES[size].in_dim != LATENT_CHANNELS and "lightvae" in a.decoder.split(","):
        raise UsageError(f"--decoder lightvae is Wan2.1's LightVAE; --size {size} makes Wan2.2 latents (wan, taew "
                         "and lighttae time the Wan2.2 VAE, taew2_2 and lighttaew2_2)")
    if not set(a.decoder.split(",")) <= set(BENCH_DECODERS):
        raise UsageError(f"--decoder {a.decoder}: choose from {', '.join(BENCH_DECODERS)} (comma-separated)")
    if a.decoder != "wan" and not a.vae:
        raise UsageError("--decoder is for the decoder runs of --vae; add --vae")
    if a.endless and a.endless < 10:
        raise UsageError(f"--endless {a.endless}: at least 10 blocks (memory is reported from block 10 on)")
    if a.blocks < 1:
        raise UsageError(f"--blocks must be at least 1 (for endless videos: --endless N), got {a.blocks}")
    if a.runs < 1:
        raise UsageError(f"--runs must be at least 1, got {a.runs}")
    for flag, value in (("--switch-every", a.switch_every), ("--steer-runs", a.steer_runs)):
        if value < 0:
            raise UsageError(f"{flag} must be 0 (off) or more, got {value}")
    try:
        latent_size(a.width, a.height, SIZES[size].patch_size, SIZES[size].latent_space)
    except ValueError as exc:
        raise UsageError(first_line(exc)) from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for backend in a.backend.split(","):
        check_backend(backend, device, dtype, flag="--backend")
    steps, levels = steps_and_levels(a.steps, a.parallel, beyond_steps=1)
    for p in levels:
        for flashblock in a.flashblock.split(","):
            try:
                run_config(a, steps, p, flashblock, fold_clean=a.fold_clean).validate()
                if a.endless:
                    run_config(a, steps, p, flashblock).check_run(0, endless=True)
            except ValueError as exc:
                raise UsageError(first_line(exc)) from None
    if a.switch_every or a.steer_runs:
        for mode in a.switch_mode.split(","):
            if mode not in SWITCH_MODES:
                raise UsageError(f"--switch-mode {a.switch_mode}: choose from {', '.join(SWITCH_MODES)}")
    return size, dtype, steps, levels


def run_config(a, steps: tuple[int, ...], parallel: int = 1, flashblock: str = "off", **extra) -> CascadeConfig:
    """The command line's sampling settings (step list, in-flight attention, window, sink) at one level; with
    ``--family`` its settings under the ones given (:func:`sampling.families.family_config`)."""
    if getattr(a, "family", None):
        return family_config(a.family, steps=steps, parallel=parallel, attention=a.attention, window=a.window,
                             sink=a.sink, flashblock=flashblock, **extra)
    return CascadeConfig(steps=steps, parallel=parallel, attention=a.attention, window=a.window, sink=a.sink,
                         flashblock=flashblock, **extra)
