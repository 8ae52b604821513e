"""Stand-in for comfy_api.latest.io: schemas, typed inputs/outputs, hidden values, NodeOutput."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class Input:
    io_type = None
    widget = False

    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, extra_dict=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.options: dict[str, Any] = {}

    def as_dict(self) -> dict:
        d = {"display_name": self.display_name, "tooltip": self.tooltip, **self.options}
        return {k: v for k, v in d.items() if v is not None}


class WidgetInput(Input):
    widget = True

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, force_input=None):
        super().__init__(id, display_name, optional, tooltip, lazy)
        self.default = default
        self.options["default"] = default


class Output:
    io_type = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _socket_type(io_type: str):
    class _Type:
        pass

    class _In(Input):
        pass

    class _Out(Output):
        pass

    _In.io_type = _Out.io_type = _Type.io_type = io_type
    _Type.Input, _Type.Output = _In, _Out
    _Type.__name__ = io_type
    return _Type


def Custom(io_type: str):
    return _socket_type(io_type)


Conditioning = _socket_type("CONDITIONING")
Model = _socket_type("MODEL")
Vae = _socket_type("VAE")
Clip = _socket_type("CLIP")
Latent = _socket_type("LATENT")
Image = _socket_type("IMAGE")
Video = _socket_type("VIDEO")


class Int:
    io_type = "INT"

    class Input(WidgetInput):
        io_type = "INT"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     min=None, max=None, step=None, control_after_generate=None, display_mode=None,
                     socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
            self.control_after_generate = control_after_generate
            self.options.update(min=min, max=max, step=step, control_after_generate=control_after_generate)

    class Output(Output):
        io_type = "INT"


class Float:
    io_type = "FLOAT"

    class Input(WidgetInput):
        io_type = "FLOAT"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     min=None, max=None, step=None, round=None, display_mode=None, socketless=None,
                     force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
            self.options.update(min=min, max=max, step=step, round=round)


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        io_type = "STRING"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
            self.options.update(multiline=multiline, placeholder=placeholder)


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        io_type = "BOOLEAN"

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        io_type = "COMBO"

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.choices = list(options or [])
            self.options.update(options=self.choices)


class HiddenHolder:
    def __init__(self, values: dict):
        self.unique_id = values.get(Hidden.unique_id)
        self.prompt = values.get(Hidden.prompt)
        self.extra_pnginfo = values.get(Hidden.extra_pnginfo)

    def __getattr__(self, key):
        return None


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs if o.id is not None]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"ids must be unique, but {dup} are not")

    def finalize(self):
        for i, o in enumerate(self.outputs or []):
            if o.id is None:
                o.id = f"_{i}_{o.io_type}_"

    def input_types(self) -> dict:
        """ComfyUI's V1 view: {"required": {id: (type, options)}, "optional": {...}}."""
        out: dict = {"required": {}}
        for i in self.inputs:
            kind = i.choices if isinstance(i, Combo.Input) else i.io_type
            out.setdefault("optional" if i.optional else "required", {})[i.id] = (kind, i.as_dict())
        return out


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    hidden: HiddenHolder = None
    SCHEMA: Schema = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        """Overridden by nodes that check inputs at queue time (see tests/comfy_stub/execution.py)."""
        return True

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.GET_SCHEMA().input_types()

    @classmethod
    def RETURN_TYPES(cls) -> list[str]:
        return [o.io_type for o in cls.GET_SCHEMA().outputs]

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict):
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden_inputs)})
