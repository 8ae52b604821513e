"""cascade_core.client.headless against a tiny fake ComfyUI (loopback only): /prompt, /ws, /history, /view.

The fake speaks just enough of ComfyUI's protocol: a websocket handshake at /ws?clientId=..., JSON
text messages {"type", "data"} (plus one binary preview frame the client must skip), HTTP 400 with
error/node_errors for a rejected prompt, and history entries whose outputs list files for /view.
"""
import base64
import hashlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("websocket")  # websocket-client, the client's one dependency

from cascade_core.client import headless as client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PID = "prompt-1"
FAKE_JPEGS = [b"\xff\xd8\xff\xe0" + bytes([i]) * 20 + b"\xff\xd9" for i in range(6)]
OUTPUT_BYTES = b"\x89PNG\r\n\x1a\nfake final output"

WORKFLOW = {
    "3": {"class_type": "BlockCascadeSampler", "inputs": {"seed": 1, "steps": 4, "prompt": "a dog"},
          "_meta": {"title": "Cascade.Sampler"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bc"}, "_meta": {"title": "Save"}},
    "10": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}, "_meta": {"title": "Save"}},
}


def ws_frame(payload, opcode=0x1):
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


class FakeComfy:
    """State of the fake server; a test sets `on_prompt(body) -> (http status, json, [ws messages])`."""

    def __init__(self):
        self.sockets, self.prompts, self.stop = {}, [], threading.Event()
        self.on_prompt = None
        self.history = {}
        self.files = {("bc_00001_.png", "", "output"): OUTPUT_BYTES, ("bc_00002_.png", "", "output"): OUTPUT_BYTES[::-1]}
        self.object_info = {  # the two keys the client reads, as ComfyUI's /object_info/<class> gives them
            "BlockCascadeSampler": {"output_node": True, "output": ["LATENT", "IMAGE"]},
            "SaveImage": {"output_node": True, "output": []},
        }
        self.posts = []  # (path, body) of every POST other than /prompt
        self.on_steer = lambda body: (200, {"queued": True})  # (http status, json) for /block_cascade/steer

    def push(self, client_id, messages):
        conn = self.sockets[client_id]
        for m in messages:
            time.sleep(0.01)
            if callable(m):  # a step of the run that waits for the client (e.g. its steer requests)
                m()
                continue
            try:
                conn.sendall(ws_frame(m, 0x2) if isinstance(m, bytes) else ws_frame(json.dumps(m).encode()))
            except OSError:
                return  # the client stopped listening (it is done, or failed as the test wants)


class Handler(BaseHTTPRequestHandler):
    fake: FakeComfy = None

    def log_message(self, *a):
        pass

    def reply(self, status, body, ctype="application/json"):
        data = json.dumps(body).encode() if ctype == "application/json" else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if url.path == "/ws":
            return self.websocket(q.get("clientId", ""))
        if url.path.startswith("/history/"):
            pid = urllib.parse.unquote(url.path[len("/history/"):])
            return self.reply(200, {pid: self.fake.history[pid]} if pid in self.fake.history else {})
        if url.path.startswith("/object_info/"):
            cls = urllib.parse.unquote(url.path[len("/object_info/"):])
            return self.reply(200, {cls: self.fake.object_info[cls]} if cls in self.fake.object_info else {})
        if url.path == "/view":
            data = self.fake.files.get((q.get("filename"), q.get("subfolder", ""), q.get("type", "output")))
            return self.reply(200, data, "image/png") if data else self.reply(404, {})
        self.reply(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path in ("/queue", "/interrupt"):
            self.fake.posts.append((self.path, body))
            return self.reply(200, {})
        if self.path == "/block_cascade/steer":
            self.fake.posts.append((self.path, body))
            return self.reply(*self.fake.on_steer(body))
        if self.path != "/prompt":
            return self.reply(404, {})
        self.fake.prompts.append(body)
        status, answer, messages = self.fake.on_prompt(body)
        self.reply(status, answer)
        if messages:
            threading.Thread(target=self.fake.push, args=(body["client_id"], messages), daemon=True).start()

    def websocket(self, client_id):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        conn = self.connection
        self.fake.sockets[client_id] = conn  # before the handshake answer: the client queues right after it
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        self.wfile.flush()
        conn.sendall(ws_frame(json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                                     "sid": client_id}}).encode()))
        conn.settimeout(0.2)
        while not self.fake.stop.is_set():  # read client frames until it closes; answer its close frame
            try:
                head = conn.recv(2)
            except socket.timeout:
                continue
            except OSError:
                break
            if len(head) < 2 or head[0] & 0x0F == 0x8:
                try:
                    conn.sendall(ws_frame(b"", 0x8))
                except OSError:
                    pass
                break
            n = head[1] & 0x7F
            n = struct.unpack(">H", conn.recv(2))[0] if n == 126 else struct.unpack(">Q", conn.recv(8))[0] if n == 127 else n
            conn.recv(4 + n)  # mask + payload (small control/text frames only)
        self.close_connection = True


@pytest.fixture
def fake():
    state = FakeComfy()
    handler = type("BoundHandler", (Handler,), {"fake": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.address = f"127.0.0.1:{server.server_address[1]}"
    yield state
    state.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(WORKFLOW))
    return str(path)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def run_client(fake, workflow, *extra, timeout="20"):
    return client.main([workflow, "--server", fake.address, "--timeout", timeout, *extra])


def summary(capsys):
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), err


def history_entry(*text_nodes, saves=("9", "10")):
    """A /history entry: each SaveImage node in ``saves`` shows one file, each of ``text_nodes`` a text."""
    outputs = {nid: {"images": [{"filename": f"bc_{i:05d}_.png", "subfolder": "", "type": "output"}]}
               for i, nid in enumerate(saves, 1)}
    outputs.update({nid: {"text": ["not a file"]} for nid in text_nodes})
    return {"outputs": outputs, "status": {"status_str": "success", "completed": True, "messages": []}}


def success_messages():
    b64 = [base64.b64encode(j).decode() for j in FAKE_JPEGS]
    start = {"node": "3", "run": "r1", "blocks": 2, "frames_total": 6, "fps": 16, "width": 8, "height": 8,
             "stages": 5, "parallel": 2}
    return [
        {"type": "execution_start", "data": {"prompt_id": PID}},
        {"type": "executing", "data": {"node": "3", "prompt_id": PID}},
        {"type": "block_cascade.start", "data": start},
        {"type": "progress", "data": {"value": 1, "max": 3, "prompt_id": PID, "node": "3"}},
        {"type": "block_cascade.frames", "data": {"node": "3", "run": "r1", "block": 0, "first_frame": 0, "frames": b64[:3], "elapsed": 0.2}},
        b"\x00\x00\x00\x01binary preview",
        {"type": "progress", "data": {"value": 9, "max": 9, "prompt_id": "someone-else", "node": "5"}},
        {"type": "progress", "data": {"value": 2, "max": 3, "prompt_id": PID, "node": "3"}},
        {"type": "block_cascade.frames", "data": {"node": "3", "run": "r1", "block": 1, "first_frame": 3, "frames": b64[3:], "elapsed": 0.4}},
        {"type": "progress", "data": {"value": 3, "max": 3, "prompt_id": PID, "node": "3"}},
        {"type": "block_cascade.done", "data": {"node": "3", "run": "r1", "seconds": 0.5, "frames": 6}},
        {"type": "execution_error", "data": {"prompt_id": "someone-else", "node_id": "1", "exception_message": "not ours"}},
        {"type": "executed", "data": {"node": "9", "prompt_id": PID, "output": {}}},
        {"type": "execution_success", "data": {"prompt_id": PID}},
        {"type": "executing", "data": {"node": None, "prompt_id": PID}},
    ]


def test_success_saves_stream_and_outputs(fake, workflow, tmp_path, capsys):
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, success_messages())
    fake.history[PID] = history_entry("3")
    out = tmp_path / "out"
    rc = run_client(fake, workflow, "--out", str(out), "--set", "Cascade.Sampler.seed=42", "--set", "3.prompt=a cat")
    result, err = summary(capsys)
    assert rc == 0, err
    body = fake.prompts[0]
    assert body["prompt"]["3"]["inputs"]["seed"] == 42 and body["prompt"]["3"]["inputs"]["prompt"] == "a cat"
    assert body["client_id"] in fake.sockets, "the websocket was opened with the same clientId"
    assert result["status"] == "success" and result["prompt_id"] == PID and result["stream_frames"] == 6
    frames = sorted(os.listdir(out / "stream"))
    assert frames == [f"3_{i:05d}.jpg" for i in range(6)]
    assert [(out / "stream" / f).read_bytes() for f in frames] == FAKE_JPEGS
    assert result["outputs"] == [str(out / "bc_00001_.png"), str(out / "bc_00002_.png")]
    assert (out / "bc_00001_.png").read_bytes() == OUTPUT_BYTES
    assert (out / "bc_00002_.png").read_bytes() == OUTPUT_BYTES[::-1]
    assert "3/3" in err and "[" in err  # the progress bar
    assert "not ours" not in err


def test_a_prompt_answered_from_the_cache_says_so(fake, workflow, tmp_path, capsys):
    """ComfyUI answers a repeated prompt from its cache: no node runs, nothing streams; the summary
    names the cached nodes instead of passing a 0.02 s 'success' off as a run."""
    cached = [{"type": "execution_start", "data": {"prompt_id": PID}},
              {"type": "execution_cached", "data": {"nodes": ["3", "9", "10"], "prompt_id": PID}},
              {"type": "execution_success", "data": {"prompt_id": PID}}]
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, cached)
    fake.history[PID] = history_entry("3")
    assert run_client(fake, workflow, "--out", str(tmp_path / "out")) == 0
    result, _ = summary(capsys)
    assert result["status"] == "success" and result["stream_frames"] == 0
    assert result["cached_nodes"] == ["3", "9", "10"]


def test_default_out_dir_is_per_prompt(fake, workflow, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, success_messages())
    fake.history[PID] = history_entry()
    assert run_client(fake, workflow) == 0
    result, _ = summary(capsys)
    assert result["out"] == os.path.join("out", PID)
    assert len(os.listdir(tmp_path / "out" / PID / "stream")) == 6


def test_rejected_prompt_exits_2_with_the_servers_message(fake, workflow):
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
             "details": "", "extra_info": {}}
    node_errors = {"3": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1",
                                     "details": "steps", "extra_info": {}}],
                         "dependent_outputs": ["9"], "class_type": "BlockCascadeSampler"}}
    fake.on_prompt = lambda body: (400, {"error": error, "node_errors": node_errors}, [])
    r = subprocess.run([sys.executable, "-m", "cascade_core.client.headless", workflow, "--server", fake.address,
                        "--set", "3.steps=0", "--timeout", "20"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Prompt outputs failed validation" in r.stderr
    assert "node 3 (BlockCascadeSampler): Value 0 smaller than min of 1: steps" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "rejected"
    assert fake.prompts[0]["prompt"]["3"]["inputs"]["steps"] == 0


@pytest.mark.parametrize("kind", ["execution_error", "execution_interrupted"])
def test_failed_execution_exits_1(fake, workflow, capsys, kind):
    data = {"prompt_id": PID, "node_id": "3", "node_type": "BlockCascadeSampler", "executed": []}
    if kind == "execution_error":
        data.update(exception_type="torch.OutOfMemoryError", exception_message="CUDA out of memory.\nTry fewer blocks.",
                    traceback=["..."], current_inputs={}, current_outputs=[])
    msgs = [{"type": "execution_start", "data": {"prompt_id": PID}},
            {"type": "progress", "data": {"value": 1, "max": 4, "prompt_id": PID, "node": "3"}},
            {"type": kind, "data": data}]
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, msgs)
    rc = run_client(fake, workflow)
    result, err = summary(capsys)
    assert rc == 1
    if kind == "execution_error":
        assert "execution error in node 3 (BlockCascadeSampler): torch.OutOfMemoryError: CUDA out of memory." in err
        assert result["status"] == "error"
    else:
        assert "interrupted in node 3" in err and result["status"] == "interrupted"


def test_timeout_exits_3(fake, workflow, capsys):
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, [])
    t = time.monotonic()
    assert run_client(fake, workflow, timeout="1") == 3
    assert time.monotonic() - t < 10
    result, err = summary(capsys)
    assert result["status"] == "timeout" and "timed out" in err


def test_unreachable_server_exits_1(workflow, capsys):
    assert client.main([workflow, "--server", f"127.0.0.1:{closed_port()}", "--timeout", "5"]) == 1
    assert "cannot reach ComfyUI" in capsys.readouterr().err


def test_set_override_parsing():
    assert client.parse_value("42") == 42
    assert client.parse_value("0.5") == 0.5
    assert client.parse_value("true") is True
    assert client.parse_value("null") is None
    assert client.parse_value("[1, 2]") == [1, 2]
    assert client.parse_value('"42"') == "42"
    assert client.parse_value("a cat, 4k") == "a cat, 4k"
    assert client.parse_value("") == ""

    p = json.loads(json.dumps(WORKFLOW))
    assert client.apply_override(p, "3.seed=7") == ("3", "seed", 7)
    assert client.apply_override(p, "Cascade.Sampler.steps=2") == ("3", "steps", 2)  # a title with a dot
    assert client.apply_override(p, "3.prompt=x=y") == ("3", "prompt", "x=y")  # only the first '=' splits
    assert client.apply_override(p, "3.new_input={\"a\": 1}") == ("3", "new_input", {"a": 1})
    assert p["3"]["inputs"] == {"seed": 7, "steps": 2, "prompt": "x=y", "new_input": {"a": 1}}
    for bad, words in [("nope.seed=1", "no node"), ("Save.filename_prefix=x", "several nodes"),
                       ("3seed=1", "NODE.INPUT=VALUE"), ("3.seed", "NODE.INPUT=VALUE"), (".seed=1", "NODE.INPUT")]:
        with pytest.raises(client.ClientError, match=words) as e:
            client.apply_override(p, bad)
        assert e.value.code == 2


@pytest.mark.parametrize("text, sets, words", [
    (None, [], "no such workflow file"),
    ("{\"3\": {\"class_type\": ", [], "not JSON"),
    (json.dumps({"nodes": [], "links": []}), [], "not an API-format workflow"),
    (json.dumps({"3": 5}), ["3.seed=1"], "entry '3' is not a node"),
    (json.dumps({"3": {"inputs": {}}}), [], "entry '3' is not a node"),
    (json.dumps({"3": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 1]}}}), [],
     "node 3 (VAEDecode) input 'samples' is linked to node 9, which the workflow does not hold"),
    (json.dumps(WORKFLOW), ["3.seed"], "expected NODE.INPUT=VALUE"),
    (json.dumps(WORKFLOW), ["Save.filename_prefix=x"], "several nodes"),
])
def test_bad_workflow_or_set_is_one_line_exit_2(tmp_path, capsys, text, sets, words):
    path = tmp_path / "wf.json"
    if text is not None:
        path.write_text(text)
    extra = [a for s in sets for a in ("--set", s)]
    rc = client.main([str(path), "--server", f"127.0.0.1:{closed_port()}", "--timeout", "5", *extra])
    result, err = summary(capsys)
    assert rc == 2, err
    assert err.strip().count("\n") == 0 and words in err, err  # one line, and no attempt to reach the server
    assert result["status"] == "usage" and words in result["error"]
    if not sets:
        assert str(path) in err


def custom_failure(inputs, reason):
    """ComfyUI's node errors for a validate_inputs that returned ``reason``: one copy per input it takes."""
    return [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
             "details": f"{name} - {reason}", "extra_info": {"input_name": name}} for name in inputs]


def test_rejection_prints_each_distinct_reason_once(fake, workflow, capsys):
    reason = "width must be a multiple of 16 in 16..4096 (e.g. 832 x 480), got 100"
    missing = {"type": "required_input_missing", "message": "Required input is missing", "details": "model",
               "extra_info": {"input_name": "model"}}
    errors = custom_failure(["width", "height", "blocks"], reason) + [missing]
    node_errors = {"3": {"errors": errors, "dependent_outputs": ["3", "9", "10"], "class_type": "BlockCascadeSampler"}}
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
             "details": "\n".join(f"{e['message']}: {e['details']}" for e in errors), "extra_info": {}}
    fake.on_prompt = lambda body: (400, {"error": error, "node_errors": node_errors}, [])
    rc = run_client(fake, workflow)
    result, err = summary(capsys)
    assert rc == 2
    want = [f"node 3 (BlockCascadeSampler): Custom validation failed for node: {reason}",
            "node 3 (BlockCascadeSampler): Required input is missing: model"]
    assert err.splitlines() == ["Prompt outputs failed validation", *want]
    assert result == {"status": "rejected", "error": "Prompt outputs failed validation", "reasons": want}


def partial_answer():
    """ComfyUI's answer when it queues the prompt but drops output node 10 (no filename_prefix)."""
    missing = {"type": "required_input_missing", "message": "Required input is missing", "details": "filename_prefix",
               "extra_info": {"input_name": "filename_prefix"}}
    return {"prompt_id": PID, "number": 0,
            "node_errors": {"10": {"errors": [missing], "dependent_outputs": ["10"], "class_type": "SaveImage"}}}


def test_partial_graph_is_withdrawn_and_exits_2(fake, workflow, capsys):
    fake.on_prompt = lambda body: (200, partial_answer(), success_messages())
    fake.history[PID] = history_entry(saves=("9",))
    rc = run_client(fake, workflow)
    result, err = summary(capsys)
    reason = "node 10 (SaveImage): Required input is missing: filename_prefix"
    assert rc == 2, err
    assert result["status"] == "partial" and result["reasons"] == [reason] and result["dropped_outputs"] == ["10"]
    assert err.count(reason) == 1 and "--allow-partial" in err and f"prompt {PID} withdrawn" in err
    assert fake.posts == [("/queue", {"delete": [PID]}), ("/interrupt", {"prompt_id": PID})]


def test_allow_partial_runs_the_rest(fake, workflow, tmp_path, capsys):
    fake.on_prompt = lambda body: (200, partial_answer(), success_messages())
    fake.history[PID] = history_entry(saves=("9",))
    rc = run_client(fake, workflow, "--allow-partial", "--out", str(tmp_path / "out"))
    result, err = summary(capsys)
    assert rc == 0, err
    assert result["status"] == "partial" and result["dropped_outputs"] == ["10"]
    assert result["reasons"] == ["node 10 (SaveImage): Required input is missing: filename_prefix"]
    assert result["outputs"] == [str(tmp_path / "out" / "bc_00001_.png")] and fake.posts == []


def test_output_node_without_output_is_incomplete(fake, workflow, tmp_path, capsys):
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, success_messages())
    fake.history[PID] = history_entry("3", saves=("9",))  # SaveImage 10 shows nothing
    rc = run_client(fake, workflow, "--out", str(tmp_path / "out"))
    result, err = summary(capsys)
    assert rc == 1, err
    assert result["status"] == "incomplete" and "node 10 (SaveImage) produced no output" in result["error"]
    assert "node 9" not in result["error"] and "node 3" not in result["error"]
    assert result["outputs"] == [str(tmp_path / "out" / "bc_00001_.png")]  # what did come is still saved


def test_history_written_after_success_is_waited_for(fake, workflow, tmp_path, capsys):
    def on_prompt(body):  # ComfyUI stores the history entry only after it has sent execution_success
        threading.Timer(1.0, fake.history.__setitem__, (PID, history_entry())).start()
        return 200, {"prompt_id": PID, "number": 0, "node_errors": {}}, success_messages()
    fake.on_prompt = on_prompt
    rc = run_client(fake, workflow, "--out", str(tmp_path / "out"))
    result, err = summary(capsys)
    assert rc == 0, err
    assert result["outputs"] == [str(tmp_path / "out" / f"bc_{i:05d}_.png") for i in (1, 2)]


# ---- --steer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blend", [0, 2])
def test_steer_posts_stdin_lines_while_the_sampler_runs_and_prints_the_switches(fake, workflow, tmp_path, capsys,
                                                                                  monkeypatch, blend):
    """--steer-blend N: lines without their own ~N blend over N blocks (the route's blend_blocks)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("now: a cat\n\n7:a dog\nnonsense\n1~3:a bird\n"))
    fake.on_steer = lambda body: ((400, {"error": "block 7 is beyond the video (blocks 0..1)"})
                                  if body.get("block") == 7 else (200, {"queued": True}))

    def steer_answered():  # the sampler goes on once the client's requests are in
        end = time.monotonic() + 10
        while len([p for p, _ in fake.posts if p == "/block_cascade/steer"]) < 3 and time.monotonic() < end:
            time.sleep(0.01)

    switches = [steer_answered,
                {"type": "block_cascade.switch", "data": {"node": "3", "run": "r1", "block": 1, "text": "a cat"}},
                {"type": "block_cascade.switch", "data": {"node": "3", "run": "r1", "block": None, "text": "a bird",
                                                          "dropped": "every block has entered the cascade"}}]
    messages = success_messages()
    at = next(i for i, m in enumerate(messages) if isinstance(m, dict) and m["type"] == "block_cascade.start") + 1
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}},
                                   messages[:at] + switches + messages[at:])
    fake.history[PID] = history_entry("3")
    rc = run_client(fake, workflow, "--steer", "--out", str(tmp_path / "out"), *(["--steer-blend", "2"] if blend else []))
    result, err = summary(capsys)
    assert rc == 0, err
    given = {"blend_blocks": blend} if blend else {}
    assert [b for p, b in fake.posts if p == "/block_cascade/steer"] == [
        {"node": "3", "text": "a cat", **given}, {"node": "3", "text": "a dog", "block": 7, **given},
        {"node": "3", "text": "a bird", "block": 1, "blend_blocks": 3}]
    assert f"steer: 'a cat' queued for node 3 (next block{', blending over 2 blocks' if blend else ''})" in err
    assert "steer: 'a dog' refused: block 7 is beyond the video (blocks 0..1)" in err
    assert "steer: 'nonsense': expected BLOCK:TEXT or now:TEXT" in err
    assert "node 3: switched to 'a cat' at block 1" in err
    assert "node 3: steered prompt 'a bird' dropped: every block has entered the cascade" in err
    assert result["switches"] == [{"node": "3", "block": 1, "text": "a cat"}] and result["stream_frames"] == 6


@pytest.mark.parametrize("extra, words", [
    (["--steer"], "several BlockCascadeSampler nodes (3, 4); choose one with --steer-node ID"),
    (["--steer-node", "9"], "--steer-node 9: not a BlockCascadeSampler of the workflow (those: 3, 4)"),
])
def test_steer_needs_one_sampler_and_says_so_in_one_line(tmp_path, capsys, extra, words):
    two = {**WORKFLOW, "4": {**WORKFLOW["3"], "_meta": {"title": "Second"}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(two))
    rc = client.main([str(path), "--server", f"127.0.0.1:{closed_port()}", "--timeout", "5", *extra])
    result, err = summary(capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and words in err, err  # before reaching the server
    assert result["status"] == "usage"


def test_steer_lines_and_sampler_choice(capsys):
    from cascade_core.client import steer as client_steer

    assert client_steer.parse_line("now:a cat, 4k\n") == (None, "a cat, 4k", None)
    assert client_steer.parse_line("NOW : a cat") == (None, "a cat", None)
    assert client_steer.parse_line("12:a dog: running") == (12, "a dog: running", None)
    assert client_steer.parse_line("12~4:a dog~2") == (12, "a dog~2", 4)  # blend over 4 blocks
    assert client_steer.parse_line("now ~ 0 : a cat") == (None, "a cat", 0)
    for bad in ("a cat", "-1:a cat", "x:a cat", "3:", "now:  ", "1.5:a", "3~:a", "3~x:a", "3~-1:a", "~2:a"):
        with pytest.raises(ValueError, match="expected BLOCK:TEXT or now:TEXT"):
            client_steer.parse_line(bad)
    with pytest.raises(ValueError, match="blend over 0..64 blocks"):
        client_steer.parse_line("now~65:a cat")
    sent = []
    post = lambda line, blend=0: (client_steer.post(lambda path, body: sent.append(body), "3", line, blend), sent[-1])
    assert post("now~2:a cat") == ("steer: 'a cat' queued for node 3 (next block, blending over 2 blocks)",
                                   {"node": "3", "text": "a cat", "blend_blocks": 2})
    assert post("5:a dog", 4)[1] == {"node": "3", "text": "a dog", "block": 5, "blend_blocks": 4}  # --steer-blend 4
    assert post("5~0:a dog", 4)[1] == {"node": "3", "text": "a dog", "block": 5}  # the line's ~0 wins: hard
    assert client_steer.switch_note({"node": "3", "block": 2, "text": "a", "blend_blocks": 3}) == \
        "node 3: switched to 'a' at block 2, blending over 3 blocks"
    with pytest.raises(SystemExit):  # argparse's usage, then the reason on one line
        client.main(["wf.json", "--steer", "--steer-blend", "65"])
    assert "argument --steer-blend: blend over 0..64 blocks (0: a hard switch), got '65'" in capsys.readouterr().err
    assert client_steer.steer_node(WORKFLOW, None) == "3" and client_steer.steer_node(WORKFLOW, "3") == "3"
    with pytest.raises(ValueError, match="has no BlockCascadeSampler"):
        client_steer.steer_node({"9": WORKFLOW["9"]}, None)


def test_ctrl_c_interrupts_the_prompt_and_an_endless_run_still_ends_with_its_outputs(fake, workflow, tmp_path,
                                                                                       capsys, monkeypatch):
    """The first Ctrl-C interrupts that prompt on the server and keeps watching: an endless sampler then
    ends normally (ComfyUI reports success) and the outputs are fetched; the summary says it was stopped."""
    def interrupted():  # the server side: the run goes on until the client's /interrupt arrives
        deadline = time.monotonic() + 10
        while ("/interrupt", {"prompt_id": PID}) not in fake.posts and time.monotonic() < deadline:
            time.sleep(0.02)

    messages = success_messages()
    end = next(i for i, m in enumerate(messages) if isinstance(m, dict) and m["type"] == "block_cascade.done")
    messages.insert(end, interrupted)
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, messages)
    fake.history[PID] = history_entry("3")
    asked = []
    monkeypatch.setattr(client.StopRequest, "__call__", lambda self: asked.append(1) or len(asked) >= 3)
    rc = run_client(fake, workflow, "--out", str(tmp_path / "out"))
    result, err = summary(capsys)
    assert rc == 0, err
    assert result["status"] == "success" and result["stopped"] == "Ctrl-C" and len(result["outputs"]) == 2
    assert fake.posts.count(("/interrupt", {"prompt_id": PID})) == 1  # once, however often it is asked
    assert f"Ctrl-C: asked ComfyUI to stop prompt {PID} (prompt {PID} withdrawn): an endless stream ends" in err


def test_a_second_ctrl_c_leaves_at_once_in_one_line(fake, workflow, capsys, monkeypatch):
    def second_ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "run", lambda args, stop: second_ctrl_c())
    assert run_client(fake, workflow) == 130
    result, err = summary(capsys)
    assert result["status"] == "stopped" and len(err.strip().splitlines()) == 1


def test_ctrl_c_while_the_prompt_waits_in_the_queue_takes_it_back_and_ends_at_once(fake, workflow, capsys,
                                                                                 monkeypatch):
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 3, "node_errors": {}}, [])  # queued behind others
    monkeypatch.setattr(client.StopRequest, "__call__", lambda self: True)
    started = time.monotonic()
    rc = run_client(fake, workflow, timeout="30")
    result, err = summary(capsys)
    assert rc == 130 and time.monotonic() - started < 10, err
    assert result["status"] == "stopped" and f"Ctrl-C before prompt {PID} started: prompt {PID} withdrawn" in err
    assert fake.posts == [("/queue", {"delete": [PID]}), ("/interrupt", {"prompt_id": PID})]


def test_an_endless_stream_is_counted_in_blocks_and_its_frames_are_not_saved_one_by_one(fake, workflow, tmp_path,
                                                                                       capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # --steer reads it
    messages = success_messages()
    for m in messages:
        if isinstance(m, dict) and m["type"].startswith("block_cascade.") and "blocks" in m["data"]:
            m["data"].update(blocks=0, frames_total=0, steerable=False)
    fake.on_prompt = lambda body: (200, {"prompt_id": PID, "number": 0, "node_errors": {}}, messages)
    fake.history[PID] = history_entry("3")
    out = tmp_path / "out"
    rc = run_client(fake, workflow, "--out", str(out), "--steer")
    result, err = summary(capsys)
    assert rc == 0, err
    assert result["endless_nodes"] == ["3"] and result["stream_frames"] == 0 and not (out / "stream").exists()
    assert "node 3: streaming endlessly until Ctrl-C" in err and "node 3 blocks" in err
    assert "node 3 has no CLIP on its clip input" in err
