"""The headless client's ``--steer``: prompts read from standard input while the sampler runs, sent to
ComfyUI's ``POST /block_cascade/steer`` (see ``nodes/steer.py`` for the route's answers).

Each line is ``BLOCK:TEXT`` (switch at block BLOCK, or at the next block to enter when that one has
already entered) or ``now:TEXT`` (at the next block to enter); ``BLOCK~N:TEXT`` and ``now~N:TEXT`` blend
the old and new prompts over N blocks (the route's ``blend_blocks``; a line without ``~N`` takes
``--steer-blend``, default 0: a hard switch). Empty lines are skipped. Lines are read once the sampler
has started streaming (earlier lines wait in the input); each answer (queued, or the server's one-line
error) and each bad line is noted, and the run goes on. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import threading
import urllib.error
from typing import Callable, TextIO

SAMPLER = "BlockCascadeSampler"
ROUTE = "/block_cascade/steer"
LINE_FORMAT = ("expected BLOCK:TEXT or now:TEXT (BLOCK an integer >= 0), BLOCK~N:TEXT or now~N:TEXT to blend "
               "over N blocks")
MAX_BLEND = 64  # the route's bound on blend_blocks (cascade_core.sampling.blend.MAX_BLEND_BLOCKS)


def parse_line(line: str) -> tuple[int | None, str, int | None]:
    """``BLOCK:TEXT`` -> (BLOCK, TEXT, None), ``now:TEXT`` -> (None, TEXT, None); ``BLOCK~N:TEXT`` and
    ``now~N:TEXT`` give N (0..MAX_BLEND) last. Raises ValueError (one line)."""
    head, colon, text = line.partition(":")
    head, tilde, blend = head.partition("~")
    head, blend, text = head.strip(), blend.strip(), text.strip()
    if not colon or not text or (tilde and not blend.isdigit()) or (head.lower() != "now" and not head.isdigit()):
        raise ValueError(LINE_FORMAT)
    if tilde:
        blend_blocks(blend)
    return None if head.lower() == "now" else int(head), text, int(blend) if tilde else None


def blend_blocks(text: str) -> int:
    """A blend's blocks N from ``text`` (``--steer-blend``, a line's ``~N``): an integer in 0..MAX_BLEND;
    ValueError (one line) otherwise."""
    if not text.strip().isdigit() or int(text) > MAX_BLEND:
        raise ValueError(f"blend over 0..{MAX_BLEND} blocks (0: a hard switch), got {text!r}")
    return int(text)


def _blend_option(text: str) -> int:
    try:
        return blend_blocks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p) -> None:
    """The headless client's steering options on the argparse parser ``p``."""
    p.add_argument("--steer", action="store_true",
                   help="while the sampler runs, switch its prompt with lines BLOCK:TEXT or now:TEXT on stdin "
                        "(BLOCK~N:TEXT, now~N:TEXT: blend the prompts over N blocks)")
    p.add_argument("--steer-node", metavar="ID",
                   help="the Block Cascade Sampler to steer when the workflow has several (implies --steer)")
    p.add_argument("--steer-blend", type=_blend_option, default=0, metavar="N",
                   help=f"blocks each steered switch blends the old and new prompts over, where its line gives no "
                        f"~N (0..{MAX_BLEND}; default 0: a hard switch; Krea's demo blends over 4)")


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


def post(send: Callable[[str, dict], object], node: str, line: str, blend: int = 0) -> str:
    """Send one input line for ``node`` through ``send(path, body)`` (the server's JSON POST, raising
    ``urllib.error.HTTPError`` for an error answer); ``blend``: the blocks to blend over where the line
    gives none (0: a hard switch, no ``blend_blocks`` sent). Returns the note to print."""
    try:
        block, text, given = parse_line(line)
    except ValueError as exc:
        return f"steer: {line.strip()!r}: {exc}"
    blend = blend if given is None else given
    body = {"node": node, "text": text, **({} if block is None else {"block": block}),
            **({"blend_blocks": blend} if blend else {})}
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
    where = 'next block' if block is None else f'block {block}'
    return f"steer: {text!r} queued for node {node} ({where}{f', blending over {blend} blocks' if blend else ''})"


def start_reader(lines: TextIO, send: Callable[[str, dict], object], node: str,
                 note: Callable[[str], None], blend: int = 0) -> threading.Thread:
    """A daemon thread that posts each non-empty line of ``lines`` for ``node`` until the input ends,
    noting each answer; ``blend``: as :func:`post` takes it (``--steer-blend``)."""
    def read():
        for line in lines:
            if line.strip():
                note(post(send, node, line, blend))

    thread = threading.Thread(target=read, name="block-cascade-steer", daemon=True)
    thread.start()
    return thread


def switch_note(data: dict) -> str:
    """The line printed for a ``block_cascade.switch`` event."""
    if data.get("dropped"):
        return f"node {data.get('node')}: steered prompt {data.get('text')!r} dropped: {data['dropped']}"
    blend = f", blending over {data['blend_blocks']} blocks" if data.get("blend_blocks") else ""
    return f"node {data.get('node')}: switched to {data.get('text')!r} at block {data.get('block')}{blend}"
