"""Stand-in for how ComfyUI's ``execution.validate_inputs`` checks one node's widget values at queue time.

Modelled on ComfyUI 0.3.64 and 0.27 (same rules in both), written here from their behaviour:

- an input that the node's ``validate_inputs`` does not take is checked against its schema: below
  ``min`` (``value_smaller_than_min``), above ``max`` (``value_bigger_than_max``), a combo value not
  among the options (``value_not_in_list``);
- an input it takes is not checked against the schema; ``validate_inputs`` is called once with the
  inputs it takes (a linked input as None), and a message it returns (anything but True) is reported
  once for *every* input it takes, as ``"<input> - <message>"`` (``custom_validation_failed``).
"""
from __future__ import annotations

import inspect

from comfy_api.latest import io


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _error(kind: str, name: str, details: str) -> dict:
    return {"type": kind, "details": details, "extra_info": {"input_name": name}}


def node_errors(cls, inputs: dict) -> list[dict]:
    """The errors ComfyUI reports for a node of class ``cls`` with API-format ``inputs`` ({} if valid)."""
    schema = cls.GET_SCHEMA()
    validator = getattr(cls, "validate_inputs", None)
    if validator is not None and getattr(validator, "__func__", None) is io.ComfyNode.validate_inputs.__func__:
        validator = None  # only an override counts
    spec = inspect.getfullargspec(validator) if validator is not None else None
    taken = set(spec.args) if spec else set()
    errors = []
    for inp in schema.inputs:
        if inp.id not in inputs:
            if not inp.optional:
                errors.append(_error("required_input_missing", inp.id, inp.id))
            continue
        value = inputs[inp.id]
        if _is_link(value) or inp.id in taken or (spec and spec.varkw):
            continue
        opts = inp.options
        if opts.get("min") is not None and value < opts["min"]:
            errors.append(_error("value_smaller_than_min", inp.id, inp.id))
        elif opts.get("max") is not None and value > opts["max"]:
            errors.append(_error("value_bigger_than_max", inp.id, inp.id))
        elif isinstance(inp, io.Combo.Input) and value not in inp.choices:
            errors.append(_error("value_not_in_list", inp.id, f"{inp.id}: {value!r} not in {inp.choices}"))
    if spec is not None:
        given = {k: (None if _is_link(v) else v) for k, v in inputs.items() if k in taken or spec.varkw}
        result = validator(**given)
        if result is not True:
            for name in given:
                errors.append(_error("custom_validation_failed", name,
                                     name if result is False else f"{name} - {result}"))
    return errors
