"""An endless stream in ComfyUI's real frontend (headless Chromium driven by Selenium in the host's
Python): skipped unless COMFYUI_DIR is set and the host's Python has selenium with Chromium and its
driver on the machine.

What it proves, as a user would do it: an endless run (length 0, a window) is queued from the page
with the workflow loaded into the canvas; the sampler's widget streams frames; a prompt typed into its
steer box (real keystrokes, Enter) lands and is marked on the timeline while frames go on; the
frontend's own Cancel button ends the stream; the widget then says it stopped and links the saved
video, the prompt succeeds, and the MP4 in the output folder holds every frame the widget counted.
The steering CLIP is a stand-in node of this test (text -> seeded [1, 8, 4096] conditioning):
core's umt5-xxl does not fit a small CPU machine.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess

import pytest
from test_comfy_host import COMFYUI_DIR, EMBEDS, started_host, workflow

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host")

STAND_IN_CLIP = '''
import hashlib

import torch


class _Clip:
    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(int(hashlib.sha256(tokens.encode()).hexdigest()[:8], 16))
        return [[torch.randn(1, 8, 4096, generator=g), {}]]


class StandInCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return (_Clip(),)


NODE_CLASS_MAPPINGS = {"StandInCLIP": StandInCLIP}
'''

# Runs in the host's Python: argv = url, workflow file, screenshot file; prints one JSON line.
DRIVE_PAGE = r'''
import json, sys, tempfile, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

url, wf_path, shot = sys.argv[1:4]
wf = json.load(open(wf_path))
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
# tall enough for the whole sampler node (its steer box) where either frontend places it
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1400",
             f"--user-data-dir={tempfile.mkdtemp()}"):
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
res = {}


def wait(expr, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = driver.execute_script(f"try {{ return ({expr}); }} catch (e) {{ return null; }}")
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.25)
    raise SystemExit(json.dumps({**res, "timeout": expr}))


def text(sel):
    return driver.execute_script(f"const e = document.querySelector('.bc-player {sel}'); return e ? e.textContent : ''")


def block():
    m = __import__("re").search(r"block (\d+)", text(".bc-cascade"))
    return int(m.group(1)) if m else -1


try:
    driver.get(url)
    wait("window.app && app.graph && Object.keys(LiteGraph.registered_node_types).length > 0")
    time.sleep(2)
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # a first-run dialog
    driver.execute_script("app.loadApiJson(arguments[0], 'endless.json')", wf)
    reply = driver.execute_async_script(
        "const [wf, done] = arguments; fetch('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({prompt: wf, client_id: app.api.clientId})}).then(r => r.json()).then(done);", wf)
    res["prompt_id"] = reply.get("prompt_id")
    wait("/block [3-9]|block \\d\\d/.test(document.querySelector('.bc-player .bc-cascade').textContent)")
    box = driver.find_element(By.CSS_SELECTOR, ".bc-player .bc-steer-text")
    box.click()
    box.send_keys("a red fox running through snow" + Keys.ENTER)
    res["typed_at_block"] = block()
    wait("document.querySelectorAll('.bc-player .bc-tick').length > 0")
    res["switches"] = text(".bc-switches")
    res["tick"] = driver.execute_script("return document.querySelector('.bc-player .bc-tick').title")
    landed = int(__import__("re").search(r"block (\d+)", res["switches"]).group(1))
    wait(f"(() => {{ const m = /block (\\d+)/.exec(document.querySelector('.bc-player .bc-cascade').textContent);"
         f" return m && Number(m[1]) >= {landed + 2}; }})()")  # frames go on after the switch
    res["block_before_cancel"] = block()
    cancel = driver.execute_script(
        "return [...document.querySelectorAll('button')].find(b => /cancel|interrupt/i.test("
        "(b.getAttribute('aria-label') || '') + ' ' + (b.title || '')))")
    res["cancel_button"] = cancel.get_attribute("aria-label") or cancel.get_attribute("title")
    cancel.click()
    wait("/Stopped/.test(document.querySelector('.bc-player .bc-status').textContent)"
         " && document.querySelector('.bc-player .bc-video[href]')")
    res["status"], res["stats"] = text(".bc-status"), text(".bc-stats")
    res["video_link"] = driver.execute_script("return document.querySelector('.bc-player .bc-video').href")
    time.sleep(1)
    driver.save_screenshot(shot)
    print(json.dumps(res))
finally:
    driver.quit()
'''


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    yield from started_host(tmp_path_factory, {"stand_in_clip.py": STAND_IN_CLIP})


def test_an_endless_run_is_steered_and_cancelled_in_the_real_frontend(host, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON") or "python3"
    has = subprocess.run([python, "-c", "import selenium"], capture_output=True).returncode == 0
    if not (has and shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("the host's Python has no selenium, or Chromium or chromedriver is missing")
    wf = workflow(seed=random.randrange(1 << 30), blocks=0, width=128, height=64)
    for n in ("3", "4", "5", "9", "10", "11", "12", "13", "14", "15"):
        del wf[n]
    wf["6"]["inputs"].update(parallel=1, attention="causal", window=6, sink=3)
    wf["20"] = {"class_type": "StandInCLIP", "inputs": {}}
    wf["8"]["inputs"].pop("schedule")
    wf["8"]["inputs"].update(positive=["2", 0], clip=["20", 0])
    wf["16"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 1]}}
    assert wf["2"]["inputs"]["embeds"] == EMBEDS[0]
    wf_path, shot = tmp_path / "endless.json", tmp_path / "endless.png"
    wf_path.write_text(json.dumps(wf))
    run = subprocess.run([python, "-c", DRIVE_PAGE, host.url, str(wf_path), str(shot)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    if os.environ.get("BLOCK_CASCADE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["BLOCK_CASCADE_KEEP_SCREENSHOT"])
    landed = int(re.search(r"block (\d+)", res["switches"]).group(1))
    assert res["tick"] == f"block {landed}: a red fox running through snow" and landed > res["typed_at_block"] - 1
    assert res["block_before_cancel"] >= landed + 2 and res["status"].startswith("Stopped by Cancel")
    history = host.history(res["prompt_id"])
    assert history["status"]["status_str"] == "success" and "16" in history["outputs"]  # the graph went on
    (video,) = history["outputs"]["8"]["images"]
    assert res["video_link"].endswith(f"filename={video['filename']}&subfolder={video['subfolder']}&type=output")
    import av

    with av.open(os.path.join(host.base, "output", video["subfolder"], video["filename"])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert res["stats"].startswith(f"{frames} frames"), (frames, res["stats"])
