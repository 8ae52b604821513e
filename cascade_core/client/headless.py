"""``python -m cascade_core.client``: queue an API-format workflow on a ComfyUI server and watch it.

    python -m cascade_core.client workflows/api/<file>.json --server 127.0.0.1:8188 \\
        [--set NODE.INPUT=VALUE ...] [--out DIR] [--timeout S] [--allow-partial]
        [--steer [--steer-node ID] [--steer-blend N]]

See ``RULES`` (also the end of ``--help``) for what counts as success and the exit codes. Standard
library plus ``websocket-client`` and ``tqdm``; never imports ComfyUI.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from cascade_core.client import steer as client_steer
from cascade_core.client.comfy_answers import (
    dropped_outputs,
    node_error_lines,
    output_files,
    rejection,
    sink_output_nodes,
)
from cascade_core.client.http import ProgressBar, Server
from cascade_core.common.stop import StopRequest

EXIT_OK, EXIT_FAILED, EXIT_REJECTED, EXIT_TIMEOUT, EXIT_STOPPED = 0, 1, 2, 3, 130
HISTORY_GRACE_S = 10.0  # ComfyUI writes a prompt's history just after it reports success

RULES = """\
NODE is a node id of the API json or a node's _meta.title; VALUE is parsed as JSON when it parses,
else taken as a string. Streamed frames (block_cascade.frames events) are saved as
DIR/stream/<node>_<frame>.jpg, the prompt's output files (from /history) into DIR (default
out/<prompt id>). A progress bar goes to stderr, one JSON summary line to stdout.

Partial graphs: ComfyUI may accept a prompt but drop the output nodes that fail validation (their
node_errors). The client prints each reason once and, unless --allow-partial, takes the prompt back
(off the queue, or interrupted if it already runs) and exits 2; with --allow-partial the rest runs
and the summary's status is "partial".

Outputs: a sink output node is a node whose class /object_info marks output_node and that has no
output sockets (SaveImage, SaveVideo, PreviewImage, ...). After the run every sink output node of
the workflow, except those ComfyUI dropped, must have an entry in the prompt's /history outputs;
else the run is "incomplete" (exit 1). Output nodes with output sockets (the Block Cascade Sampler)
are not checked: they show nothing in /history.

Steering (--steer): once the sampler streams, each stdin line BLOCK:TEXT or now:TEXT switches its prompt
at that block or the next to enter (BLOCK~N:, now~N: or --steer-blend N: blending over N blocks; POST
/block_cascade/steer; the sampler needs a CLIP). Answers and switches are printed; the summary lists them.

Endless samplers (blocks 0): a counter of their blocks instead of a bar; their frames are not saved
one by one (the MP4 in the outputs holds them). Ctrl-C interrupts the prompt on the server (that
prompt only) and waits for its end: an endless sampler ends normally, and its MP4 and the other
outputs are fetched ("stopped": "Ctrl-C" in the summary); a sampler of known length ends so too with its
blocks final so far (interrupted if none was, as a prompt stopped in another node); a prompt still queued is taken off the queue and the client ends at once (exit 130). A second Ctrl-C
leaves at once (exit 130).

Exit codes: 0 success (or partial with --allow-partial), 1 failed (execution error, interrupted,
incomplete outputs, server unreachable), 2 rejected, partial graph, or bad arguments (a missing or
malformed workflow, a bad --set), 3 timeout, 130 Ctrl-C before the prompt ran, or a second Ctrl-C.
"""


class ClientError(Exception):
    """Ends the run: ``str()`` is the message for the user, ``code`` the exit code, ``status`` for the summary.

    ``reasons`` (lines printed after the message, listed once in the summary) and ``fields`` (more
    summary keys) are optional.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED, status: str = "failed", reasons=(), **fields):
        super().__init__(message)
        self.code, self.status, self.reasons, self.fields = code, status, list(reasons), fields


# ---------------------------------------------------------------------------------------------- overrides

def parse_value(text: str):
    """JSON when it parses (numbers, true/false/null, lists, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_node(prompt: dict, ref: str) -> str:
    """Node id for ``ref``: an id of the prompt, else the one node whose ``_meta.title`` is ``ref``."""
    if ref in prompt:
        return ref
    hits = [nid for nid, node in prompt.items() if isinstance(node, dict) and (node.get("_meta") or {}).get("title") == ref]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ClientError(f"--set: title {ref!r} names several nodes ({', '.join(hits)}); use a node id", EXIT_REJECTED, "usage")
    raise ClientError(f"--set: no node with id or title {ref!r}", EXIT_REJECTED, "usage")


def load_workflow(path: str) -> dict:
    """The API-format workflow at ``path``: ``{node id: {"class_type": str, "inputs": {...}}}``.

    Raises ClientError (exit 2, one line naming the file) for a missing or unreadable file, text that
    is not JSON, a UI-format workflow, an entry that is not a node, or a link (``[node id, output]``) to a
    node the workflow does not hold (checked here: ComfyUI's own answer to it names no input).
    """
    try:
        with open(path, encoding="utf-8") as f:
            prompt = json.load(f)
    except FileNotFoundError:
        raise ClientError(f"{path}: no such workflow file", EXIT_REJECTED, "usage") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(f"{path}: cannot read the workflow: {e}", EXIT_REJECTED, "usage") from None
    except ValueError as e:
        raise ClientError(f"{path}: not JSON ({e})", EXIT_REJECTED, "usage") from None
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise ClientError(f"{path}: not an API-format workflow (export it with 'Save (API)')", EXIT_REJECTED, "usage")
    for nid, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise ClientError(f"{path}: entry {nid!r} is not a node {{class_type, inputs}} of an API-format workflow",
                              EXIT_REJECTED, "usage")
    for nid, node in prompt.items():
        for name, value in node.get("inputs", {}).items():
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
                and isinstance(value[0], (str, int))
            if is_link and str(value[0]) not in prompt:
                raise ClientError(f"{path}: node {nid} ({node['class_type']}) input {name!r} is linked to node "
                                  f"{value[0]}, which the workflow does not hold", EXIT_REJECTED, "usage")
    return prompt


def apply_override(prompt: dict, spec: str) -> tuple[str, str, object]:
    """Apply one ``NODE.INPUT=VALUE`` to ``prompt`` in place; returns (node id, input, value)."""
    key, eq, raw = spec.partition("=")
    ref, dot, name = key.rpartition(".")  # titles may hold dots, input names do not
    if not eq or not dot or not ref or not name:
        raise ClientError(f"--set: expected NODE.INPUT=VALUE, got {spec!r}", EXIT_REJECTED, "usage")
    nid = find_node(prompt, ref)
    value = parse_value(raw)
    prompt[nid].setdefault("inputs", {})[name] = value
    return nid, name, value


# ---------------------------------------------------------------------------------------------- server I/O

def withdraw(server: Server, prompt_id: str) -> str:
    """Take a queued prompt back: off the queue if it waits, interrupted (that prompt only) if it runs.

    Returns a phrase for the user; a server that cannot be reached makes it say so instead of raising.
    """
    try:
        server.request("/queue", {"delete": [prompt_id]})
        server.request("/interrupt", {"prompt_id": prompt_id})
    except OSError as e:
        return f"withdrawing prompt {prompt_id} failed ({e}); it may still run"
    return f"prompt {prompt_id} withdrawn"


def wait_for_history(server: Server, prompt_id: str) -> dict:
    """The prompt's /history entry, asked again for up to ``HISTORY_GRACE_S`` s until ComfyUI has written it.

    Raises ClientError (exit 1, "incomplete") when it never appears.
    """
    end = time.monotonic() + HISTORY_GRACE_S
    while True:
        entry = server.json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
        if isinstance(entry, dict):
            return entry
        if time.monotonic() >= end:
            raise ClientError(f"prompt {prompt_id} finished but ComfyUI has no history for it",
                              EXIT_FAILED, "incomplete", prompt_id=prompt_id)
        time.sleep(0.1)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


# ---------------------------------------------------------------------------------------------- the run

def run(args, stop=lambda: False) -> dict:
    """Queue ``args.workflow`` and watch it to the end; returns the summary dict, raises ClientError.
    ``stop()`` turning true (Ctrl-C) interrupts the prompt on the server, which is then watched to its end."""
    prompt = load_workflow(args.workflow)
    for spec in args.set:
        apply_override(prompt, spec)
    steered = None
    if args.steer or args.steer_node is not None:
        try:
            steered = client_steer.steer_node(prompt, args.steer_node)
        except ValueError as e:
            raise ClientError(str(e), EXIT_REJECTED, "usage") from None
    try:
        import websocket  # websocket-client
    except ImportError:
        raise ClientError("the client needs the websocket-client package (pip install websocket-client)") from None

    server = Server(args.server)
    bar = ProgressBar()
    client_id = str(uuid.uuid4())
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        ws = websocket.create_connection(f"{server.ws}/ws?clientId={client_id}", timeout=min(args.timeout, 30))
    except Exception as e:
        raise ClientError(f"cannot reach ComfyUI at {server.http}: {e}") from None
    try:
        try:
            answer = server.json("/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {"error": body.decode(errors="replace").strip() or f"HTTP {e.code}"}
            head, reasons = rejection(payload)
            raise ClientError(head, EXIT_REJECTED if e.code == 400 else EXIT_FAILED,
                              "rejected" if e.code == 400 else "failed", reasons) from None
        except (urllib.error.URLError, OSError) as e:
            raise ClientError(f"cannot reach ComfyUI at {server.http}: {e}") from None
        prompt_id = answer["prompt_id"]
        node_errors = answer.get("node_errors") or {}
        partial = node_error_lines(node_errors)
        dropped = dropped_outputs(node_errors)
        if partial and not args.allow_partial:
            raise ClientError(f"ComfyUI dropped part of the workflow (output nodes {', '.join(dropped) or '?'} "
                              f"would not run); {withdraw(server, prompt_id)}; --allow-partial runs the rest",
                              EXIT_REJECTED, "partial", partial, prompt_id=prompt_id, dropped_outputs=dropped)
        for line in partial:
            bar.note(f"dropped: {line}")
        out_dir = args.out or os.path.join("out", prompt_id)
        stream_dir = os.path.join(out_dir, "stream")
        frames_saved, cached, switches, stopped, running, endless = 0, [], [], False, False, set()
        bar.note(f"queued prompt {prompt_id}")

        while True:
            if stop() and not stopped:  # a sampler then ends and keeps its video so far; other nodes are interrupted
                stopped, taken_back = True, withdraw(server, prompt_id)
                if not running:  # still queued: nothing ran, nothing will
                    raise ClientError(f"Ctrl-C before prompt {prompt_id} started: {taken_back}", EXIT_STOPPED,
                                      "stopped", prompt_id=prompt_id)
                bar.note(f"Ctrl-C: asked ComfyUI to stop prompt {prompt_id} ({taken_back}): an endless stream ends "
                         f"and a sampler keeps the video so far; Ctrl-C again leaves at once")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(f"timed out after {args.timeout:g} s waiting for prompt {prompt_id} "
                                  "(it may still be running on the server)", EXIT_TIMEOUT, "timeout")
            ws.settimeout(min(remaining, 1.0))
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, OSError) as e:
                raise ClientError(f"lost the connection to ComfyUI: {e or 'closed'}") from None
            if not isinstance(raw, str):
                continue  # binary: latent previews
            msg = json.loads(raw)
            kind, data = msg.get("type"), msg.get("data")
            if not isinstance(data, dict):
                continue
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            running = running or data.get("prompt_id") == prompt_id or kind.startswith("block_cascade.")
            if kind == "execution_cached":
                cached = [str(n) for n in data.get("nodes") or []]
            elif kind == "progress":
                bar.update(data.get("value", 0), data.get("max", 1), f"node {data.get('node', '')}")
            elif kind == "block_cascade.start":
                node = str(data.get("node"))
                if data.get("blocks") == 0:  # an endless stream: its MP4 comes with the outputs
                    endless.add(node)
                    bar.note(f"node {node}: streaming endlessly until Ctrl-C ({data.get('width')}x{data.get('height')} "
                             f"at {data.get('fps')} fps; its frames are not saved one by one: the MP4 comes with "
                             f"the outputs)")
                else:
                    bar.note(f"node {node}: streaming {data.get('frames_total')} frames "
                             f"({data.get('width')}x{data.get('height')} at {data.get('fps')} fps)")
                if steered == node and data.get("steerable") is False:
                    bar.note(f"node {node} has no CLIP on its clip input: the prompts you type will be refused")
                if steered is not None and str(data.get("node")) == steered:  # one reader for the run
                    client_steer.start_reader(sys.stdin, server.json, steered, bar.note, args.steer_blend)
                    steered = None
            elif kind == "block_cascade.switch":
                bar.note(client_steer.switch_note(data))
                if not data.get("dropped"):
                    switches.append({"node": data.get("node"), "block": data.get("block"), "text": data.get("text")})
            elif kind == "block_cascade.frames" and str(data.get("node")) in endless:
                bar.update(int(data.get("block", 0)) + 1, None, f"node {data.get('node')} blocks")
            elif kind == "block_cascade.frames":
                os.makedirs(stream_dir, exist_ok=True)
                first = int(data.get("first_frame", 0))
                for i, b64 in enumerate(data.get("frames") or []):
                    name = f"{safe_name(data.get('node'))}_{first + i:05d}.jpg"
                    with open(os.path.join(stream_dir, name), "wb") as f:
                        f.write(base64.b64decode(b64))
                    frames_saved += 1
            elif kind == "block_cascade.done" and data.get("error"):
                bar.note(f"node {data.get('node')}: stream ended with an error: {data['error']}")
            elif kind == "execution_error":
                text = "\n".join(str(data.get("exception_message", "")).strip().splitlines()[:6])
                etype = data.get("exception_type")
                raise ClientError(f"execution error in node {data.get('node_id')} ({data.get('node_type')}): "
                                  f"{etype + ': ' if etype else ''}{text}", EXIT_FAILED, "error")
            elif kind == "execution_interrupted":
                raise ClientError(f"interrupted in node {data.get('node_id')} ({data.get('node_type')})",
                                  EXIT_FAILED, "interrupted")
            elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                  and data.get("prompt_id") == prompt_id):
                break
    finally:
        bar.close()
        try:
            ws.close()
        except Exception:
            pass

    history = wait_for_history(server, prompt_id)
    outputs = []
    for item in output_files(history):
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output")})
        sub = item.get("subfolder") or ""
        name = (safe_name(sub) + "_" if sub else "") + os.path.basename(item["filename"])
        path = os.path.join(out_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "wb") as f:
            f.write(server.request(f"/view?{query}"))
        outputs.append(path)
    result = {"prompt_id": prompt_id, "seconds": round(time.monotonic() - started, 3),
              "stream_frames": frames_saved, "stream_dir": stream_dir if frames_saved else None,
              "outputs": outputs, "out": out_dir,
              "cached_nodes": cached}  # answered from ComfyUI's cache: they ran (and streamed) nothing
    if switches:
        result["switches"] = switches
    if stopped:
        result["stopped"] = "Ctrl-C"
    if endless:
        result["endless_nodes"] = sorted(endless)
    if partial:
        result.update(reasons=partial, dropped_outputs=dropped)
    object_info = {}
    for cls in sorted({node["class_type"] for node in prompt.values()}):
        object_info.update(server.json(f"/object_info/{urllib.parse.quote(cls, safe='')}"))
    shown = history.get("outputs") or {}
    missing = [f"node {nid} ({cls})" for nid, cls in sink_output_nodes(prompt, object_info).items()
               if nid not in shown and nid not in dropped]
    if missing:
        result.pop("reasons", None)
        raise ClientError(f"prompt {prompt_id} finished, but output {'nodes' if len(missing) > 1 else 'node'} "
                          f"{', '.join(missing)} produced no output", EXIT_FAILED, "incomplete", partial, **result)
    return {"status": "partial" if partial else "success", **result}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cascade_core.client", description=__doc__.splitlines()[0],
                                epilog=RULES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="API-format workflow json")
    p.add_argument("--server", default="127.0.0.1:8188", help="host:port of ComfyUI (default 127.0.0.1:8188)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is an id or a _meta.title; VALUE JSON or a string (repeatable)")
    p.add_argument("--out", help="output folder (default out/<prompt id>)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the prompt (default 3600)")
    p.add_argument("--allow-partial", action="store_true",
                   help="run what ComfyUI accepts when it drops output nodes that fail validation")
    client_steer.add_arguments(p)  # --steer, --steer-node, --steer-blend
    return p


def main(argv=None) -> int:
    """The command line: prints the summary line, returns the exit code (see ``RULES``)."""
    args = build_parser().parse_args(argv)
    try:
        with StopRequest() as stop:
            summary = run(args, stop)
    except KeyboardInterrupt:
        print("stopped at once by a second Ctrl-C; the prompt may still run on the server", file=sys.stderr)
        print(json.dumps({"status": "stopped", "error": "a second Ctrl-C"}))
        return EXIT_STOPPED
    except ClientError as e:
        print("\n".join([str(e), *e.reasons]), file=sys.stderr)
        result = {"status": e.status, "error": str(e).splitlines()[0] if str(e) else ""}
        if e.reasons:
            result["reasons"] = e.reasons
        print(json.dumps({**result, **e.fields}))
        return e.code
    except (OSError, ValueError, KeyError) as e:  # odd server answers
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        print(json.dumps({"status": "failed", "error": str(e)}))
        return EXIT_FAILED
    print(json.dumps(summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
