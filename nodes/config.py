"""Block Cascade Config and Prompt Schedule."""
from __future__ import annotations

from comfy_api.latest import io

from cascade_core import attention

from . import checks, devices
from .sockets import CATEGORY, ConfigType, ScheduleType
from .values import ScheduleValue, Settings


def _settings(steps, parallel, attention_mode, window, sink, shift, devices_, attention_backend,
              flashblock) -> Settings:
    cfg = checks.cascade_config(steps, parallel, attention_mode, window, sink, shift, flashblock)
    if attention_backend not in attention.BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(attention.BACKENDS)}, got {attention_backend!r}")
    devices.check(devices_)
    return Settings(cascade=cfg, devices=str(devices_).strip() or "auto", attention_backend=attention_backend,
                    flashblock=bool(flashblock))


class BlockCascadeConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadeConfig",
            display_name="Block Cascade Config",
            category=CATEGORY,
            description="How blocks are denoised: how many at once (Block Cascading), what in-flight blocks "
                        "see, the attention window, the step list, devices and attention kernels.",
            inputs=[
                io.Int.Input("parallel", default=1, min=1, max=checks.MAX_STEPS + 1,
                             tooltip="Blocks denoised at once: 1 = sequential (the reference), up to steps + 1 "
                                     "(one block finishes per model forward)."),
                io.Combo.Input("attention", options=["causal", "bidirectional"], default="causal",
                               tooltip="What an in-flight block sees of newer in-flight blocks: causal = nothing, "
                                       "bidirectional = their current noisy keys/values."),
                io.Int.Input("window", default=0, min=0, max=checks.MAX_LATENT_FRAMES,
                             tooltip="Latent frames attended, sink and own block included (LongLive: 12); "
                                     "0 = unlimited."),
                io.Int.Input("sink", default=0, min=0, max=checks.MAX_LATENT_FRAMES,
                             tooltip="First latent frames the window always keeps (LongLive: 3)."),
                io.String.Input("steps", default="1000,750,500,250",
                                tooltip="Denoising step list, strictly decreasing, in 1..1000."),
                io.Float.Input("shift", default=5.0, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching timestep shift (5 for Self-Forcing)."),
                io.String.Input("devices", default="auto",
                                tooltip="auto (ComfyUI's device), cpu, cuda:N; several (cuda:0,cuda:1) share "
                                        "the cascade: one process per GPU, kept alive between runs."),
                io.Combo.Input("attention_backend", options=list(attention.BACKENDS), default="auto",
                               tooltip="Attention kernel (auto: torch's choice)."),
                io.Boolean.Input("flashblock", default=False,
                                 tooltip="FlashBlock: compute a block's attention to earlier frames once and reuse "
                                         "it at its later steps."),
            ],
            outputs=[ConfigType.Output(display_name="config")],
        )

    @classmethod
    def validate_inputs(cls, steps):
        """Queue-time check of the step list (the other inputs: schema limits, and at execution)."""
        if steps is None:  # a linked widget: checked when the node runs
            return True
        return checks.as_validation(lambda: checks.step_list(steps))

    @classmethod
    def execute(cls, parallel, attention, window, sink, steps, shift, devices, attention_backend,
                flashblock) -> io.NodeOutput:
        return io.NodeOutput(_settings(steps, parallel, attention, window, sink, shift, devices,
                                       attention_backend, flashblock))


class BlockCascadePromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadePromptSchedule",
            display_name="Prompt Schedule",
            category=CATEGORY,
            description="Switches the prompt at a block. Chain entries (previous -> schedule); the first "
                        "must start at block 0. A switch costs no extra model forward.",
            inputs=[
                io.Conditioning.Input("conditioning"),
                io.Int.Input("start_block", default=0, min=0, max=checks.MAX_BLOCKS - 1,
                             tooltip="First block that uses this prompt (block b starts at 0.75*b s)."),
                ScheduleType.Input("previous", optional=True),
            ],
            outputs=[ScheduleType.Output(display_name="schedule")],
        )

    @classmethod
    def validate_inputs(cls, start_block):
        return checks.as_validation(lambda: checks.int_range("start block", start_block, 0, checks.MAX_BLOCKS - 1))

    @classmethod
    def execute(cls, conditioning, start_block, previous=None) -> io.NodeOutput:
        checks.int_range("start block", start_block, 0, checks.MAX_BLOCKS - 1)
        embeds = checks.conditioning_embeds(conditioning, f"prompt at block {start_block}")
        base = previous if previous is not None else ScheduleValue()
        return io.NodeOutput(base.with_entry(int(start_block), embeds))
