"""``python -m cascade_core generate|decode``: the command's entry, its exit codes and its one-line errors."""
from __future__ import annotations

import json
import os
import sys

import torch

from .. import distributed
from ..weights.safe_io import CheckpointError
from . import run
from .checks import UsageError
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1 worker failure, 2 bad input, 130 Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        out = run.run_decode(args) if args.command == "decode" else run.run_generate(args)
        if out is not None:  # ranks other than 0 of a torchrun job print nothing
            print(json.dumps(out))
        return 0
    except (UsageError, ValueError, CheckpointError) as exc:
        return _fail(f"error: {exc}", 2)
    except distributed.WorkerError as exc:
        return _fail(f"error: {exc}", 1)
    except run.Stopped as exc:
        return _fail(f"interrupted: {exc}", 130)
    except KeyboardInterrupt as exc:  # a second Ctrl-C in a run says so; a first one came before it
        return _fail(f"interrupted: {exc}" if str(exc) else "interrupted before the run started", 130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fail(line: str, code: int) -> int:
    """One line on stderr (from rank 0 only under torchrun: the other ranks fail the same way, quietly)."""
    if os.environ.get("RANK", "0") == "0" or "WORLD_SIZE" not in os.environ:
        print(line, file=sys.stderr)
    return code
