"""Block Cascade Config and Prompt Schedule."""
from __future__ import annotations

from comfy_api.latest import io

from cascade_core.model import attention as attention_backends
from cascade_core.model.compiling import COMPILE_CHOICES
from cascade_core.model.kv_store import KV_DTYPES
from cascade_core.sampling.blend import MAX_BLEND_BLOCKS
from cascade_core.sampling.config import SWITCH_MODES
from cascade_core.sampling.families import FAMILIES

from . import checks
from . import devices as device_list
from .sockets import CATEGORY, ConfigType, ScheduleType
from .values import ScheduleValue, Settings

FAMILY_CHOICES = ["auto", *FAMILIES]
FAMILY_TIP = "; ".join(f"{f.name}: {f.description}" for f in FAMILIES.values())


class BlockCascadeConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadeConfig",
            display_name="Block Cascade Config",
            category=CATEGORY,
            description="How blocks are denoised: the checkpoint family's sampling settings (each can be set "
                        "here), how many blocks at once (Block Cascading), what in-flight blocks see, the "
                        "attention window, devices and attention kernels.",
            inputs=[
                io.Int.Input("parallel", default=0, min=0, max=checks.MAX_STEPS + 1,
                             tooltip="Blocks denoised at once: 1 = sequential, up to steps + 1 (one block "
                                     "finishes per model forward); 0 = the family's (1; Rolling Forcing: steps + 1, "
                                     "its own joint window)."),
                io.Combo.Input("attention", options=["auto", "causal", "bidirectional"], default="auto",
                               tooltip="What an in-flight block sees of newer in-flight blocks: causal = nothing, "
                                       "bidirectional = their current noisy keys/values; auto = the family's "
                                       "(causal; Rolling Forcing bidirectional)."),
                io.Int.Input("window", default=-1, min=-1, max=checks.MAX_LATENT_FRAMES,
                             tooltip="Latent frames attended, sink and own block included (LongLive: 12); "
                                     "0 = unlimited, -1 = the family's."),
                io.Int.Input("sink", default=-1, min=-1, max=checks.MAX_LATENT_FRAMES,
                             tooltip="First latent frames the window always keeps (LongLive: 3); -1 = the family's."),
                io.String.Input("steps", default="auto",
                                tooltip="Denoising step list, strictly decreasing, in 0..1000 (Self-Forcing, "
                                        "LongLive: 1000,750,500,250; CausVid: 1000,757,522; Krea Realtime: "
                                        "1000,750,500,250,0); auto = the family's."),
                io.Float.Input("shift", default=0.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Flow-matching timestep shift (Self-Forcing 5, CausVid 8); 0 = the family's."),
                io.String.Input("devices", default="auto",
                                tooltip="auto (ComfyUI's device), cpu, cuda:N; several (cuda:0,cuda:1) share "
                                        "the cascade: one process per GPU, kept alive between runs."),
                io.Combo.Input("attention_backend", options=list(attention_backends.BACKENDS), default="auto",
                               tooltip="Attention kernel. auto: on a CUDA GPU the fastest, measured on the first call "
                                       "of each kind, installed flash4 and xformers included (elsewhere torch's "
                                       "choice); flash4: FlashAttention-4 (pip install flash-attn-4; NVIDIA "
                                       "Hopper, Blackwell); xformers (pip install xformers, a build matching "
                                       "your torch; NVIDIA GPUs)."),
                io.Boolean.Input("flashblock", default=False,
                                 tooltip="FlashBlock: compute a block's attention to earlier frames once and reuse "
                                         "it at its later steps."),
                io.Combo.Input("family", options=FAMILY_CHOICES, default="auto", optional=True,
                               tooltip="Checkpoint family whose reference settings fill every input left to it "
                                       "(auto: the family the model's file name says, else longlive-2 for a Wan2.2 5B model, "
                                       "self-forcing for another). "
                                       + FAMILY_TIP),
                io.Int.Input("frames_per_block", default=0, min=0, max=64, optional=True,
                             tooltip="Latent frames per block: 3 chunk-wise (Self-Forcing, CausVid, LongLive), "
                                     "1 frame-wise (Causal Forcing frame-wise); 0 = the family's."),
                io.Combo.Input("independent_first_frame", options=list(checks.AUTO_CHOICES), default="auto",
                               optional=True,
                               tooltip="Block 0 is one latent frame, later blocks frames_per_block (the Self-Forcing "
                                       "code's independent_first_frame); auto = the family's (off)."),
                io.String.Input("first_block_steps", default="auto", optional=True,
                                tooltip="Block 0's own step list (Causal Forcing++ 1- and 2-step models: "
                                        "1000,750,500,250); none = the step list; auto = the family's."),
                io.Combo.Input("warp", options=list(checks.AUTO_CHOICES), default="auto", optional=True,
                               tooltip="Read the step list through the shifted sigma table (on: Self-Forcing, "
                                       "LongLive, Causal Forcing) or use it as the timesteps (off: CausVid); "
                                       "auto = the family's."),
                io.Float.Input("context_noise", default=0.0, min=0.0, max=1000.0, step=1.0, optional=True,
                               tooltip="Timestep of the clean pass that writes a finished block's K/V, and of Krea "
                                       "Realtime's context rebuild (0 in every released family)."),
                io.Int.Input("kv_recompute", default=-1, min=-1, max=checks.MAX_LATENT_FRAMES, optional=True,
                             tooltip="Rebuild the KV cache before every block from this many clean context frames, "
                                     "the first re-encoded by the VAE (connect it to the sampler: needed from the "
                                     "third block on), with no clean passes (Krea Realtime: 3); 0 = off; -1 = the "
                                     "family's."),
                io.Combo.Input("compile", options=list(COMPILE_CHOICES), default="auto", optional=True,
                               tooltip="torch.compile the transformer layers (about 1.4x faster on CUDA). auto: on "
                                       "where it can run (a CUDA GPU and Triton; Windows: pip install "
                                       "triton-windows), else off with a log line saying why. The first run of a "
                                       "video size compiles (tens of seconds, 'compiling' on the node); what it "
                                       "compiled is kept in ComfyUI's user folder for the next start."),
                io.Combo.Input("kv_dtype", options=list(KV_DTYPES), default="default", optional=True,
                               tooltip="KV cache storage: default (the model's dtype) or fp8 (about half the cache's "
                                       "memory; a small approximation, measured in BENCHMARKS.md)."),
                io.Int.Input("swap_blocks", default=-1, min=-1, max=64, optional=True,
                             tooltip="Transformer blocks whose weights stay in CPU memory and are streamed to the GPU "
                                     "as the forward reaches them (for models larger than the card). -1 = auto: as "
                                     "few as fit, from the memory estimate (0 when the model fits); 0 = all on the "
                                     "GPU."),
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
    def execute(cls, parallel, attention, window, sink, steps, shift, devices, attention_backend, flashblock,
                family="auto", frames_per_block=0, independent_first_frame="auto", first_block_steps="auto",
                warp="auto", context_noise=0.0, kv_recompute=-1, compile="auto", kv_dtype="default",
                swap_blocks=-1) -> io.NodeOutput:
        if family not in FAMILY_CHOICES:
            raise ValueError(f"family must be one of {', '.join(FAMILY_CHOICES)}, got {family!r}")
        cfg, explicit = checks.cascade_config(family, steps, parallel, attention, window, sink, shift, flashblock,
                                              frames_per_block, independent_first_frame, first_block_steps, warp,
                                              context_noise, kv_recompute, kv_dtype)
        if attention_backend not in attention_backends.BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(attention_backends.BACKENDS)}, "
                             f"got {attention_backend!r}")
        device_list.check(devices)
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
        return io.NodeOutput(Settings(cascade=cfg, devices=str(devices).strip() or "auto",
                                      attention_backend=attention_backend, flashblock=bool(flashblock),
                                      family=family, explicit=explicit, compile=compile,
                                      swap_blocks=checks.int_range("swap_blocks", swap_blocks, -1, 64,
                                                                   " blocks (-1 = auto, 0 = none)")))


class BlockCascadePromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlockCascadePromptSchedule",
            display_name="Prompt Schedule",
            category=CATEGORY,
            description="Switches the prompt at a block. Chain entries (previous -> schedule); the first "
                        "must start at block 0. The schedule's switch mode says what a switch does (none: no "
                        "extra model forward; recache: one forward over the window, as LongLive).",
            inputs=[
                io.Conditioning.Input("conditioning"),
                io.Int.Input("start_block", default=0, min=0, max=checks.MAX_BLOCKS - 1,
                             tooltip="First block that uses this prompt (block b starts at 0.75*b s)."),
                ScheduleType.Input("previous", optional=True),
                io.Combo.Input("switch_mode", options=["auto", *SWITCH_MODES], default="auto", optional=True,
                               tooltip="What a prompt switch does: none = in-flight blocks take the new prompt at "
                                       "their next step, no extra forward (Block Cascading); recache = the "
                                       "window's clean K/V are recomputed under the new prompt, one forward per "
                                       "switch (LongLive); auto = the family's. A schedule has one mode: set it "
                                       "on any entry, the others auto."),
                io.Int.Input("blend_blocks", default=0, min=0, max=MAX_BLEND_BLOCKS, optional=True,
                             tooltip="Blocks over which this switch blends the previous prompt into this one "
                                     "(block k of the blend takes (k+1)/(N+1) of it); 0 = a hard switch. "
                                     "Krea's demo blends over 4."),
            ],
            outputs=[ScheduleType.Output(display_name="schedule")],
        )

    @classmethod
    def validate_inputs(cls, start_block):
        return checks.as_validation(lambda: checks.int_range("start block", start_block, 0, checks.MAX_BLOCKS - 1))

    @classmethod
    def execute(cls, conditioning, start_block, previous=None, switch_mode="auto", blend_blocks=0) -> io.NodeOutput:
        blend_blocks = checks.blend_at(start_block, blend_blocks)
        if switch_mode not in ("auto", *SWITCH_MODES):
            raise ValueError(f"switch mode must be one of auto, {', '.join(SWITCH_MODES)}, got {switch_mode!r}")
        embeds = checks.conditioning_embeds(conditioning, f"prompt at block {start_block}")
        base = previous if previous is not None else ScheduleValue()
        return io.NodeOutput(base.with_entry(int(start_block), embeds, switch_mode, blend_blocks))
