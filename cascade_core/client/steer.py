"""The headless client's ``--steer``: prompts read from standard input while the sampler runs, sent to
ComfyUI's ``POST /block_cascade/steer`` (see ``nodes/steer.py`` for the route's answers).

Each line is ``BLOCK:TEXT`` (switch at block BLOCK, or at the next block to enter when that one has
already entered) or ``now:TEXT`` (at the next block to enter); empty lines are skipped. Lines are
read once the sampler has started streaming (earlier lines wait in the input); each answer (queued,
or the server's one-line error) and each bad line is noted, and the run goes on. Standard library only.
"""
from __future__ import annotations

import json
import threading
import urllib.error
from typing import Callable, TextIO

SAMPLER = "BlockCascadeSampler"
ROUTE = "/block_cascade/steer"
LINE_FORMAT = "expected BLOCK:TEXT or now:TEXT (BLOCK an integer >= 0)"


def parse_line(line: str) -> tuple[int | None, str]:
    """``BLOCK:TEXT`` -> (BLOCK, TEXT), ``now:TEXT`` -> (None, TEXT). Raises ValueError (one line)."""
    head, colon, text = line.partition(":")
    head, text = head.strip(), text.strip()
    if not colon or not text:
        raise ValueError(LINE_FORMAT)
    if head.lower() == "now":
        return None, text
    if not head.isdigit():
        raise ValueError(LINE_FORMAT)
    return int(head), text


def steer_node(prompt: dict, given: str | None) -> str:
    """The id of the sampler node to steer: ``given`` (a sampler of the workflow), else the workflow's
    only Block Cascade Sampler. Raises ValueError (one line) otherwise."""
    samplers = [nid for nid, node in prompt.items() if node.get("class_type") == SAMPLER]
    if given is not None:
        if given not in samplers:
            raise ValueError(f"--steer-node {given}: not a {SAMPLER} of the workflow (those: "
                             f"{', '.join(samplers) or 'none'})")
        return given
    if not samplers:
        raise ValueError(f"--steer: the workflow has no {SAMPLER} to steer")
    if len(samplers) > 1:
        raise ValueError(f"--steer: the workflow has several {SAMPLER} nodes ({', '.join(samplers)}); choose one "
                         f"with --steer-node ID")
    return samplers[0]


def post(send: Callable[[str, dict], object], node: str, line: str) -> str:
    """Send one input line for ``node`` through ``send(path, body)`` (the server's JSON POST, raising
    ``urllib.error.HTTPError`` for an error answer); returns the note to print."""
    try:
        block, text = parse_line(line)
    except ValueError as exc:
        return f"steer: {line.strip()!r}: {exc}"
    body = {"node": node, "text": text, **({} if block is None else {"block": block})}
    try:
        send(ROUTE, body)
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error")
        except (ValueError, AttributeError):
            error = None
        return f"steer: {text!r} refused: {error or f'HTTP {exc.code}'}"
    except OSError as exc:
        return f"steer: {text!r} not sent: {exc}"
    return f"steer: {text!r} queued for node {node} ({'next block' if block is None else f'block {block}'})"


def start_reader(lines: TextIO, send: Callable[[str, dict], object], node: str,
                 note: Callable[[str], None]) -> threading.Thread:
    """A daemon thread that posts each non-empty line of ``lines`` for ``node`` until the input ends,
    noting each answer."""
    def read():
        for line in lines:
            if line.strip():
                note(post(send, node, line))

    thread = threading.Thread(target=read, name="block-cascade-steer", daemon=True)
    thread.start()
    return thread


def switch_note(data: dict) -> str:
    """The line printed for a ``block_cascade.switch`` event."""
    if data.get("dropped"):
        return f"node {data.get('node')}: steered prompt {data.get('text')!r} dropped: {data['dropped']}"
    return f"node {data.get('node')}: switched to {data.get('text')!r} at block {data.get('block')}"
