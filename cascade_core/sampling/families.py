"""Released checkpoint families and the sampling settings their own inference code uses.

Each :class:`Family` holds the :class:`~cascade_core.sampling.config.CascadeConfig` fields that differ from
the engine's defaults, read from the family's public inference code (``source`` names the file and
lines). :func:`family_config` fills a config from a family and lets explicit settings override it;
:func:`guess_family` reads a family off a file name and says why, or returns None (it never guesses
silently: the caller prints the reason).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .config import CascadeConfig


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    settings: dict = field(default_factory=dict)  # CascadeConfig fields that differ from the defaults
    source: str = ""  # reference file and lines the settings come from
    # the Wan2.1 decoder's window rule where the family's own code decodes (video.vae.Upsample: "wan" or "krea")
    time_cache: str = "wan"
    latent_channels: int = 16  # of the DiT its checkpoints are: 16 (Wan2.1 latents) or 48 (Wan2.2 TI2V-5B)
    experts: int = 1  # 2: its checkpoints are two-expert pairs (Wan2.2 A14B: model.experts.ExpertPair)


_FOUR_STEPS = (1000, 750, 500, 250)
# LongLive 2.0: UniPC over sampling_steps 4 at shift 5 (its timesteps, sampling.unipc.unipc_levels), blocks of 8,
# window 32 (local_attn_size) holding a sink of 8, clean pass at t = 0, absolute RoPE, multi-shot sink and a RoPE
# offset of 8 frames per scene cut
_LONGLIVE2 = {"solver": "unipc", "steps": (999, 937, 833, 624), "warp": False, "shift": 5.0, "frames_per_block": 8,
              "window": 32, "sink": 8, "multi_shot_sink": True, "shot_rope_offset": 8}
_LONGLIVE2_SOURCE = ("NVlabs/LongLive@7860ad9 configs/inference.yaml:2-6,24-33; pipeline/causal_diffusion_inference.py:"
                     "71,107,366-705,892-899,974-1033; wan_5b/utils/fm_solvers_unipc.py:109-213,352-741; "
                     "wan_5b/modules/causal_model.py:477-600,673-724")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("self-forcing", "Self-Forcing (chunk-wise, 4 warped steps at shift 5)", {},
           "guandeh17/Self-Forcing configs/self_forcing_dmd.yaml, pipeline/causal_inference.py"),
    Family("causvid", "CausVid (3 raw steps 1000, 757, 522 at shift 8)",
           {"steps": (1000, 757, 522), "warp": False, "shift": 8.0},
           "tianweiy/CausVid configs/wan_causal_dmd.yaml:14-18,53; shift 8.0 in the wrapper"),
    Family("causvid-warp", "CausVid's 4-step warped checkpoint (shift 8)",
           {"steps": _FOUR_STEPS, "warp": True, "shift": 8.0},
           "tianweiy/CausVid configs/wan_causal_dmd_warp_4step_cfg2.yaml:14-19,54"),
    Family("causal-forcing", "Causal Forcing, chunk-wise (as Self-Forcing)", {},
           "thu-ml/Causal-Forcing configs/causal_forcing_dmd_chunkwise.yaml"),
    Family("causal-forcing-framewise", "Causal Forcing, frame-wise (1 latent frame a block)",
           {"frames_per_block": 1},
           "thu-ml/Causal-Forcing configs/causal_forcing_dmd_framewise.yaml"),
    Family("causal-forcing-framewise-2step", "Causal Forcing++ frame-wise 2-step (block 0: 4 steps)",
           {"frames_per_block": 1, "steps": (1000, 500), "first_block_steps": _FOUR_STEPS},
           "thu-ml/Causal-Forcing configs/causal_forcing_dmd_framewise_2step.yaml:7-14,50; "
           "pipeline/causal_inference.py:34-44,222-228"),
    Family("causal-forcing-framewise-1step", "Causal Forcing++ frame-wise 1-step (block 0: 4 steps)",
           {"frames_per_block": 1, "steps": (1000,), "first_block_steps": _FOUR_STEPS},
           "thu-ml/Causal-Forcing configs/causal_forcing_dmd_framewise_1step.yaml:7-13,49"),
    Family("longlive", "LongLive (window 12, sink 3, KV re-cache at a prompt switch)",
           {"window": 12, "sink": 3, "switch_mode": "recache"},
           "NVlabs/LongLive@v1.0 configs/longlive_inference.yaml:1-12, "
           "pipeline/interactive_causal_inference.py:34-96"),
    Family("rolling-forcing", "Rolling Forcing (5 blocks denoised jointly at staggered noise levels, "
                              "anchor re-positioned before the window)",
           {"steps": (1000, 800, 600, 400, 200), "parallel": 6, "attention": "bidirectional", "window": 21,
            "sink": 3, "rolling_window": True},
           "TencentARC/RollingForcing@a1477d0 configs/rolling_forcing_dmd.yaml:7-13,45-48, "
           "pipeline/rolling_forcing_inference.py:174-295, wan/modules/causal_model.py:195-300"),
    Family("causal-forcing-longvideo", "Causal Forcing's long-video model (Rolling Forcing's sampler, 4 steps)",
           {"parallel": 5, "attention": "bidirectional", "window": 21, "sink": 3, "rolling_window": True},
           "thu-ml/Causal-Forcing long_video/ (Rolling Forcing's pipeline with steps 1000,750,500,250)"),
    Family("reward-forcing", "Reward Forcing (window 9, EMA sink 3 at 0.999, relative RoPE positions)",
           {"window": 9, "sink": 3, "rope_positions": "slots", "sink_ema": 0.999},
           "JaydenLyh/Reward-Forcing@4317f5a configs/reward_forcing.yaml:51-57, "
           "wan/modules/causal_model.py:67,77,105-106,142-255"),
    Family("krea-realtime", "Krea Realtime 14B (KV cache rebuilt every block from 3 context frames, the first "
                            "re-encoded by the VAE; 4 warped steps and a last one at t = 0; no clean pass)",
           {"steps": (1000, 750, 500, 250, 0), "kv_recompute": 3},
           "krea-ai/realtime-video@acf4b7b release_server.py:328-330,396,416-418,559-560,563-633,637-708; "
           "v2v.py:133-136; its decoder (output and re-encoded frame): release_server.py:190-225,719-721, "
           "demo_utils/vae_block3.py:46-63", time_cache="krea"),
    Family("streamdiffusionv2", "StreamDiffusionV2 video-to-video (needs a video in: the CLI's --video-in; raw "
                                "VAE latents noised by a motion-adaptive scale, chunks of 1 latent frame after a first "
                                "of 2, 2 raw steps 700, 500 at shift 8, no clean pass, its own 6-frame KV cache with "
                                "an adaptive sink of 3: sampling.v2v)",
           {"steps": (700, 500), "warp": False, "shift": 8.0, "frames_per_block": 1},
           "chenfengxu714/StreamDiffusionV2@c5a0f20 streamv2v/inference_wo_batch.py:82,256-354,383-428; "
           "streamv2v/inference.py:51-57; streamv2v/inference_common.py:30-58,83-89; configs/wan_causal_dmd_v2v.yaml:"
           "14-21,53-57; models/wan/causal_stream_inference.py:72-107,124-200,298-348; models/wan/causal_model.py:"
           "251-384; models/wan/wan_wrapper.py:134-141,163-198; models/wan/flow_match.py:19-73"),
    Family("longlive-2", "LongLive 2.0 (Wan2.2-TI2V-5B: blocks of 8 latent frames, a UniPC solver per block over 4 "
                         "steps at shift 5, window 32 with sink 8, a multi-shot sink and RoPE offset at scene cuts)",
           _LONGLIVE2, _LONGLIVE2_SOURCE, latent_channels=48),
    Family("longlive-2-2step", "LongLive 2.0's 2-step checkpoint (as longlive-2, UniPC over 2 steps: 999, 833)",
           {**_LONGLIVE2, "steps": (999, 833)}, _LONGLIVE2_SOURCE + "; README.md:224-225 (the 2Step checkpoint, run "
                                                                  "with inference.sampling_steps 2)",
           latent_channels=48),
    # two experts (model.experts.ExpertPair: the boundary timestep, a KV pool each, the x-at-boundary step rule)
    Family("causal-wan2.2-a14b", "FastVideo's causal Wan2.2-A14B (high- and low-noise experts switched at t 875: 8 "
                                 "warped steps at shift 12, block 0 one latent frame, then blocks of 3)",
           {"steps": (1000, 850, 700, 550, 350, 275, 200, 125), "shift": 12.0, "frames_per_block": 3,
            "independent_first_frame": True},
           "hao-ai-lab/FastVideo@2f3d40740 fastvideo/configs/pipelines/wan.py:315-325, "
           "pipelines/stages/causal_denoising.py:79-353 (docs/references/causal_wan22_a14b.md)", experts=2),
)}
DEFAULT_FAMILY = "self-forcing"
DEFAULT_WAN22_FAMILY = "longlive-2"  # a 48-channel (Wan2.2 TI2V-5B) DiT whose family nothing names


def default_family(latent_channels: int) -> str:
    """The family assumed for a DiT of ``latent_channels`` whose family nothing names: :data:`DEFAULT_WAN22_FAMILY`
    for 48 (Wan2.2), else :data:`DEFAULT_FAMILY`."""
    return DEFAULT_WAN22_FAMILY if latent_channels == FAMILIES[DEFAULT_WAN22_FAMILY].latent_channels \
        else DEFAULT_FAMILY


def model_words(latent_channels: int, experts: int = 1) -> str:
    """"a Wan2.1 DiT (16 latent channels)": a DiT (or a pair of experts) in messages."""
    if experts == 2:
        return f"a two-expert Wan2.2 A14B model ({latent_channels} latent channels)"
    name = {16: "Wan2.1", 48: "Wan2.2 TI2V-5B"}.get(latent_channels, "Wan")
    return f"a {name} DiT ({latent_channels} latent channels)"


def check_family_model(name: str, latent_channels: int, experts: int, model: str, why: str | None = None,
                       runs: str | None = None) -> None:
    """The one refusal of a family on a model its checkpoints are not: ValueError (one line) when the DiT's
    ``latent_channels`` differ from the family's (a Wan2.2 family on a Wan2.1 DiT, or the reverse) or its
    ``experts`` do (a two-expert pair's family on one DiT, or the reverse). ``model`` names the model
    ("x.safetensors", "the built-in untrained model"); ``why``: why the family was assumed (said beside its name);
    ``runs``: how the message starts instead of "family NAME samples", e.g. "--video-in runs StreamDiffusionV2's
    video-to-video on" (then no other family is named as the fix)."""
    family = get_family(name)
    if family.latent_channels == latent_channels and family.experts == experts:
        return
    fits = [f.name for f in FAMILIES.values() if f.latent_channels == latent_channels and f.experts == experts
            and f.name != "streamdiffusionv2"]  # (video-to-video: not a text-to-video family)
    hint = f": use the family {' or '.join(fits[:2])}" if fits and runs is None else ""
    start = runs or f"family {name}{f' ({why})' if why else ''} samples"
    raise ValueError(f"{start} {model_words(family.latent_channels, family.experts)}; {model} is "
                     f"{model_words(latent_channels, experts)}{hint}")


def get_family(name: str) -> Family:
    """The family called ``name``; ValueError listing the names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}") from None


def family_config(name: str | None, **overrides) -> CascadeConfig:
    """A :class:`CascadeConfig` with the family's settings, then ``overrides`` (explicit settings win;
    None values are ignored). A family whose own sampler denoises every step of a window at once
    (a rolling window: Rolling Forcing) keeps parallel = steps + 1 for another step list unless
    parallel is given; at parallel 1 a family's bidirectional in-flight attention is causal (no other block
    is in flight; bidirectional is refused there when asked for). Raises ValueError for an unknown family."""
    family = get_family(name or DEFAULT_FAMILY)
    fields = {f.name for f in dataclasses.fields(CascadeConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"not a sampling setting: {', '.join(sorted(unknown))}")
    settings = {**family.settings, **{k: v for k, v in overrides.items() if v is not None}}
    if family.settings.get("rolling_window") and overrides.get("parallel") is None:
        settings["parallel"] = len(settings.get("steps", CascadeConfig.steps)) + 1
    if overrides.get("attention") is None and settings.get("parallel", 1) == 1:
        settings["attention"] = "causal"  # the family's in-flight visibility: the same with one block in flight
    return CascadeConfig(**settings)


def family_with(name: str | None, given: dict) -> CascadeConfig:
    """:func:`family_config` where every key of ``given`` was set explicitly, None values included (an
    unlimited window, block 0 without a schedule of its own), as the Config node's widgets set them."""
    return dataclasses.replace(family_config(name, **given), **given)


def describe(cfg: CascadeConfig) -> dict:
    """The effective sampling settings, for summaries and the sampler node's text."""
    return {"frames_per_block": cfg.frames_per_block, "independent_first_frame": cfg.independent_first_frame,
            "steps": list(cfg.steps), "first_block_steps": None if cfg.first_block_steps is None
            else list(cfg.first_block_steps), "warp": cfg.warp, "shift": cfg.shift,
            "context_noise": cfg.context_noise, "window": cfg.window, "sink": cfg.sink,
            "parallel": cfg.parallel, "attention": cfg.attention, "flashblock": cfg.flashblock,
            "switch_mode": cfg.switch_mode, "rope_positions": cfg.rope_positions, "sink_ema": cfg.sink_ema,
            "rolling_window": cfg.rolling_window, "kv_recompute": cfg.kv_recompute, "solver": cfg.solver,
            "multi_shot_sink": cfg.multi_shot_sink, "shot_rope_offset": cfg.shot_rope_offset}


# File-name words of released checkpoints and what they say (first match wins; longest names first)
_NAME_RULES = (
    (r"framewise[-_]?1[-_]?step|1[-_]?step.*framewise", "causal-forcing-framewise-1step"),
    (r"framewise[-_]?2[-_]?step|2[-_]?step.*framewise", "causal-forcing-framewise-2step"),
    (r"causal[-_]?forcing.*frame[-_]?wise|frame[-_]?wise.*causal[-_]?forcing", "causal-forcing-framewise"),
    (r"causal[-_]?forcing", "causal-forcing"),
    (r"long[-_]?live", "longlive"),
    (r"self[-_]?forcing", "self-forcing"),
    (r"causvid.*warp|warp.*causvid", "causvid-warp"),
    (r"causvid", "causvid"),
    (r"rolling[-_]?forcing", "rolling-forcing"),
    (r"causal[-_]?forcing.*long[-_]?video|long[-_]?video.*causal[-_]?forcing", "causal-forcing-longvideo"),
    (r"reward[-_]?forcing", "reward-forcing"),
    (r"krea(?:[-_]?real[-_]?time)?(?:[-_]?video)?(?:[-_]?14b)?", "krea-realtime"),
    (r"long[-_]?live[-_]?v?2(?:\.0)?", "longlive-2"),
    (r"causal[-_]?wan[-_]?2[._]?2|sf[-_]?wan[-_]?2[._]?2", "causal-wan2.2-a14b"),
    (r"long[-_]?live[-_]?v?2(?:\.0)?(?:[-_]?5b)?(?:[-_]?nvfp4)?[-_]?(?:s2|2[-_]?step)", "longlive-2-2step"),
)


def guess_family(path: str, lora: str | None = None) -> tuple[str, str] | None:
    """(family, reason) read from a checkpoint's path or its LoRA's; None when nothing in the names
    says it. The file and the two folders above it count (released files sit in folders such as
    ``framewise/``), ``/`` and ``\\`` both separate, names match as whole words (``krea`` is not in
    ``kreations``), and the match nearest the file's own name wins (then the earlier rule)."""
    for what, p in (("LoRA", lora), ("checkpoint", path)):
        if not p:
            continue
        tail = "/".join(part for part in re.split(r"[/\\]", p) if part)
        tail = "/".join(tail.split("/")[-3:])  # the file and the two folders above it
        found = [(m.end(), -rank, family) for rank, (pattern, family) in enumerate(_NAME_RULES)
                 for m in re.finditer(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])", tail.lower())]
        if found:
            return max(found)[2], f"the {what} path {tail!r} names it"
    return None
