"""The pack inside a real ComfyUI (CPU): skipped unless COMFYUI_DIR points at a ComfyUI checkout.

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/venv/bin/python python -m pytest -q tests/host/test_comfy_host.py

It starts ComfyUI (``main.py --cpu``) on a free local port with a throwaway base directory whose
custom_nodes/ holds a link to this pack and whose models/ holds tiny test models written by
scripts/make_tiny_models.py (a 128-wide DiT, a complete full-width random Wan2.1 VAE, two prompt
embeddings), then checks over HTTP and the websocket:
- the pack imports without error and /object_info lists every node with its inputs;
- a bad input is refused by /prompt (HTTP 400) with the allowed range in the message;
- an API workflow runs to execution_success: embeddings file -> prompt schedule -> sampler with the
  core VAELoader's VAE -> CreateVideo -> SaveVideo, core VAEDecode of the sampler's LATENT, and a
  second sampler on a core MODEL (UNETLoader -> Causal Model from MODEL); the websocket carries
  block_cascade.start/state/frames/done for both samplers and a progress bar per block;
- the shipped family workflows and the context ones (image to video through core LoadImage of a small
  PNG put in the input folder; a video continued by a second sampler) run to execution_success;
- GET /block_cascade/stream/{node}.mjpeg answers 404 for a node not running and streams a running
  sampler's JPEGs (those of its frames events) until the run ends;
- POST /interrupt mid-run keeps what was made (the MP4 of the final blocks) and the same prompt runs again.
COMFYUI_PYTHON defaults to the interpreter running the tests; the host needs the pack's requirements.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from oracles import mjpeg_parts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host")

OUR_NODES = {
    "BlockCascadeModelLoader": {"model_name", "dtype", "ema", "lora", "lora_strength", "weight_dtype"},
    "BlockCascadeFromModel": {"model"},
    "BlockCascadeConfig": {"parallel", "attention", "window", "sink", "steps", "shift", "devices",
                           "attention_backend", "flashblock", "family", "frames_per_block", "independent_first_frame",
                           "first_block_steps", "warp", "context_noise", "kv_recompute", "compile", "kv_dtype",
                           "swap_blocks"},
    "BlockCascadePromptSchedule": {"conditioning", "start_block", "previous", "switch_mode", "blend_blocks"},
    "BlockCascadeEmbedsLoader": {"embeds"},
    "BlockCascadeDecoderLoader": {"decoder_name", "dtype"},
    "BlockCascadeSampler": {"model", "config", "width", "height", "blocks", "seed", "positive", "schedule", "vae",
                            "start_image", "prefix", "context_frames", "clip", "decoder", "preview_decoder"},
}
DIT = "block_cascade_tiny_dit.safetensors"
EMBEDS = ("block_cascade_tiny_a.safetensors", "block_cascade_tiny_b.safetensors")
VAE = "block_cascade_tiny_vae.safetensors"


# ---- a small websocket client (stdlib only) ---------------------------------------------------------
class WebSocket:
    def __init__(self, host: str, port: int, path: str, timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                                         else bytes([0x80 | 126]) + struct.pack(">H", len(payload)))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self, timeout: float):
        """(opcode, payload) of the next whole message (1 text, 2 binary); raises socket.timeout."""
        self.sock.settimeout(timeout)
        parts, first_op = [], None
        while True:
            b0, b1 = self._exact(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            data = self._exact(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if op == 9:
                self._send(10, data)
                continue
            if op == 8:
                raise ConnectionError("websocket closed by the server")
            if op in (1, 2):
                first_op = op
            if op == 10:
                continue
            parts.append(data)
            if b0 & 0x80:
                return first_op, b"".join(parts)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---- the host ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    def __init__(self, base: str):
        self.base, self.port = base, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "comfyui.log")
        python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", base, "--disable-auto-launch"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None):
        req = urllib.request.Request(self.url + path, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return r.status, (json.loads(text) if text.strip() else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, workflow: dict, timeout: float = 300, on_message=None):
        """Queue through a fresh websocket client; -> (final message type, [messages of this prompt])."""
        client = uuid.uuid4().hex
        ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={client}")
        try:
            status, reply = self.post("/prompt", {"prompt": workflow, "client_id": client})
            assert status == 200, reply
            pid, msgs = reply["prompt_id"], []
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    op, data = ws.recv(max(0.1, deadline - time.time()))
                except socket.timeout:
                    break
                if op != 1:
                    continue
                msg = json.loads(data)
                msgs.append(msg)
                if on_message is not None:
                    on_message(msg)
                d = msg.get("data") or {}
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                        and d.get("prompt_id") == pid:
                    return msg["type"], msgs, pid
            return "timeout", msgs, pid
        finally:
            ws.close()

    def history(self, prompt_id: str, timeout: float = 30) -> dict:
        """/history of a prompt (written just after execution_success is sent, so poll for it)."""
        deadline = time.time() + timeout
        while True:
            found = self.get(f"/history/{prompt_id}")
            if prompt_id in found or time.time() > deadline:
                return found[prompt_id]
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    yield from started_host(tmp_path_factory)


def started_host(tmp_path_factory, extra_nodes: dict[str, str] | None = None):
    """A Host on a new base folder: this pack and ``extra_nodes`` ({file name: Python source}, test-only
    custom nodes) in custom_nodes/, tiny models in models/; stopped when the generator closes."""
    base = str(tmp_path_factory.mktemp("comfy-base"))
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "block_cascade"))
    for name, source in (extra_nodes or {}).items():
        with open(os.path.join(base, "custom_nodes", name), "w") as f:
            f.write(source)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_models.py"),
                          os.path.join(base, "models"), "--vae", "full"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    h = Host(base)
    try:
        yield h
    finally:
        h.stop()
        if os.environ.get("BLOCK_CASCADE_KEEP_HOST_LOG"):
            shutil.copy(h.log_path, os.environ["BLOCK_CASCADE_KEEP_HOST_LOG"])


def workflow(seed: int, blocks: int = 2, width: int = 32, height: int = 32) -> dict:
    def link(node, slot=0):
        return [str(node), slot]

    return {
        "1": {"class_type": "BlockCascadeModelLoader", "inputs": {"model_name": DIT, "dtype": "fp32", "ema": "auto",
                                                                  "lora": "none", "lora_strength": 1.0}},
        "2": {"class_type": "BlockCascadeEmbedsLoader", "inputs": {"embeds": EMBEDS[0]}},
        "3": {"class_type": "BlockCascadeEmbedsLoader", "inputs": {"embeds": EMBEDS[1]}},
        "4": {"class_type": "BlockCascadePromptSchedule", "inputs": {"conditioning": link(2), "start_block": 0}},
        "5": {"class_type": "BlockCascadePromptSchedule", "inputs": {"conditioning": link(3), "start_block": 1,
                                                                     "previous": link(4)}},
        "6": {"class_type": "BlockCascadeConfig", "inputs": {
            "parallel": 3, "attention": "bidirectional", "window": 0, "sink": 0, "steps": "1000,750,500,250",
            "shift": 5.0, "devices": "auto", "attention_backend": "auto", "flashblock": False}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "8": {"class_type": "BlockCascadeSampler", "inputs": {
            "model": link(1), "config": link(6), "schedule": link(5), "vae": link(7), "width": width,
            "height": height, "blocks": blocks, "seed": seed}},
        "9": {"class_type": "CreateVideo", "inputs": {"images": link(8, 1), "fps": 16.0}},
        "10": {"class_type": "SaveVideo", "inputs": {"video": link(9), "filename_prefix": "block_cascade_test/tiny",
                                                     "format": "auto", "codec": "auto"}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": link(8, 0), "vae": link(7)}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": link(11)}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": link(8, 1)}},
        "13": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT, "weight_dtype": "default"}},
        "14": {"class_type": "BlockCascadeFromModel", "inputs": {"model": link(13)}},
        "15": {"class_type": "BlockCascadeSampler", "inputs": {
            "model": link(14), "config": link(6), "positive": link(2), "width": width, "height": height,
            "blocks": 2, "seed": seed}},
    }


def events(msgs, name, node=None):
    return [m["data"] for m in msgs if m["type"] == "block_cascade." + name
            and (node is None or m["data"]["node"] == node)]


def test_pack_imports_and_object_info_lists_every_node(host):
    log = host.log_text()
    assert "IMPORT FAILED" not in log, log[-3000:]
    assert "custom_nodes/block_cascade" in log  # listed among the imported custom nodes
    info = host.get("/object_info")
    for node, inputs in OUR_NODES.items():
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]["input"]
        assert set(spec.get("required", {})) | set(spec.get("optional", {})) == inputs
        assert info[node]["category"] == "video/block cascade"
    assert info["BlockCascadeSampler"]["output"] == ["LATENT", "IMAGE"]
    assert DIT in combo_options(info["BlockCascadeModelLoader"]["input"]["required"]["model_name"])
    assert set(EMBEDS) <= set(combo_options(info["BlockCascadeEmbedsLoader"]["input"]["required"]["embeds"]))


def combo_options(spec) -> list:
    """A combo input of /object_info: [[options...], {...}] (V1) or ["COMBO", {"options": [...]}] (V3)."""
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_bad_input_is_refused_once_on_the_input_at_fault(host):
    """What ComfyUI checks itself (a range on one input) is refused at queue time, once, on that
    input; a rule ComfyUI cannot check (a multiple of 16, a limit that depends on another input) is
    refused when the node runs, in one error naming the input and the allowed values, before the
    sampler touches the model (ComfyUI repeats a validate_inputs message for every input the function
    takes, so such rules are not queue-time checks)."""
    wf = workflow(seed=1)
    wf["6"]["inputs"]["parallel"] = 99  # above the schema's maximum
    status, reply = host.post("/prompt", {"prompt": wf, "client_id": "x"})
    assert status == 400
    errors = [e for node in reply["node_errors"].values() for e in node["errors"]]
    assert len(errors) == 1 and errors[0]["extra_info"]["input_name"] == "parallel", errors
    for node, key, value, message in (("8", "width", 830, "width must be a multiple of 16 in 16..4096"),
                                      ("6", "steps", "1000,500", "parallelism must lie in 1..3")):
        wf = workflow(seed=random.randrange(1 << 30))
        wf[node]["inputs"][key] = value
        if key == "steps":
            wf["6"]["inputs"]["parallel"] = 4
        final, msgs, _ = host.run(wf)
        failed = [m["data"] for m in msgs if m["type"] == "execution_error"]
        assert final == "execution_error" and len(failed) == 1, msgs[-3:]
        assert message in failed[0]["exception_message"] and failed[0]["node_id"] == node, failed


def test_workflow_with_tiny_models_runs_to_success_and_streams_frames(host):
    final, msgs, pid = host.run(workflow(seed=random.randrange(1 << 30)))
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    for node, blocks in (("8", 2), ("15", 2)):
        (start,) = events(msgs, "start", node)
        assert start["blocks"] == blocks and start["fps"] == 16 and start["stages"] == 5
        frames = events(msgs, "frames", node)
        assert [f["block"] for f in frames] == list(range(blocks))
        assert sum(len(f["frames"]) for f in frames) == start["frames_total"] == 1 + 4 * (3 * blocks - 1)
        assert base64.b64decode(frames[0]["frames"][0])[:2] == b"\xff\xd8"  # JPEG
        assert events(msgs, "state", node) and "error" not in events(msgs, "done", node)[0]
        progress = [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"]["node"] == node]
        assert progress[-blocks:] == list(range(1, blocks + 1))
    history = host.history(pid)
    saved = history["outputs"]["10"]
    files = [x for v in saved.values() if isinstance(v, list) for x in v if isinstance(x, dict) and "filename" in x]
    assert files and os.path.isfile(os.path.join(host.base, "output", files[0]["subfolder"], files[0]["filename"]))
    import numpy as np

    # core VAEDecode took the sampler's LATENT and gives the frames the sampler streamed (8-bit PNGs)
    core, ours = (preview_frames(host, history["outputs"][n]["images"]) for n in ("12", "16"))
    assert len(core) == len(ours) == 21
    worst = max(float(abs(a - b).max()) for a, b in zip(core, ours))
    assert worst <= 3 / 255, worst
    assert float(np.std(core)) > 0.02 and 0.02 < float(np.mean(core)) < 0.98  # real pictures, not saturated


def test_a_core_fp8_model_keeps_fp8_through_the_pack(host):
    """UNETLoader with weight_dtype fp8_e4m3fn -> Causal Model from MODEL -> the sampler: ComfyUI's fp8 weights
    are the run's (the settings line says the blocks run as fp8_e4m3fn; nothing widened the model); and the
    pack's own loader with the same choice, its fp8 layers loaded by ComfyUI's model management."""
    wf = workflow(seed=3)
    wf["13"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    wf["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    wf = {k: v for k, v in wf.items() if k in ("1", "2", "6", "13", "14", "15")}
    wf["17"] = {"class_type": "BlockCascadeSampler", "inputs": {**wf["15"]["inputs"], "model": ["1", 0]}}
    final, msgs, _ = host.run(wf)
    assert final == "execution_success", [m for m in msgs if m["type"] == "execution_error"] or host.log_text()[-3000:]
    for node in ("15", "17"):
        (start,) = events(msgs, "start", node)
        assert "weights fp8_e4m3fn" in start["settings"], start["settings"]
        assert len(events(msgs, "frames", node)) == 2


def preview_frames(host, images: list) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(os.path.join(host.base, im["type"], im["subfolder"], im["filename"])),
                       dtype=np.float32) / 255 for im in images]


def shipped_with_tiny_models(host, name: str, blocks: int, model_name: str | None) -> dict:
    """A shipped API workflow run on this machine's tiny files: the DiT copied under the released-looking
    ``model_name`` (the loader reads the family off it; None: the workflow's own name kept, for a file the
    caller placed there), prompt texts as tiny embeddings, 32 x 32."""
    with open(os.path.join(ROOT, "workflows", "api", name)) as f:
        wf = json.load(f)
    folder = os.path.join(host.base, "models", "diffusion_models")
    if model_name is not None:
        shutil.copyfile(os.path.join(folder, DIT), os.path.join(folder, model_name))
    texts = 0
    for node in wf.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "CLIPTextEncode":
            node.update(class_type="BlockCascadeEmbedsLoader", inputs={"embeds": EMBEDS[texts % 2]})
            texts += 1
        elif ct == "BlockCascadeModelLoader":
            ins.update(model_name=model_name or ins["model_name"], dtype="fp32", lora="none")
        elif ct == "VAELoader":
            ins["vae_name"] = VAE
        elif ct == "BlockCascadeSampler":
            ins.update(width=32, height=32, blocks=blocks)
    schedules = sorted((n for n in wf.values() if n["class_type"] == "BlockCascadePromptSchedule"),
                       key=lambda n: n["inputs"]["start_block"])
    for i, node in enumerate(schedules):  # inside the short video, in the same order
        node["inputs"]["start_block"] = 2 * i
    wf = {k: v for k, v in wf.items() if v["class_type"] != "CLIPLoader"}
    for node in wf.values():  # a sampler's clip (steering) went with the loader: no umt5-xxl on this machine
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not isinstance(v, list) or v[0] in wf}
    return wf


@pytest.mark.parametrize("name,model_name,settings", [
    ("causal_forcing_framewise.json", "causal_forcing-framewise.safetensors",
     "causal-forcing-framewise: 1 latent frame(s) a block"),
    ("longlive_interactive.json", "longlive_base.safetensors", "window 12 (sink 3); switch recache"),
    # 6 blocks: blocks 2..5 re-encode a frame decoded by the graph's VAE (core VAELoader's state dict)
    ("krea_realtime.json", "krea-realtime-video-14b.safetensors", "KV cache rebuilt every block from 3 context frames"),
])
def test_the_family_workflows_run_to_success(host, name, model_name, settings):
    wf = shipped_with_tiny_models(host, name, 6, model_name)
    final, msgs, _ = host.run(wf)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    (start,) = events(msgs, "start")
    assert settings in start["settings"], start["settings"]


def test_the_two_decoder_workflow_runs_to_success(host):
    """lightvae_live_preview.json on tiny files: Load Video Decoder gives the output decoder (here the Wan2.1 VAE
    file in models/vae) and the live view's (a narrow taew2_1 in models/vae_approx, which core VAELoader cannot
    load); the live view streams every block, the graph saves the video."""
    from cascade_core.video.taew import TinyWanDecoder
    from cascade_core.weights.safe_io import save_safetensors

    save_safetensors(TinyWanDecoder(widths=(8, 8, 8, 8)).state_dict(),
                     os.path.join(host.base, "models", "vae_approx", "block_cascade_tiny_taew2_1.safetensors"))
    wf = shipped_with_tiny_models(host, "lightvae_live_preview.json", 2, "self_forcing_dmd.safetensors")
    (smp,) = [n["inputs"] for n in wf.values() if n["class_type"] == "BlockCascadeSampler"]
    wf[smp["decoder"][0]]["inputs"]["decoder_name"] = VAE
    wf[smp["preview_decoder"][0]]["inputs"]["decoder_name"] = "block_cascade_tiny_taew2_1.safetensors"
    final, msgs, pid = host.run(wf)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    frames = events(msgs, "frames")
    assert [f["block"] for f in frames] == [0, 1] and sum(len(f["frames"]) for f in frames) == 1 + 4 * 5
    assert "error" not in events(msgs, "done")[0]
    saved = host.history(pid)["outputs"]
    assert any(isinstance(v, list) and v for out in saved.values() for v in out.values())


def put_input_image(host, name: str, width: int, height: int) -> str:
    """A small PNG of random colours in the host's input folder (what core LoadImage lists)."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(host.base, "input")
    os.makedirs(folder, exist_ok=True)
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, name))
    return name


@pytest.mark.parametrize("name, leads", [
    ("image_to_video.json", [1]),  # the image's latent frame before the blocks
    ("extend_video.json", [0, 6]),  # the second sampler: the first one's 2 blocks of 3 latent frames
])
def test_the_context_workflows_run_to_success(host, name, leads):
    wf = shipped_with_tiny_models(host, name, 2, "self_forcing_dmd.safetensors")
    for node in wf.values():
        if node["class_type"] == "LoadImage":  # not of the video's size: scaled and centre-cropped
            node["inputs"]["image"] = put_input_image(host, "block_cascade_start.png", 48, 40)
    final, msgs, pid = host.run(wf)
    errors = [m for m in msgs if m["type"] == "execution_error"]
    assert final == "execution_success", errors or host.log_text()[-3000:]
    samplers = sorted((k for k, n in wf.items() if n["class_type"] == "BlockCascadeSampler"), key=int)
    for node, lead in zip(samplers, leads):
        (start,) = events(msgs, "start", node)
        frames = events(msgs, "frames", node)
        assert start["frames_total"] == 1 + 4 * (lead + 6 - 1) == sum(len(f["frames"]) for f in frames)
        assert [f["block"] for f in frames] == ([-1] if lead else []) + [0, 1]
        assert "context:" in start["settings"] if lead else "context:" not in start["settings"]
        assert "error" not in events(msgs, "done", node)[0]
    saved = host.history(pid)["outputs"]
    assert any(isinstance(v, list) and v for out in saved.values() for v in out.values())


def test_the_steer_route_answers_on_the_real_server(host):
    """The pack's POST /block_cascade/steer is served by ComfyUI's own aiohttp app (added at import)."""
    assert host.post("/block_cascade/steer", {"node": "4242", "text": "a fox"}) == \
        (409, {"error": "node 4242 is not running"})
    status, answer = host.post("/block_cascade/steer", {"node": "4242", "text": " "})
    assert status == 400 and "text must be a non-empty string" in answer["error"]


def test_the_mjpeg_stream_plays_a_running_sampler_on_the_real_server(host):
    """The pack's GET /block_cascade/stream/{node}.mjpeg is served by ComfyUI's own aiohttp app: a node that
    is not running gets a one-line 404; a client that connects when the sampler starts reads JPEG parts
    until the run ends."""
    for prefix in ("", "/api"):  # the widget's link goes through ComfyUI's /api mirror of every route
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(host.url + prefix + "/block_cascade/stream/4242.mjpeg", timeout=30)
        assert refused.value.code == 404 and refused.value.read() == b"node 4242 is not running"
    got = {}

    def read(response):
        with response:
            got["body"] = response.read()

    def on_message(msg):  # urlopen returns once the stream's headers came: subscribed before block 0's frames
        if msg["type"] == "block_cascade.start" and "reader" not in got:
            response = urllib.request.urlopen(host.url + f"/block_cascade/stream/{msg['data']['node']}.mjpeg",
                                              timeout=120)
            got["type"] = response.headers["Content-Type"]
            got["reader"] = threading.Thread(target=read, args=(response,))
            got["reader"].start()

    wf = workflow(seed=random.randrange(1 << 30), blocks=4)
    for n in ("9", "10", "11", "12", "13", "14", "15", "16"):
        del wf[n]
    final, msgs, _ = host.run(wf, on_message=on_message)
    assert final == "execution_success", host.log_text()[-3000:]
    got["reader"].join(120)
    assert got["type"] == "multipart/x-mixed-replace; boundary=frame"
    parts, closed = mjpeg_parts(got["body"])
    sent = [base64.b64decode(f) for d in events(msgs, "frames", "8") for f in d["frames"]]
    assert closed and len(parts) >= 2 and parts == sent[len(sent) - len(parts):]
    assert all(p[:2] == b"\xff\xd8" and p[-2:] == b"\xff\xd9" for p in parts)


def test_cancel_keeps_what_was_made_and_the_same_prompt_runs_again(host):
    """POST /interrupt during a run of known length once a block is final: the prompt succeeds, the sampler's UI
    output is the MP4 of the final blocks' frames (whole, in the output folder); queued again unchanged, the
    sampler runs again (its fingerprint changed) instead of answering from ComfyUI's cache."""
    import av

    sent = {}

    def on_message(msg):
        if msg["type"] == "block_cascade.frames" and not sent:
            sent["at"] = msg["data"]["block"]
            host.post("/interrupt", {})

    wf = workflow(seed=random.randrange(1 << 30), blocks=40, width=256, height=256)
    for n in ("11", "12", "13", "14", "15", "16", "9", "10"):
        del wf[n]
    wf["8"]["inputs"].pop("vae")
    wf["6"]["inputs"].update(parallel=1, attention="causal")  # (bidirectional needs blocks in flight to see)
    final, msgs, pid = host.run(wf, on_message=on_message)
    assert sent and final == "execution_success", [m["type"] for m in msgs][-10:]
    done = events(msgs, "done", "8")[0]
    assert done.get("stopped") and "error" not in done and 1 <= done["blocks"] < 40
    assert host.history(pid)["outputs"]["8"]["block_cascade_video"] == [done["video"]]
    path = os.path.join(host.base, "output", done["video"]["subfolder"], done["video"]["filename"])
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == done["frames"] == 1 + 4 * (3 * done["blocks"] - 1)
    final, msgs, _ = host.run(wf)  # the same prompt: run, not cached
    assert final == "execution_success" and events(msgs, "start", "8")
    assert "error" not in events(msgs, "done", "8")[0]


def test_the_live_stream_workflow_streams_until_cancel_and_saves_its_last_window(host):
    sent = {}

    def on_message(msg):
        if msg["type"] == "block_cascade.frames" and msg["data"]["block"] >= 1 and not sent:
            sent["at"] = msg["data"]["block"]
            host.post("/interrupt", {})

    wf = shipped_with_tiny_models(host, "live_stream_endless.json", 0, "longlive_base.safetensors")
    final, msgs, pid = host.run(wf, on_message=on_message)
    assert sent and final == "execution_success", [m["type"] for m in msgs][-10:]
    (start,) = events(msgs, "start")
    assert start["blocks"] == 0 and "window 12 (sink 3)" in start["settings"]
    outputs = host.history(pid)["outputs"]
    sampler = next(k for k, n in wf.items() if n["class_type"] == "BlockCascadeSampler")
    saver = next(k for k, n in wf.items() if n["class_type"] == "SaveVideo")
    assert outputs[sampler]["block_cascade_video"] == [events(msgs, "done")[0]["video"]] and outputs[saver]


def test_an_endless_run_ends_at_cancel_with_its_video_and_the_graph_goes_on(host):
    """blocks 0 (a window set): POST /interrupt ends the stream; the prompt succeeds, the nodes after the
    sampler run on its last window, and the MP4 the done event names is in the output folder, whole."""
    import av

    sent = {}

    def on_message(msg):
        if msg["type"] == "block_cascade.frames" and msg["data"]["block"] >= 2 and not sent:
            sent["at"] = msg["data"]["block"]
            host.post("/interrupt", {})

    wf = workflow(seed=random.randrange(1 << 30), blocks=0)
    for n in ("13", "14", "15", "9", "10"):
        del wf[n]
    wf["6"]["inputs"].update(parallel=1, attention="causal", window=6, sink=3)
    wf["5"]["inputs"]["start_block"] = 4
    final, msgs, pid = host.run(wf, on_message=on_message)
    assert sent and final == "execution_success", [m["type"] for m in msgs][-10:]
    done = events(msgs, "done", "8")[0]
    assert done.get("stopped") and "error" not in done
    outputs = host.history(pid)["outputs"]
    assert outputs["8"]["block_cascade_video"] == [done["video"]]  # the UI output: the recording
    assert {"12", "16"} <= set(outputs)  # the nodes after it ran (the last window decoded, its frames)
    path = os.path.join(host.base, "output", done["video"]["subfolder"], done["video"]["filename"])
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == done["frames"] == 1 + 4 * (3 * done["blocks"] - 1)


POOL_WEIGHTS_SCRIPT = """
import importlib.util, os, sys
import torch
comfy_dir, root = sys.argv[1], sys.argv[2]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, comfy_dir)
os.chdir(comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
from comfy.model_patcher import ModelPatcher
spec = importlib.util.spec_from_file_location("custom_nodes_pack", os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["custom_nodes_pack"] = pack
spec.loader.exec_module(pack)
from custom_nodes_pack.nodes.values import CoreModel
from cascade_core.model.dit import WanConfig, WanModel

class Holder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.diffusion_model = m

inner = WanModel.random(WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=4096), seed=0)
base = inner.head.head.bias.detach().clone()
core = ModelPatcher(Holder(inner), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
loras = []
for strength in (0.5, 0.25):
    p = core.clone()
    p.add_patches({"diffusion_model.head.head.bias": (torch.full_like(base, strength),)}, 1.0)
    loras.append((CoreModel(p), strength))
first = [m.acquire_for_pool() for m, _ in loras]
again = [m.acquire_for_pool() for m, _ in loras]  # A, B, then A and B again
ok = all(a is b for a, b in zip(first, again))
ok &= all(torch.allclose(w.head.head.bias, base + s) for w, (_, s) in zip(again, loras))
print("POOL-WEIGHTS", "ok" if ok else "wrong")
"""


def test_pool_weights_of_a_core_model_carry_comfys_patches():
    """Causal Model from MODEL on several devices, with ComfyUI's own ModelPatcher: acquire_for_pool
    has ComfyUI apply the patches (a LoRA-style weight diff) on the CPU, keeps the same WanModel while
    the patches are the same (no new upload), and alternating two LoRAs gives each one's weights."""
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    r = subprocess.run([python, "-c", POOL_WEIGHTS_SCRIPT, COMFYUI_DIR, ROOT], capture_output=True, text=True,
                       timeout=300)
    assert "POOL-WEIGHTS ok" in r.stdout, (r.stdout + r.stderr)[-3000:]
