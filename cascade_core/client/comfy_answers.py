"""What ComfyUI's HTTP answers say, read for the headless client (``cascade_core.client.headless``).

Shapes as ComfyUI's server.py and execution.py write them: a /prompt answer's ``error`` and
``node_errors`` (``{node id: {"errors": [{type, message, details, extra_info}], "dependent_outputs",
"class_type"}}``), /object_info entries (``output_node``, ``output``) and /history entries
(``{"outputs": {node id: {"images": [{filename, subfolder, type}], ...}}, "status": ...}``).
Pure functions of JSON; no I/O.
"""
from __future__ import annotations


def reason_text(error: dict) -> str:
    """One ComfyUI validation error as ``message: details``.

    A node's ``validate_inputs`` failure comes once per input that function takes, each with details
    ``"<input> - <reason>"``; the input name is dropped so that the copies read the same.
    """
    text = str(error.get("message") or error.get("type") or "invalid")
    details = str(error.get("details") or "")
    name = str((error.get("extra_info") or {}).get("input_name") or "")
    if error.get("type") == "custom_validation_failed" and name and details.startswith(name):
        details = details[len(name):].lstrip(" -")
    return f"{text}: {details}" if details else text


def node_error_lines(node_errors: dict) -> list[str]:
    """``node ID (class): reason`` once per distinct reason of each node of a /prompt answer's ``node_errors``."""
    lines = []
    for nid, ne in (node_errors or {}).items():
        ne = ne if isinstance(ne, dict) else {}
        for error in ne.get("errors") or []:
            line = f"node {nid} ({ne.get('class_type', '?')}): {reason_text(error if isinstance(error, dict) else {})}"
            if line not in lines:
                lines.append(line)
    return lines


def dropped_outputs(node_errors: dict) -> list[str]:
    """Ids of the output nodes ComfyUI will not run because of ``node_errors`` (their ``dependent_outputs``)."""
    return sorted({str(o) for ne in (node_errors or {}).values() if isinstance(ne, dict)
                   for o in ne.get("dependent_outputs") or []})


def rejection(payload: dict) -> tuple[str, list[str]]:
    """ComfyUI's own words for a rejected prompt: (its error in one line, each node's distinct reasons).

    The error's details are left out when there are node errors: ComfyUI fills them with a copy of
    the output nodes' reasons.
    """
    err, reasons = payload.get("error"), node_error_lines(payload.get("node_errors"))
    if isinstance(err, dict):
        head = str(err.get("message") or err.get("type") or "prompt rejected")
        details = str(err.get("details") or "")
        if details and details != head and not reasons:
            head += ": " + " / ".join(line for line in details.splitlines() if line.strip())
    else:
        head = str(err or "prompt rejected")
    return head, reasons


def sink_output_nodes(prompt: dict, object_info: dict) -> dict[str, str]:
    """``{node id: class}`` of the workflow's sink output nodes (``cascade_core.client.headless.RULES``).

    ``object_info`` maps class names to ComfyUI's /object_info entries (``output_node``, ``output``).
    """
    sinks = {}
    for nid, node in prompt.items():
        info = object_info.get(node["class_type"]) or {}
        if info.get("output_node") and not info.get("output"):
            sinks[nid] = node["class_type"]
    return sinks


def output_files(history_entry: dict):
    """Every ``{filename, subfolder, type}`` in a history entry's outputs (images, videos, gifs, ...)."""
    for node_out in (history_entry.get("outputs") or {}).values():
        for items in (node_out or {}).values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and item.get("filename"):
                    yield item
