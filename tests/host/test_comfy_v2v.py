"""Block Cascade Video-to-Video inside a real ComfyUI (CPU), on the shipped workflows and tiny files: skipped unless
COMFYUI_DIR points at a ComfyUI checkout (the second test also needs selenium in the host's Python, Chromium and its
driver).

- workflows/api/file_to_video.json runs to execution_success: core LoadVideo (a small MP4 put in the input folder)
  into the node, its chunks streamed as block_cascade events, SaveVideo writing the restyled video (1 + 4 k frames).
- workflows/api/webcam_to_video.json in ComfyUI's real frontend, headless Chromium with a fake camera
  (--use-fake-device-for-media-stream --use-fake-ui-for-media-stream): the widget shows its webcam button only
  once the run that reads the webcam starts; pressing it starts the camera and posts its frames; restyled frames
  come back and play; the frontend's Cancel ends the run (stopped, the recording saved) and stops the camera (its
  tracks ended, nothing posted any more: the route answers 409). BLOCK_CASCADE_SCREENSHOTS=DIR keeps the page's
  screenshots there (``webcam-running.png``, ``webcam-widget.png``, ``webcam-stopped.png``, or ``webcam-failed.png``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess

import pytest
from test_comfy_frontend import START_CHROMIUM, VUE_SETTING
from test_comfy_host import COMFYUI_DIR, DIT, EMBEDS, ROOT, VAE, events, started_host

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host")

NODE = "BlockCascadeVideoToVideo"
INPUT_VIDEO = "block_cascade_v2v_input.mp4"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    yield from started_host(tmp_path_factory)


def shipped_v2v(name: str, width: int, height: int) -> dict:
    """A shipped video-to-video API workflow on this machine's tiny files: the tiny DiT and VAE, the prompt text as
    a tiny embedding (no umt5-xxl here: the CLIP and the node's steering clip go), the size given."""
    with open(os.path.join(ROOT, "workflows", "api", name)) as f:
        wf = json.load(f)
    for node in wf.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "CLIPTextEncode":
            node.update(class_type="BlockCascadeEmbedsLoader", inputs={"embeds": EMBEDS[0]})
        elif ct == "BlockCascadeModelLoader":
            ins.update(model_name=DIT, dtype="fp32")
        elif ct == "VAELoader":
            ins["vae_name"] = VAE
        elif ct == NODE:
            ins.update(width=width, height=height, seed=random.randrange(1 << 30))
    wf = {k: v for k, v in wf.items() if v["class_type"] != "CLIPLoader"}
    for node in wf.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not isinstance(v, list) or v[0] in wf}
    return wf


def put_input_video(host, frames: int, width: int, height: int) -> str:
    """A small MP4 of random frames in the host's input folder (what core LoadVideo lists)."""
    import av
    import numpy as np

    folder = os.path.join(host.base, "input")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(4)
    with av.open(os.path.join(folder, INPUT_VIDEO), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return INPUT_VIDEO


def test_the_file_to_video_workflow_runs_to_success(host):
    import av

    wf = shipped_v2v("file_to_video.json", 32, 32)
    (video,) = [n for n in wf.values() if n["class_type"] == "LoadVideo"]
    video["inputs"]["file"] = put_input_video(host, 14, 48, 40)  # 3 chunks (1 + 4 * 3), the 14th frame dropped
    final, msgs, pid = host.run(wf)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    node = next(k for k, n in wf.items() if n["class_type"] == NODE)
    (start,) = events(msgs, "start", node)
    assert start["blocks"] == 3 and start["frames_total"] == 13 and "live_input" not in start
    assert start["settings"].startswith("streamdiffusionv2 video-to-video: steps 700,500")
    frames = events(msgs, "frames", node)
    assert [f["block"] for f in frames] == [0, 1, 2] and sum(len(f["frames"]) for f in frames) == 13
    assert "error" not in events(msgs, "done", node)[0]
    saver = next(k for k, n in wf.items() if n["class_type"] == "SaveVideo")
    (saved,) = host.history(pid)["outputs"][saver]["images"]
    with av.open(os.path.join(host.base, "output", saved["subfolder"], saved["filename"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 13


FAKE_CAMERA = ('"--disable-dev-shm-usage",', '"--disable-dev-shm-usage", "--use-fake-device-for-media-stream", '
                                             '"--use-fake-ui-for-media-stream",')
assert FAKE_CAMERA[0] in START_CHROMIUM
# Runs in the host's Python: argv = url, workflow file, screenshot folder; prints one JSON line.
DRIVE_WEBCAM = 'WINDOW = "1600,1400"\n' + START_CHROMIUM.replace(*FAKE_CAMERA) + r'''
import json, os, sys, time
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

url, wf_path, shots = sys.argv[1:4]
wf = json.load(open(wf_path))
res = {}


def shot(name):
    driver.save_screenshot(os.path.join(shots, f"webcam-{name}.png"))


def js(expr):
    return driver.execute_script(f"try {{ return ({expr}); }} catch (e) {{ return null; }}")


def wait(expr, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        value = js(expr)
        if value:
            return value
        time.sleep(0.25)
    for key, sel in (("status", ".bc-status"), ("stats", ".bc-stats"), ("note", ".bc-webcam-note")):
        res.setdefault(key, text(sel))
    res["events"] = js("window.__bcEvents") or []
    res["timeout"] = expr
    shot("failed")
    raise SystemExit(json.dumps(res))


def text(sel):
    return js(f"(document.querySelector('.bc-player {sel}') || {{textContent: ''}}).textContent")


SHOWN = "(() => { const e = document.querySelector('.bc-player .bc-webcam'); return !!e && e.isConnected" \
        " && getComputedStyle(e).display !== 'none' && e.closest('.bc-steer').style.display !== 'none'; })()"
FRAMES = "Number((/^(\\d+) frames/.exec(document.querySelector('.bc-player .bc-stats').textContent) || [0, 0])[1])"
try:
    driver.get(url)
    wait("window.app && app.graph && Object.keys(LiteGraph.registered_node_types).length > 0")
    time.sleep(2)
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # a first-run dialog
    res["frontend"] = js("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
    driver.execute_script(  # what the page receives, and the camera's stream when the widget asks for it
        "window.__bcEvents = []; for (const t of ['block_cascade.start', 'block_cascade.done', 'execution_error',"
        " 'execution_interrupted', 'execution_success']) app.api.addEventListener(t, (e) => window.__bcEvents.push("
        "[t, JSON.stringify(e.detail).slice(0, 300)]));"
        " const md = navigator.mediaDevices, ask = md.getUserMedia.bind(md);"
        " md.getUserMedia = async (c) => { const s = await ask(c); window.__bcCamera = s; return s; };")
    driver.execute_script("app.loadApiJson(arguments[0], 'webcam.json')", wf)
    wait("document.querySelector('.bc-player') && document.querySelector('.bc-player').isConnected")
    res["shown_before_run"] = js(SHOWN)
    reply = driver.execute_async_script(
        "const [wf, done] = arguments; fetch('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({prompt: wf, client_id: app.api.clientId})}).then(r => r.json()).then(done);", wf)
    res["prompt_id"] = reply.get("prompt_id")
    if not res["prompt_id"]:
        raise SystemExit(json.dumps({**res, "refused": reply}))
    wait(SHOWN)  # the run started: it waits for the camera
    res["status_waiting"] = text(".bc-status")
    driver.find_element(By.CSS_SELECTOR, ".bc-player .bc-webcam button").click()
    wait("window.__bcCamera && window.__bcCamera.getTracks().some(t => t.readyState === 'live')")
    wait(f"{FRAMES} >= 9")  # chunks 0 and 1 restyled and back in the player
    wait("(() => { const c = document.querySelector('.bc-player canvas'); const d = c.getContext('2d')"
         ".getImageData(0, 0, c.width, c.height).data; let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] +"
         " d[i + 1] + d[i + 2]; return s > 0; })()")  # a frame is drawn: the player plays them
    res["sent_note"], res["button_running"] = text(".bc-webcam-note"), text(".bc-webcam button")
    res["frames_before_cancel"] = js(FRAMES)
    shot("running")
    driver.find_element(By.CSS_SELECTOR, ".bc-player").screenshot(os.path.join(shots, "webcam-widget.png"))
    cancel = js("[...document.querySelectorAll('button')].find(b => /cancel|interrupt/i.test("
                "(b.getAttribute('aria-label') || '') + ' ' + (b.title || '')))")
    cancel.click()
    wait("/Stopped/.test(document.querySelector('.bc-player .bc-status').textContent)")
    wait("window.__bcCamera.getTracks().every(t => t.readyState === 'ended')", timeout=30)  # the camera is off
    res["status"], res["stats"] = text(".bc-status"), text(".bc-stats")
    res["button_after"], res["shown_after"] = text(".bc-webcam button"), js(SHOWN)
    node = js("String(app.graph.nodes.find(n => n.comfyClass === 'BlockCascadeVideoToVideo').id)")
    res["post_after"] = driver.execute_async_script(
        "const [node, done] = arguments; fetch('/block_cascade/webcam/' + node, {method: 'POST', body: new Blob("
        "[new Uint8Array([255, 216, 255, 217])], {type: 'image/jpeg'})}).then(async r => done([r.status,"
        " await r.json()]));", node)
    time.sleep(1)
    shot("stopped")
    print(json.dumps(res))
finally:
    driver.quit()
'''


def test_the_webcam_button_streams_the_fake_camera_and_cancel_stops_both(host, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON") or "python3"
    has = subprocess.run([python, "-c", "import selenium"], capture_output=True).returncode == 0
    if not (has and shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("the host's Python has no selenium, or Chromium or chromedriver is missing")
    wf = shipped_v2v("webcam_to_video.json", 64, 64)
    (node_id,) = [k for k, n in wf.items() if n["class_type"] == NODE]
    assert wf[node_id]["inputs"]["live"] == "webcam" and "clip" not in wf[node_id]["inputs"]
    wf_path, shots = tmp_path / "webcam.json", os.environ.get("BLOCK_CASCADE_SCREENSHOTS") or str(tmp_path)
    wf_path.write_text(json.dumps(wf))
    os.makedirs(shots, exist_ok=True)
    status, reply = host.post("/settings", {VUE_SETTING: False})  # the canvas renderer
    assert status == 200, reply
    run = subprocess.run([python, "-c", DRIVE_WEBCAM, host.url, str(wf_path), shots], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["shown_before_run"] is False  # no run reading the webcam yet: no button
    sent = re.match(r"(\d+) sent(?:, (\d+) dropped)?$", res["sent_note"])  # dropped: the camera outran the model
    assert res["button_running"] == "■ stop webcam" and sent, res
    assert int(sent.group(1)) >= 9 and res["frames_before_cancel"] >= 9
    assert res["status"].startswith("Stopped by Cancel") and res["shown_after"] is False, res
    assert res["button_after"] == "webcam"  # the sender is off
    assert res["post_after"] == [409, {"error": f"node {node_id} is not running"}]  # the run's route is gone
    history = host.history(res["prompt_id"])
    assert history["status"]["status_str"] == "success"  # Cancel ended the stream; the graph saved what was made
    (video,) = history["outputs"][node_id]["block_cascade_video"]  # the stream's recording
    import av

    with av.open(os.path.join(host.base, "output", video["subfolder"], video["filename"])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames >= 9 and res["stats"].startswith(f"{frames} frames"), (frames, res["stats"])
