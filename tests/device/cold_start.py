"""Time to the first finished block of the first run in a fresh process, compiled (device script, not a test).

    TORCHINDUCTOR_CACHE_DIR=DIR python tests/device/cold_start.py [--parallel 5]

Run it twice with a new, empty DIR: the first process compiles from nothing, the second reads what the
first left on disk. Prints one JSON line: seconds from the process start (imports, random 1.3B weights on
the GPU, compilation, the first block) and from the run's start; then torch's compile times by phase.
"""
import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from cascade_core.cli.bench_args import SIZES  # noqa: E402
from cascade_core.model.dit import WanModel  # noqa: E402
from cascade_core.sampling.config import CascadeConfig, PromptSchedule  # noqa: E402
from cascade_core.sampling.loop import generate  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--parallel", type=int, default=5)
a = ap.parse_args()
model = WanModel.random(SIZES["1.3B"], 0, device="cuda", dtype=torch.bfloat16).compile_layers(True)
emb = torch.randn(512, model.cfg.text_dim)
first = []
run_start = time.perf_counter()
res = generate(model, PromptSchedule.single(emb), CascadeConfig(parallel=a.parallel), blocks=7, width=832, height=480,
               seed=0, on_block=lambda ev: first.append(time.perf_counter()) if not first else None)
print(json.dumps({"parallel": a.parallel, "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                  "first_block_from_process_start_s": round(first[0] - START, 2),
                  "first_block_from_run_start_s": round(first[0] - run_start, 2),
                  "run_s": round(res.seconds, 2)}), flush=True)
print(torch._dynamo.utils.compile_times(repr="str"), flush=True)  # where the compile time went, by phase
