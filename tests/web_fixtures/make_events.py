"""Write tests/web_fixtures/events.json: a recorded-style block_cascade event stream with small real JPEGs.

Each message is what ComfyUI's websocket carries ({"type", "data"}) plus "t", the ms since the run
started. Needs Pillow (any ComfyUI environment has it):  python tests/web_fixtures/make_events.py
The stream also holds a foreign node's run and a superseded run's frame (drawn black/white), which a
correct player ignores; "colors" is the solid colour of each real frame, for pixel checks.
"""
import base64
import colorsys
import io
import json
import os

from PIL import Image

NODE, RUN, W, H, FPS, BLOCK, BLOCKS, STAGES = "7", "run-a", 64, 40, 16, 4, 3, 5


def jpeg(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (W, H), rgb).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def main():
    n = BLOCK * BLOCKS
    colors = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(k / n, 0.9, 0.9)) for k in range(n)]
    msgs = []

    def send(t, kind, **data):
        msgs.append({"t": t, "type": "block_cascade." + kind, "data": data})

    start = dict(blocks=BLOCKS, frames_total=n, fps=FPS, width=W, height=H, stages=STAGES, parallel=2)
    send(0, "start", node=NODE, run="stale", **start)           # an earlier run on the same node...
    send(5, "start", node=NODE, run=RUN, **start)              # ...superseded by this one
    send(10, "start", node="99", run="other", **start)         # a node the page does not have
    send(20, "frames", node="99", run="other", block=0, first_frame=0, frames=[jpeg((0, 0, 0))] * BLOCK, elapsed=0.02)
    tick = 0
    for t, pairs, done in [(50, [[0, 0]], 0), (100, [[0, 2], [1, 0]], 0), (200, [[0, 4], [1, 2]], 0),
                           (300, [[1, 4], [2, 2]], 1), (600, [[2, 4]], 2)]:
        tick += 1
        send(t, "state", node=NODE, run=RUN, tick=tick, ticks=7, pairs=pairs, done_blocks=done, elapsed=t / 1000)
    # block 0 and 1 arrive faster than real time (buffered), block 2 late (the player waits)
    for t, b in [(250, 0), (350, 1), (1000, 2)]:
        first = b * BLOCK
        send(t, "frames", node=NODE, run=RUN, block=b, first_frame=first,
             frames=[jpeg(c) for c in colors[first:first + BLOCK]], elapsed=t / 1000)
    send(400, "frames", node=NODE, run="stale", block=0, first_frame=0, frames=[jpeg((255, 255, 255))] * BLOCK, elapsed=0.4)
    send(1050, "done", node=NODE, run=RUN, seconds=1.05, frames=n)
    out = {"node": NODE, "fps": FPS, "width": W, "height": H, "colors": colors,
           "messages": sorted(msgs, key=lambda m: m["t"])}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}: {len(msgs)} messages, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
