"""ComfyUI SIGKILLed mid-stream (a real host on the CPU, as in test_comfy_host.py; skipped unless COMFYUI_DIR
is set; Linux only: the server's process tree is read from /proc).

What a kill leaves, with no cleanup at all (no Cancel, no atexit):
- an endless run (blocks 0) leaves its recording, ``block_cascade/stream_*.mp4`` in the output folder, playable
  up to its last whole fragment: PyAV decodes exactly the frames of the whole moof+mdat fragments on disk, at
  least those seen there before the kill;
- a run on several devices ("cpu,cpu": worker processes, busy in the run) leaves no process of the server's
  tree behind, within seconds.
A run of known length writes its MP4 only when Cancel stops it or it ends (nodes/outputs.py): killed, it
leaves none, by design, so nothing about it is checked here.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import socket
import struct
import sys
import time
import uuid

import pytest
from test_comfy_host import COMFYUI_DIR, WebSocket, started_host, workflow

pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process tree is read from /proc"),
]
GONE_WITHIN = 10.0  # seconds for every process of a killed server's tree to end
ENOUGH = 400  # frames sent by an endless run whose recording must hold two whole fragments by then (~2 x 32)


@pytest.fixture
def host(tmp_path_factory):
    """A server of its own (its own port and base folder) for each test: each one kills it."""
    yield from started_host(tmp_path_factory)


# ---- what is on disk and in /proc ------------------------------------------------------------------
def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, box end) of each whole box in data[start:end]; stops at a box cut off."""
    pos, end = start, len(data) if end is None else end
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        if size < header or pos + size > end:  # cut off (or "to the end of the file": not known whole)
            return
        yield kind, pos + header, pos + size
        pos += size


def whole_fragments(path: str) -> list[int]:
    """The sample count of each whole fragment (a moof and the mdat after it, both complete) of a fragmented
    MP4 that may be cut off anywhere: the frames a player can show."""
    with open(path, "rb") as f:
        data = f.read()
    counts, pending = [], None
    for kind, start, end in _boxes(data):
        if kind == b"moof":
            pending = sum(struct.unpack(">I", data[s + 4:s + 8])[0]  # trun: version+flags, sample_count
                          for k, ts, te in _boxes(data, start, end) if k == b"traf"
                          for k2, s, _ in _boxes(data, ts, te) if k2 == b"trun")
        elif kind == b"mdat" and pending is not None:
            counts.append(pending)
            pending = None
    return counts


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs, ...), read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        at = todo.pop()
        children = [p for p, parent in parents.items() if parent == at]
        found += children
        todo += children
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def gone(pid: int) -> bool:
    """No such process (reaped), or only a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill_server(host) -> list[int]:
    """SIGKILL the server process (only it), reap it; -> the pids of its tree just before the kill."""
    tree = descendants(host.proc.pid)
    os.kill(host.proc.pid, signal.SIGKILL)
    host.proc.wait(30)
    return tree


def assert_tree_gone(tree: list[int]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < GONE_WITHIN and not all(gone(p) for p in tree):
        time.sleep(0.05)
    left = {p: cmdline(p) for p in tree if not gone(p)}
    for p in left:  # not to outlive the test
        os.kill(p, signal.SIGKILL)
    assert not left, f"left {GONE_WITHIN} s after the server was killed: {left}"
    return time.monotonic() - t0


def queue_and_watch(host, wf: dict, until, timeout: float = 300) -> list[dict]:
    """Queue ``wf`` through a websocket client and read its messages until ``until(messages)`` is true (also
    asked every half second while none come); -> the messages. Fails on an execution error or an end."""
    client = uuid.uuid4().hex
    ws = WebSocket("127.0.0.1", host.port, f"/ws?clientId={client}")
    try:
        status, reply = host.post("/prompt", {"prompt": wf, "client_id": client})
        assert status == 200, reply
        msgs, deadline = [], time.time() + timeout
        while not until(msgs):
            assert time.time() < deadline, f"timed out; last messages {[m['type'] for m in msgs][-10:]}"
            try:
                op, data = ws.recv(0.5)
            except socket.timeout:
                continue
            if op == 1:
                msgs.append(json.loads(data))
                assert msgs[-1]["type"] not in ("execution_error", "execution_success", "execution_interrupted"), \
                    (msgs[-1], host.log_text()[-3000:])
        return msgs
    finally:
        ws.close()


def frames_sent(msgs: list[dict]) -> int:
    return sum(len(m["data"]["frames"]) for m in msgs if m["type"] == "block_cascade.frames")


# ---- the tests --------------------------------------------------------------------------------------
def test_a_killed_endless_run_leaves_an_mp4_that_plays_to_its_last_whole_fragment(host):
    import av

    wf = workflow(seed=random.randrange(1 << 30), blocks=0)
    wf = {k: v for k, v in wf.items() if k in ("1", "2", "3", "4", "5", "6", "7", "8")}
    wf["6"]["inputs"].update(parallel=1, attention="causal", window=6, sink=3)
    wf["5"]["inputs"]["start_block"] = 4
    pattern = os.path.join(host.base, "output", "block_cascade", "stream_*.mp4")
    seen = {}

    def two_fragments_on_disk(msgs) -> bool:
        """Two whole fragments in the newest recording (each keyframe starts one: every 2 s of video at the
        most; x264 puts them 31 frames apart here, sooner at a scene cut): the encoder's own delay (x264
        holds tens of frames back) is behind us, and the file is in the middle of the next one. Or,
        whatever the file holds, ``ENOUGH`` frames sent: far past that point."""
        files = sorted(glob.glob(pattern), key=os.path.getmtime)
        if files:
            seen.update(path=files[-1], fragments=whole_fragments(files[-1]), sent=frames_sent(msgs))
        return len(seen.get("fragments", ())) >= 2 or frames_sent(msgs) >= ENOUGH

    msgs = queue_and_watch(host, wf, two_fragments_on_disk)
    tree = kill_server(host)
    assert_tree_gone(tree)
    assert seen, f"no {pattern} after {frames_sent(msgs)} frames were sent"
    assert len(seen["fragments"]) >= 2, f"{seen['sent']} frames sent; whole fragments on disk: {seen['fragments']}"
    fragments = whole_fragments(seen["path"])  # what the kill left: the whole ones seen before it, or more
    assert fragments[:len(seen["fragments"])] == seen["fragments"] and all(n >= 1 for n in fragments)
    with av.open(seen["path"]) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == sum(fragments) >= sum(seen["fragments"]), (decoded, fragments, seen)
    print(f"killed after {seen['sent']} frames sent ({len(tree)} processes under the server); the MP4 "
          f"({os.path.getsize(seen['path'])} bytes) plays {decoded} frames in {len(fragments)} fragments {fragments}")


def test_a_killed_run_on_several_devices_leaves_no_process_behind(host):
    wf = workflow(seed=random.randrange(1 << 30), blocks=400)
    wf = {k: v for k, v in wf.items() if k in ("1", "2", "3", "4", "5", "6", "7", "8")}
    wf["6"]["inputs"].update(parallel=2, attention="causal", window=6, sink=3, devices="cpu,cpu")
    wf["5"]["inputs"]["start_block"] = 4
    queue_and_watch(host, wf, lambda msgs: frames_sent(msgs) > 0)  # the workers are in the middle of the run
    workers = [p for p in descendants(host.proc.pid) if "multiprocessing" in cmdline(p)
               and "spawn_main" in cmdline(p)]
    assert len(workers) == 2, {p: cmdline(p) for p in descendants(host.proc.pid)}
    tree = kill_server(host)
    took = assert_tree_gone(tree)
    print(f"{len(tree)} processes under the server ({len(workers)} spawned), all gone {took:.2f} s after the kill")
