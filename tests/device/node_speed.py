"""The sampler node's speed against the engine's own loop, in one process on one GPU (device script, not a test).

    python tests/device/node_speed.py [--parallel 1,5] [--blocks 7] [--compile]

The node runs through the test stand-in of ComfyUI (tests/comfy_stub: a ComfyUI install does not travel to
the device): its execute as ComfyUI calls it (checks, memory placement, reporter with the latent-RGB preview
frames JPEG-encoded and sent, outputs) on a FileModel of the 1.3B shapes with random weights; the engine's
``generate`` with the same model, settings and seed. Each is timed after one warm-up (which compiles). One
JSON line per level: seconds of each, their ratio (the node's FPS over the CLI path's), and where the node's
extra time went: before its run (checks, placement, decoder, widget start), the run, after it (the last
block's frames, the outputs).
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "comfy_stub")]

from custom_node_loader import load_pack  # noqa: E402

from cascade_core.cli.bench_args import SIZES  # noqa: E402
from cascade_core.model.dit import WanModel  # noqa: E402
from cascade_core.sampling.config import CascadeConfig, PromptSchedule  # noqa: E402
from cascade_core.sampling.loop import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", default="1,5")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    pack, nodes = load_pack(ROOT)
    import server  # the stand-in's: events serialised as a server's websocket would, then dropped

    server.PromptServer.instance = type("Server", (), {"client_id": "bench",
                                                       "send_sync": lambda self, e, d, sid: json.dumps(d)})()
    values = sys.modules[f"{pack.__name__}.nodes.values"]
    session_class = sys.modules[f"{pack.__name__}.nodes.sampler"].RunSession
    marks = {}
    real_run = session_class.run

    def timed_run(self, *args, **kwargs):  # the node's run, between its head and its tail
        torch.cuda.synchronize()
        marks["run_start"] = time.perf_counter()
        try:
            return real_run(self, *args, **kwargs)
        finally:
            torch.cuda.synchronize()
            marks["run_end"] = time.perf_counter()

    session_class.run = timed_run
    model = WanModel.random(SIZES["1.3B"], seed=0, device="cuda", dtype=torch.bfloat16)
    handle = values.FileModel(model, "wan 1.3B random")
    emb = torch.randn(1, 512, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    for p in map(int, a.parallel.split(",")):
        cfg = CascadeConfig(parallel=p)
        settings = values.Settings(cascade=cfg, devices="cuda", compile="on" if a.compile else "off")
        sampler = nodes["BlockCascadeSampler"].PREPARE_CLASS_CLONE({"UNIQUE_ID": "1"})
        args = dict(model=handle, config=settings, width=832, height=480, blocks=a.blocks, seed=0,
                    positive=[[emb, {}]])

        def node():
            sampler.execute(**args)

        def engine():
            model.compile_layers(a.compile)
            generate(model, PromptSchedule.single(emb[0]), cfg, blocks=a.blocks, width=832, height=480, seed=0)

        row = {"parallel": p, "blocks": a.blocks, "compile": a.compile}
        for name, fn in (("engine", engine), ("node", node), ("engine", engine), ("node", node)):
            fn() if name + "_s" not in row else None  # warm-up of each, once
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            end = time.perf_counter()
            if name == "node" and end - start < row.get("node_s", 1e9):
                row.update(node_head_s=round(marks["run_start"] - start, 3),
                           node_run_s=round(marks["run_end"] - marks["run_start"], 3),
                           node_tail_s=round(end - marks["run_end"], 3))
            row[name + "_s"] = min(row.get(name + "_s", 1e9), round(end - start, 3))
        row["node_over_cli_fps"] = round(row["engine_s"] / row["node_s"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
