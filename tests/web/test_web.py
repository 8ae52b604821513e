"""The web extension: node's unit tests of the player logic, and the real player in headless Chromium.

The browser test serves the repository on a loopback port, opens tests/web/fixtures/harness.html
(the same player_core.js / player_view.js the node widget uses, without ComfyUI), which replays the
recorded events in tests/web/fixtures/events.json and posts back every frame it drew with the canvas
pixel read right after drawing. Regenerate the fixture with tests/web/fixtures/make_events.py.
tests/web/fixtures/steer.html drives the player's steer box the same way, with a fake `post`;
tests/web/fixtures/endless.html streams an endless run of 10,008 frames and measures the JS heap.
"""
import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "web", "fixtures")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_node_unit_tests():
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    r = subprocess.run([node, "--test", "web/tests/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Handler(SimpleHTTPRequestHandler):
    """Static files from the repository, plus /__hold (answered once a result came) and /__result."""

    def __init__(self, *a, box, **kw):
        self.box = box
        super().__init__(*a, **kw)

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/__hold":
            self.box["event"].wait(30)
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def do_POST(self):
        if self.path != "/__result":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.box["result"] = json.loads(body)
        self.send_response(204)
        self.end_headers()
        self.box["event"].set()


def run_harness(chromium, query="", extra_flags=(), page="harness.html"):
    """Open a page of tests/web/fixtures (`query`: e.g. "?until=400"); returns (posted result, dumped DOM)."""
    box = {"event": threading.Event(), "result": None}
    handler = functools.partial(_Handler, box=box, directory=ROOT)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tests/web/fixtures/{page}{query}"
    try:
        with tempfile.TemporaryDirectory() as profile:
            proc = subprocess.run([chromium, *CHROME_FLAGS, *extra_flags, f"--user-data-dir={profile}", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=60)
    finally:
        box["event"].set()
        server.shutdown()
        server.server_close()
    assert box["result"] is not None, f"the harness posted no result; chromium said:\n{proc.stderr[-3000:]}"
    return box["result"], proc.stdout


def test_player_draws_streamed_frames_in_chromium():
    chromium = find_chromium()
    if not chromium:
        pytest.skip("no chromium binary")
    with open(os.path.join(FIXTURES, "events.json")) as f:
        rec = json.load(f)
    res, dom = run_harness(chromium)
    assert "error" not in res, res["error"]
    assert "No stream yet" in res["emptyText"]
    assert res["canvas"] == [rec["width"], rec["height"]]
    # every real frame drawn, once, in order; the foreign node and the superseded run were ignored
    n = len(rec["colors"])
    assert [d["i"] for d in res["draws"]] == list(range(n))
    assert res["received"] == n and res["foreign"] is False
    # each drawn canvas shows that frame's colour (JPEG: a few levels off), never the stale run's white/black
    for d in res["draws"]:
        want = rec["colors"][d["i"]]
        assert max(abs(a - b) for a, b in zip(d["rgb"], want)) <= 24, (d, want)
    # played at the video's fps, not faster: the k-th frame put up at least k intervals after the first
    interval = 1000 / rec["fps"]
    shown = [d["shownAt"] for d in res["draws"]]
    for k in range(1, n):
        assert shown[k] - shown[0] >= k * interval - 0.5, (k, shown)
    # and painted promptly (decoding the JPEG is the only lag)
    assert all(d["t"] - d["shownAt"] < 250 for d in res["draws"]), res["draws"]
    # the last block arrives late (1 s): the player waited for it instead of skipping or stalling
    assert shown[8] - res["t0"] >= 950 and shown[8] - shown[7] > 2 * interval
    assert shown[11] - shown[8] < 4 * interval + 100
    assert res["status"].startswith("Done"), res["status"]
    assert f"{n}/{n} frames" in res["stats"]
    assert '"draws"' in dom  # the page's own copy of the result is in the dumped DOM as well


def test_steer_box_in_chromium():
    """While the run goes on the box is shown; Enter POSTs {node, text} as JSON (plus "block" when the
    "at block" field next to it is filled, "blend_blocks" when the "blend" field is), a queued text clears
    the box (the blend stays), a refusal shows the server's error, a bad block or blend is not sent; the
    switches are listed (a dropped one greyed, with its reason; a blended one with its blend) and the landed
    one is a tick on the timeline at block/blocks; the box goes when the run is done."""
    chromium = find_chromium()
    if not chromium:
        pytest.skip("no chromium binary")
    res, _ = run_harness(chromium, page="steer.html")
    assert "error" not in res, res["error"]
    assert res["beforeRun"] is False and res["running"] is True and res["afterDone"] is False
    assert res["placeholder"] == "steer: type a prompt, Enter" and res["blockPlaceholder"] == "at block"
    assert res["sameRow"], "the block field sits next to the text box"
    bodies = [{"node": "7", "text": "a red fox"}, {"node": "7", "text": "snow"}, {"node": "7", "text": "rain", "block": 5},
              {"node": "7", "text": "dusk", "blend_blocks": 4}]
    assert res["requests"] == [
        {"path": "/block_cascade/steer", "method": "POST", "type": "application/json", "body": b} for b in bodies]
    assert res["queued"] == {"value": "", "block": "", "error": ""}
    assert res["refused"] == {"value": "snow", "block": "", "error": "node 7 is not running"}
    assert res["atBlock"] == {"value": "", "block": "", "error": ""}
    assert res["badBlock"]["value"] == "hail" and res["badBlock"]["error"].startswith('not sent: "at block"')
    assert res["blended"] == {"value": "", "block": "", "error": "", "blend": "4", "blendPlaceholder": "blend"}
    assert res["badBlend"]["value"] == "fog" and res["badBlend"]["error"].startswith('not sent: "blend" must be')
    assert [w["text"] for w in res["switches"]] == ["block 2 (blend 4): a red fox", "not used: snow (no block left)"]
    assert res["switches"][0]["color"] != res["switches"][1]["color"], "the dropped one is greyed"
    [tick] = res["ticks"]  # the landed switch only, at block 2 of 3
    assert tick["title"] == "block 2 (blend 4): a red fox" and tick["visible"]
    assert abs(tick["at"] - 2 / 3) < 0.02, tick
    # a sampler without a CLIP: the box says how to steer, and takes nothing
    assert res["noClip"] == {"shown": True, "disabled": True, "sent": 0, "placeholder":
                             "to steer, connect a CLIP (CLIPLoader, type wan) to the sampler's clip input"}


def test_endless_stream_memory_in_chromium():
    """An endless run (blocks 0) of 10,008 frames, each event through JSON text like a websocket
    message: the Stream holds at most FRAMES_KEPT frames, the JS heap after a GC stays within 2 MB of
    the heap after the first 1,008 frames (holding every frame would add about 8 MB of these small
    JPEGs), the player's elements do not pile up, playback follows the kept frames, the lines say
    "endless" without totals of 0, and a run stopped by Cancel links its saved video."""
    chromium = find_chromium()
    if not chromium:
        pytest.skip("no chromium binary")
    res, _ = run_harness(chromium, page="endless.html",
                         extra_flags=("--enable-precise-memory-info", "--js-flags=--expose-gc"))
    assert "error" not in res, res["error"]
    assert res["received"] == 834 * 12 and res["lastIndex"] == 834 * 12 - 1
    assert 0 < res["held"] <= res["kept"], res
    assert res["heap10k"] - res["heap1k"] < 2 * 2**20, (res["heap1k"], res["heap10k"])
    assert res["nodes10k"] - res["nodes1k"] <= 4, (res["nodes1k"], res["nodes10k"])  # a few rows of status, not per frame
    assert res["shown"] > res["lastIndex"] - res["kept"], "playback went on from the frames kept"
    status, stats, cascade = res["lines"]
    assert status == "Streaming" and cascade == "block 834 · endless: Cancel ends it and keeps the video", res["lines"]
    assert stats.startswith(f"{834 * 12} frames (last {res['held']} kept)"), stats
    assert not any(bad in line for line in res["lines"] for bad in ("NaN", "/0", "undefined")), res["lines"]
    assert res["ticks"] == ["block 808: prompt 808"]  # the switches of the latest blocks only
    assert res["stopped"] == {"status": "Stopped by Cancel after 626.5 s: the video is saved",
                              "cascade": "endless: 834 blocks done",
                              "link": "/api/view?filename=block_cascade_00001.mp4&subfolder=&type=output",
                              "linkText": "saved video: block_cascade_00001.mp4", "linkShown": True}
