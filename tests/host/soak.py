"""A soak of the pack inside a real ComfyUI (CPU, tiny model): an endless stream watched, steered and reloaded
for a long time, with the server's resident memory, open files and threads held to a stated bound.

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/host/soak.py \\
        --blocks 20000 --viewers 200 --reloads 50

(a long run, outside CI's suite; tests/host/test_comfy_soak.py is its short version, a host test). It starts
ComfyUI as the host tests do (its own port, a throwaway base folder with this pack, tiny models and the frontend
test's stand-in CLIP) and queues one endless run (length 0, window 6, sink 3; a tiny 64 x 32 video, no VAE: the
latent-RGB preview) that the MP4 recording writes as it streams. While it runs:
- every ``--steer-every`` blocks (as the websocket's block_cascade.frames events count them) a new unique text
  goes to POST /block_cascade/steer; each must land: a block_cascade.switch event with a block, not dropped;
- ``--viewers`` MJPEG clients (GET /block_cascade/stream/<node>.mjpeg) come and go in bursts of at most
  ``--concurrency``, spread over the run: each reads a few parts, then closes cleanly, resets the connection
  mid-part, or stalls without reading before it resets;
- headless Chromium (Selenium in ComfyUI's Python, as the frontend test drives it) reloads the page
  ``--reloads`` times, spread over the run, each until the frontend has registered the pack's nodes;
- the ComfyUI process' VmRSS (/proc/<pid>/status), open files (/proc/<pid>/fd) and threads (/proc/<pid>/task)
  are sampled every ``--sample-every`` blocks, and twice with nothing else going on (no viewer connected,
  the browser quit, the stream running): at ``--warm`` blocks (the baseline) and after ``--blocks`` blocks
  (the end).
Then POST /interrupt ends the stream; the done event names the MP4, which PyAV decodes to the end: as many
frames as the done event counts. The bound: every sample after the baseline has RSS <= baseline +
``--rss-margin-mb``; at the end, fds <= baseline + ``--fds-margin`` and threads <= baseline + ``--threads-margin``.
Progress goes to stderr; the last line on stdout is one JSON summary (``ok``, ``failures``, the figures).
Exit 0 when every check holds, 1 when one fails.

The default margins, from a run of 20,119 blocks on a 2-core CPU machine (17 minutes, 19 blocks/s): RSS went
from 615.6 MB (the baseline, block 1,122) to 627.8 MB, the growth all in the first ~6,000 blocks (memory ComfyUI
keeps after serving the page and the viewers, about 1 MB at some of the first dozen reloads), flat for the last
14,000; fds (14) and threads (15) ended where the baseline had them. 50 MB is four times that growth, and far
below what a leak that scales with the run would add: an unbounded cache of encoded texts keeps 128 KiB for each
of the ~4,000 texts here (500 MB; a real umt5 encoding is 8 MiB), a thread or socket left per viewer or reload
adds 200 or 50.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):  # tests/ (oracles) and tests/host, as tests/conftest.py makes them
    if _path not in sys.path:
        sys.path.insert(0, _path)

import test_comfy_host
from test_comfy_frontend import STAND_IN_CLIP, START_CHROMIUM
from test_comfy_host import WebSocket, started_host, workflow

NODE = "8"  # the sampler's id in the workflow
WORDS = ("red", "quiet", "golden", "misty", "neon", "frozen", "wild", "ancient", "fox", "harbour", "forest", "city",
         "comet", "river", "desert", "lantern", "train", "garden", "storm", "market")

# Runs in ComfyUI's Python (selenium there, as in test_comfy_frontend): argv = the page's url. Reads commands on
# stdin ("reload", "quit"), answers one JSON line each on stdout; the first line says the browser is up.
BROWSER = 'WINDOW = "1280,900"\n' + START_CHROMIUM + r'''
import json, shutil, sys, time

url = sys.argv[1]
READY = ("try { return !!(window.app && app.graph && window.LiteGraph"
         " && LiteGraph.registered_node_types['BlockCascadeSampler']); } catch (e) { return false; }")
print(json.dumps({"up": True}), flush=True)
loaded = False
try:
    for line in sys.stdin:
        if line.strip() != "reload":
            break
        t = time.time()
        try:
            if loaded:
                driver.refresh()
            else:
                driver.get(url)
                loaded = True
            while not driver.execute_script(READY):
                if time.time() > t + 300:
                    raise TimeoutError("the page did not register the pack's nodes in 300 s")
                time.sleep(0.25)
            print(json.dumps({"ok": True, "s": round(time.time() - t, 2)}), flush=True)
        except Exception as e:
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
'''


def proc_stats(pid: int) -> dict:
    """The process' resident memory (VmRSS, MB), open files and threads, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def soak_workflow(seed: int, width: int = 64, height: int = 32) -> dict:
    """The endless run: the host tests' graph cut to the DiT, one prompt, the config (window 6, sink 3, causal,
    one block in flight) and the sampler with the stand-in CLIP to steer it; no VAE (the latent-RGB preview)."""
    wf = workflow(seed=seed, blocks=0, width=width, height=height)
    wf = {k: v for k, v in wf.items() if k in ("1", "2", "6", NODE)}
    wf["6"]["inputs"].update(parallel=1, attention="causal", window=6, sink=3)
    wf["20"] = {"class_type": "StandInCLIP", "inputs": {}}
    ins = wf[NODE]["inputs"]
    for name in ("schedule", "vae"):
        ins.pop(name)
    ins.update(positive=["2", 0], clip=["20", 0])
    return wf


# ---- MJPEG viewers ----------------------------------------------------------------------------------
def view(port: int, mode: str, parts: int, rng: random.Random) -> dict:
    """One MJPEG client: reads ``parts`` whole parts (each a JPEG), then by ``mode`` closes cleanly ("polite"),
    resets the connection in the middle of the next part ("abrupt"), or stops reading for two seconds while the
    server goes on writing, then resets ("stall"). -> {status, parts, jpegs_ok, mode}."""
    got = {"mode": mode, "status": None, "parts": 0, "jpegs_ok": True}
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        s.sendall(f"GET /block_cascade/stream/{NODE}.mjpeg HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        buf = b""

        def need(n):
            nonlocal buf
            while len(buf) < n:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the stream ended")
                buf += chunk

        while b"\r\n\r\n" not in buf:
            need(len(buf) + 1)
        head, buf = buf.split(b"\r\n\r\n", 1)
        got["status"] = int(head.split(b" ", 2)[1])
        if got["status"] != 200:
            return got
        for _ in range(parts):
            while b"\r\n\r\n" not in buf:
                need(len(buf) + 1)
            part_head, buf = buf.split(b"\r\n\r\n", 1)
            lines = dict(line.split(b": ", 1) for line in part_head.split(b"\r\n")[1:])
            n = int(lines[b"Content-Length"])
            need(n + 2)
            jpeg, buf = buf[:n], buf[n + 2:]
            got["jpegs_ok"] &= jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
            got["parts"] += 1
        if mode == "abrupt":
            need(len(buf) + rng.randint(1, 64))  # into the next part
        elif mode == "stall":
            time.sleep(2.0)
    except (ConnectionError, OSError) as exc:
        got["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if mode == "polite":
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:  # a reset: the client is gone without a goodbye
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return got


# ---- the page, reloaded -----------------------------------------------------------------------------
class Browser:
    """Headless Chromium (the BROWSER script in ComfyUI's Python) that reloads the page on request, one at a time."""

    def __init__(self, url: str, python: str):
        self.url, self.python = url, python
        self.proc = None
        self.busy = False
        self.results: list[dict] = []
        self._lock = threading.Lock()

    def reload(self) -> None:
        if self.proc is None:
            self.proc = subprocess.Popen([self.python, "-c", BROWSER, self.url], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.busy = True
        self.proc.stdin.write("reload\n")
        self.proc.stdin.flush()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            answer = json.loads(line)
            if "up" in answer:
                continue
            with self._lock:
                self.results.append(answer)
            self.busy = False
        if self.busy:  # the script died during a reload
            with self._lock:
                self.results.append({"ok": False, "error": f"the browser script exited ({proc.wait()})"})
            self.busy = False

    def quit(self, timeout: float = 120) -> None:
        """Quit Chromium (its connections to the server close); the next reload starts a new one."""
        if self.proc is None:
            return
        deadline = time.time() + timeout
        while self.busy and time.time() < deadline:
            time.sleep(0.1)
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(max(1.0, deadline - time.time()))
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# ---- the soak ---------------------------------------------------------------------------------------
class State:
    def __init__(self):
        self.blocks_done = 0  # blocks whose frames came (frames events of block >= 0)
        self.stop = False


class Controller(threading.Thread):
    """Starts the viewers and the reloads as the blocks go by, samples the server, and takes the baseline and the
    end samples once nothing else is going on (a sample is {block, seconds, rss_mb, fds, threads})."""

    def __init__(self, host, state: State, blocks: int, warm: int, viewers: int, reloads: int, concurrency: int,
                 sample_every: int, rng: random.Random, log):
        super().__init__(daemon=True)
        self.host, self.state, self.blocks, self.warm, self.rng, self.log = host, state, blocks, warm, rng, log
        self.pid, self.start_time = host.proc.pid, time.time()
        self.browser = Browser(host.url, os.environ.get("COMFYUI_PYTHON") or sys.executable)
        sizes = [min(concurrency, viewers - i) for i in range(0, viewers, concurrency)]  # bursts
        self.bursts = list(zip(spread(len(sizes), warm, blocks), sizes))
        self.bursts_total = sizes
        self.reloads_due = spread(reloads, warm, blocks)
        self.reloads_asked = 0
        self.sample_every, self.next_sample = sample_every, sample_every
        self.samples: list[dict] = []
        self.checkpoints = {}  # "baseline", "end" -> sample
        self.viewed: list[dict] = []
        self.open_viewers = self.launched = 0
        self._lock = threading.Lock()
        self.error = None

    def warmed(self) -> bool:
        """The warm-up's blocks are done, and its burst of viewers and its reload started (the baseline waits
        for them to end): what the server allocates once for them (aiohttp's buffers, asyncio's executor
        threads that serve the page's files) is in the baseline."""
        return self.state.blocks_done >= self.warm and self.reloads_asked >= min(1, len(self.reloads_due)) \
            and self.launched >= (self.bursts_total[0] if self.bursts_total else 0)

    def sample(self) -> dict:
        return {"block": self.state.blocks_done, "seconds": round(time.time() - self.start_time, 1),
                **proc_stats(self.pid)}

    def _viewer(self, k: int) -> None:
        mode = ("polite", "abrupt", "stall")[k % 3]
        try:
            got = view(self.host.port, mode, self.rng.randint(1, 8), self.rng)
        except Exception as exc:  # noqa: BLE001 - counted as a failed viewer
            got = {"mode": mode, "status": None, "parts": 0, "jpegs_ok": False, "error": repr(exc)}
        with self._lock:
            self.viewed.append(got)
            self.open_viewers -= 1

    def _launch(self, n: int) -> None:
        with self._lock:
            self.open_viewers += n
        for _ in range(n):
            threading.Thread(target=self._viewer, args=(self.launched,), daemon=True).start()
            self.launched += 1

    def quiet_sample(self, name: str) -> None:
        """Wait until no viewer is connected and the browser is quit, let the server close its side, sample."""
        self.browser.quit()
        while self.open_viewers:
            time.sleep(0.1)
        time.sleep(3)
        self.checkpoints[name] = s = self.sample()
        self.samples.append({**s, "quiet": name})
        self.log(f"soak: {name} at block {s['block']}: rss {s['rss_mb']} MB, fds {s['fds']}, threads {s['threads']}")

    def run(self) -> None:
        try:
            while not self.state.stop:
                done = self.state.blocks_done
                if "baseline" not in self.checkpoints and self.warmed():
                    self.quiet_sample("baseline")
                    continue
                if self.bursts and done >= self.bursts[0][0]:
                    self._launch(self.bursts.pop(0)[1])
                if self.reloads_asked < len(self.reloads_due) and not self.browser.busy \
                        and done >= self.reloads_due[self.reloads_asked]:
                    self.reloads_asked += 1
                    self.browser.reload()
                if done >= self.next_sample:
                    self.samples.append(self.sample())
                    self.next_sample = (done // self.sample_every + 1) * self.sample_every
                if done >= self.blocks and "baseline" in self.checkpoints and not self.bursts \
                        and self.reloads_asked == len(self.reloads_due) and not self.browser.busy:
                    self.quiet_sample("end")
                    return
                time.sleep(0.1)
        except Exception as exc:  # noqa: BLE001 - reported in the summary
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.browser.quit()


def spread(n: int, warm: int, blocks: int) -> list[int]:
    """When n things happen over a run of ``blocks`` blocks whose first ``warm`` are its warm-up: the first
    in the middle of the warm-up, the others evenly over the rest."""
    if n == 0:
        return []
    rest = (blocks - warm) / max(1, n - 1)
    return [max(1, warm // 2)] + [int(warm + (k - 0.5) * rest) for k in range(1, n)]


class Steerer(threading.Thread):
    """POSTs the steered texts in order, off the websocket's reading thread: [(text, block seen, HTTP status)]."""

    def __init__(self, host):
        super().__init__(daemon=True)
        self.host, self.todo, self.sent = host, queue.Queue(), []

    def run(self) -> None:
        while (item := self.todo.get()) is not None:
            text, block = item
            status, answer = self.host.post("/block_cascade/steer", {"node": NODE, "text": text})
            self.sent.append({"text": text, "block": block, "status": status, **({} if status == 200 else answer)})


def soak(host, blocks: int, viewers: int, reloads: int, warm: int, steer_every: int = 5, concurrency: int = 10,
         sample_every: int = 100, progress_every: int = 500, rss_margin_mb: float = 50, fds_margin: int = 4,
         threads_margin: int = 2, width: int = 64, height: int = 32, seed: int | None = None,
         log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """One soak on a started ``host`` (test_comfy_host.Host whose custom nodes hold STAND_IN_CLIP): the summary
    ({"ok", "failures", figures...}; see the module docstring)."""
    import av

    rng = random.Random(seed)
    seed = rng.randrange(1 << 30) if seed is None else seed
    state, tag = State(), uuid.uuid4().hex[:6]
    controller = Controller(host, state, blocks, warm, viewers, reloads, concurrency, sample_every, rng, log)
    steerer = Steerer(host)
    client = uuid.uuid4().hex
    ws = WebSocket("127.0.0.1", host.port, f"/ws?clientId={client}", timeout=60)
    status, reply = host.post("/prompt", {"prompt": soak_workflow(seed, width, height), "client_id": client})
    assert status == 200, reply
    prompt_id = reply["prompt_id"]
    failures, switches, texts = [], {}, 0
    order_ok, last_block, final, done, cancel_at, ended_at = True, -1, None, None, None, None
    begin = time.time()
    steerer.start()
    controller.start()
    next_steer, next_progress = steer_every, progress_every
    try:
        while final is None:
            try:
                op, data = ws.recv(600)
            except TimeoutError:
                failures.append(f"no websocket message for 600 s at block {state.blocks_done}")
                break
            if op != 1:
                continue
            msg = json.loads(data)
            kind, d = msg["type"], msg.get("data") or {}
            if kind == "block_cascade.frames" and d.get("node") == NODE and d["block"] >= 0:
                order_ok &= d["block"] == last_block + 1
                last_block = d["block"]
                state.blocks_done = n = last_block + 1
                # a new text every steer_every blocks, once the one before has landed (two arriving between the
                # same two ticks would land at one block, where the later replaces the earlier)
                if n >= next_steer and n + steer_every <= blocks and len(steerer.sent) == texts and \
                        all(t["text"] in switches or t["status"] != 200 for t in steerer.sent[-1:]):
                    texts += 1
                    words = " ".join(rng.choice(WORDS) for _ in range(6))
                    steerer.todo.put((f"soak {tag} text {texts}: {words}", last_block))
                    next_steer = n + steer_every
                if n >= next_progress:
                    s = proc_stats(host.proc.pid)
                    rate = n / (time.time() - begin)
                    log(f"soak: block {n}/{blocks} ({rate:.2f} blocks/s) rss {s['rss_mb']} MB fds {s['fds']} "
                        f"threads {s['threads']}; viewers {len(controller.viewed)}/{viewers}, reloads "
                        f"{len(controller.browser.results)}/{reloads}, steered {len(steerer.sent)}, landed "
                        f"{sum(1 for v in switches.values() if v.get('block') is not None)}")
                    next_progress += progress_every
            elif kind == "block_cascade.switch" and d.get("node") == NODE:
                switches[d["text"]] = d
            elif kind == "block_cascade.done" and d.get("node") == NODE:
                done = d
            elif kind in ("execution_success", "execution_error", "execution_interrupted") \
                    and d.get("prompt_id") == prompt_id:
                final = kind
            if cancel_at is None:  # Cancel once the end sample is taken and every steered text landed
                if "end" in controller.checkpoints and ended_at is None:
                    ended_at = state.blocks_done
                landed = steerer.todo.empty() and len(steerer.sent) == texts and \
                    all(s["text"] in switches for s in steerer.sent if s["status"] == 200)
                if (ended_at is not None and (landed or state.blocks_done > ended_at + 50)) or controller.error \
                        or not controller.is_alive():
                    cancel_at = state.blocks_done
                    host.post("/interrupt", {})
    finally:
        state.stop = True
        steerer.todo.put(None)
        ws.close()
        controller.join(180)
    seconds = round(time.time() - begin, 1)
    after = proc_stats(host.proc.pid)

    # ---- the checks
    if final != "execution_success":
        failures.append(f"the prompt ended with {final}")
    if controller.error:
        failures.append(f"the controller failed: {controller.error}")
    if not order_ok:
        failures.append("frames events skipped or repeated a block")
    base, end = controller.checkpoints.get("baseline"), controller.checkpoints.get("end")
    bounds = None
    if base is None or end is None:
        failures.append(f"no {'baseline' if base is None else 'end'} sample")
    else:
        bounds = {"rss_mb": round(base["rss_mb"] + rss_margin_mb, 1), "fds": base["fds"] + fds_margin,
                  "threads": base["threads"] + threads_margin}
        later = [s for s in controller.samples if s["block"] >= base["block"]]
        worst = max(later, key=lambda s: s["rss_mb"])
        if worst["rss_mb"] > bounds["rss_mb"]:
            failures.append(f"RSS {worst['rss_mb']} MB at block {worst['block']} > {bounds['rss_mb']} MB (baseline "
                            f"{base['rss_mb']} MB at block {base['block']} + {rss_margin_mb})")
        for key in ("fds", "threads"):
            if end[key] > bounds[key]:
                failures.append(f"{key} {end[key]} at the end (block {end['block']}) > {bounds[key]} (baseline "
                                f"{base[key]} at block {base['block']} + {bounds[key] - base[key]})")
    refused = [s for s in steerer.sent if s["status"] != 200]
    not_landed = [s["text"] for s in steerer.sent if s["status"] == 200 and (
        switches.get(s["text"], {}).get("block") is None or switches[s["text"]].get("dropped"))]
    early = [s["text"] for s in steerer.sent if s["status"] == 200 and s["text"] not in not_landed
             and switches[s["text"]]["block"] <= s["block"]]
    lags = [switches[s["text"]]["block"] - s["block"] for s in steerer.sent if s["text"] in switches
            and switches[s["text"]].get("block") is not None]
    if refused:
        failures.append(f"{len(refused)} steer requests refused, the first: {refused[0]}")
    if not_landed:
        failures.append(f"{len(not_landed)} steered texts did not land, the first: {not_landed[0]!r} -> "
                        f"{switches.get(not_landed[0])}")
    if early:
        failures.append(f"{len(early)} switches landed at a block already made, the first: {early[0]!r}")
    if len(steerer.sent) != texts or texts < 0.9 * (blocks // steer_every - 1):
        failures.append(f"{len(steerer.sent)} texts steered of {texts} queued (want about {blocks // steer_every})")
    viewed = controller.viewed
    bad_viewers = [v for v in viewed if v["status"] != 200 or not v["jpegs_ok"] or v["parts"] < 1]
    if len(viewed) != viewers or bad_viewers:
        failures.append(f"{len(viewed)} of {viewers} viewers came; {len(bad_viewers)} failed, the first: "
                        f"{bad_viewers[:1]}")
    reloaded = controller.browser.results
    if len(reloaded) != reloads or not all(r["ok"] for r in reloaded):
        failures.append(f"{sum(r['ok'] for r in reloaded)} of {reloads} reloads loaded the page: "
                        f"{[r for r in reloaded if not r['ok']][:1]}")
    video = None
    if done is None or "error" in done or not done.get("stopped") or "video" not in done:
        failures.append(f"the done event: {done}")
    else:
        v = done["video"]
        path = os.path.join(host.base, "output", v["subfolder"], v["filename"])
        t = time.time()
        decoded = 0
        try:
            with av.open(path) as container:
                for _ in container.decode(video=0):
                    decoded += 1
        except Exception as exc:  # noqa: BLE001 - a file that does not play to the end
            failures.append(f"{v['filename']} stopped playing after {decoded} frames: {exc}")
        video = {"file": f"{v['subfolder']}/{v['filename']}", "bytes": os.path.getsize(path), "done_frames":
                 done["frames"], "done_blocks": done["blocks"], "decoded_frames": decoded,
                 "decode_s": round(time.time() - t, 1)}
        if decoded != done["frames"] or done["frames"] != 1 + 4 * (3 * done["blocks"] - 1):
            failures.append(f"the MP4 decodes to {decoded} frames; the done event counts {done['frames']} of "
                            f"{done['blocks']} blocks")
        if done["blocks"] < blocks:
            failures.append(f"the stream made {done['blocks']} blocks, fewer than {blocks}")
    made = done["blocks"] if done else state.blocks_done
    return {
        "ok": not failures, "failures": failures, "blocks": made, "asked_blocks": blocks, "seconds": seconds,
        "blocks_per_s": round(made / seconds, 2) if seconds else None, "size": f"{width}x{height}",
        "cancel_at_block": cancel_at, "baseline": base, "end": end, "after_done": after, "bounds": bounds,
        "margins": {"rss_mb": rss_margin_mb, "fds": fds_margin, "threads": threads_margin},
        "max_sampled": {k: max((s[k] for s in controller.samples), default=None) for k in ("rss_mb", "fds", "threads")},
        "steer": {"every": steer_every, "sent": len(steerer.sent), "landed": len(lags), "refused": len(refused),
                  "not_landed": len(not_landed), "lag_blocks": [min(lags), max(lags)] if lags else None},
        "viewers": {"connections": len(viewed), "ok": len(viewed) - len(bad_viewers),
                    "parts": sum(v["parts"] for v in viewed),
                    "modes": {m: sum(v["mode"] == m for v in viewed) for m in ("polite", "abrupt", "stall")}},
        "reloads": {"done": sum(r["ok"] for r in reloaded), "asked": reloads,
                    "seconds_max": max((r.get("s", 0) for r in reloaded), default=None)},
        "video": video, "samples": [(s["block"], s["rss_mb"], s["fds"], s["threads"]) for s in controller.samples],
    }


class _Folders:
    """The one piece of pytest's tmp_path_factory that started_host uses."""

    def __init__(self, base: str):
        self.base = base

    def mktemp(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=name + "-", dir=self.base)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="the ComfyUI checkout (COMFYUI_DIR)")
    p.add_argument("--blocks", type=int, default=20000)
    p.add_argument("--viewers", type=int, default=200)
    p.add_argument("--reloads", type=int, default=50)
    p.add_argument("--warm", type=int, default=1000, help="blocks before the baseline sample")
    p.add_argument("--steer-every", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=10, help="viewers at once (a burst)")
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--progress-every", type=int, default=500)
    p.add_argument("--rss-margin-mb", type=float, default=50)
    p.add_argument("--fds-margin", type=int, default=4)
    p.add_argument("--threads-margin", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--seed", type=int)
    p.add_argument("--keep", action="store_true", help="keep the base folder (log, MP4) and print where it is")
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("set COMFYUI_DIR or --comfyui to a ComfyUI checkout")
    test_comfy_host.COMFYUI_DIR = args.comfyui  # read by Host when it starts the server
    folders = _Folders(tempfile.mkdtemp(prefix="block-cascade-soak-"))
    hosts = started_host(folders, {"stand_in_clip.py": STAND_IN_CLIP})
    host = next(hosts)
    print(f"soak: ComfyUI pid {host.proc.pid} at {host.url}, base {host.base}", file=sys.stderr, flush=True)
    try:
        summary = soak(host, args.blocks, args.viewers, args.reloads, args.warm, args.steer_every, args.concurrency,
                       args.sample_every, args.progress_every, args.rss_margin_mb, args.fds_margin,
                       args.threads_margin, args.width, args.height, args.seed)
    finally:
        hosts.close()
        if args.keep:
            print(f"soak: kept {folders.base}", file=sys.stderr)
        else:
            shutil.rmtree(folders.base, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
