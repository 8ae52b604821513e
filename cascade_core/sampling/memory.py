"""How much memory a run needs, and how much a device has: the one estimate the nodes and the CLI share.

:func:`estimate_run_bytes` is deliberately generous (20 % and 256 MiB on top): it is used to refuse a
run that cannot fit before any model work starts, not to size allocations.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..common.constants import GIB
from .blend import MAX_BLEND_BLOCKS, blend_text_sets
from .plan import RunPlan, plan_run


def estimate_run_bytes(run: RunPlan, model_cfg, dtype: torch.dtype, prompts: int, vae_bytes: int,
                       ranks: int = 1, experts: int = 1) -> tuple[int, str]:
    """About how many bytes the planned ``run`` (:func:`sampling.plan.plan_run`: its KV pool layout, blocks
    in flight and latents, in its latent space) needs on its device besides the DiT weights, and what they are
    made of.

    ``model_cfg``: the model's :class:`~model.dit.WanConfig`; ``dtype``: the DiT's dtype; ``prompts``:
    entries of the prompt schedule; ``vae_bytes``: the decoder's weights in bytes (0 without a VAE);
    ``ranks``: the devices of a worker pool (each keeps a full KV cache replica, computes its share of the
    blocks in flight and holds the k/v all-gather buffers): the result is then one rank's need.
    ``experts``: the model's experts (2: a Wan2.2 A14B :class:`model.experts.ExpertPair`, a KV pool each; they
    run one after the other, so the activations are one expert's, and share the high expert's text K/V, as the
    frontends build the pair).

    Counted besides the plan's pool: the room of a pinned block (``cfg.sink`` frames more in every pool) where
    ``cfg.multi_shot_sink`` is on (LongLive 2.0's scene cuts; the loop makes it only for a schedule with a cut,
    counted whenever it may); for a steered run (``run.steered``) the text K/V sets steering may add beyond the
    schedule's ``prompts``: the prompts of the blocks in flight, the block before them and one waiting switch
    (in flight + 2) and a blend's per-block sets (in flight + 1, :func:`sampling.blend.blend_text_sets` at its
    most), as :class:`sampling.steer.LivePrompts` keeps them.
    Returns (bytes, "KV cache x GiB, activations y GiB, VAE z GiB"), the KV cache's words naming two experts'
    pools and a pinned block's room where counted.
    """
    c, cfg, layout = model_cfg, run.cfg, run.layout
    h, w = run.shape[-2:]
    tpf, fpb, in_flight = layout.tokens_per_frame, layout.frames_per_block, layout.max_in_flight
    elem = 4 if dtype == torch.float32 else 2
    kv_elem = 1 + 4 / c.head_dim if cfg.kv_dtype == "fp8" else elem  # fp8 and a float32 scale a token and head
    anchors = cfg.sink * in_flight if cfg.rolling_window else 0  # re-positioned copies of the sink
    pinned = cfg.sink if getattr(cfg, "multi_shot_sink", False) else 0  # KVPool(pinned=...): a cut block's room
    kv = experts * 2 * c.num_layers * (layout.capacity_frames + anchors + pinned) * tpf * c.dim * kv_elem
    tokens = in_flight * fpb * tpf
    share = -(-in_flight // ranks) * fpb * tpf  # tokens of the largest share of the blocks in flight
    activations = share * (c.ffn_dim + 8 * c.dim) * elem * 2
    if ranks > 1:  # the all-gather of one layer's k/v: a send share and every rank's share
        activations += (ranks + 1) * share * 2 * c.dim * elem
    if cfg.flashblock != "off":
        activations += c.num_layers * tokens * c.dim * 4 * 2  # kept block-external outputs + log-sum-exp
    if run.steered:  # steered prompts and their blends' sets (see the docstring)
        prompts += (in_flight + 2) + blend_text_sets([MAX_BLEND_BLOCKS], in_flight)
    text = prompts * c.num_layers * 2 * c.text_len * c.dim * elem
    latents = 3 * run.shape[1] * run.shape[2] * h * w * 4  # the plan's latents: its space's channels
    # the decoder's work: 3000 * elem bytes a video pixel (h * w latent pixels of spatial^2 pixels: Wan2.1 8 x 8,
    # Wan2.2 16 x 16)
    pixels = h * w * run.latent_space.spatial ** 2
    vae_work = (vae_bytes + 3000 * pixels * elem) if vae_bytes else 0
    total = int((kv + activations + text + latents + vae_work) * 1.2) + 256 * 1024 ** 2
    parts = ([f"{experts} experts' pools"] if experts > 1 else []) + ([f"a pinned block's {pinned} frames"]
                                                                     if pinned else [])
    what = (f"KV cache {kv / GIB:.2f} GiB" + (f" ({', '.join(parts)})" if parts else "") +
            f", activations {activations / GIB:.2f} GiB, VAE {vae_work / GIB:.2f} GiB")
    return total, what


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can use now: free GPU memory (no more than a cap set with
    ``torch.cuda.set_per_process_memory_fraction`` leaves) plus what this process's caching allocator holds
    unused (CUDA), or the system's available memory (CPU, MemAvailable of /proc/meminfo); None where it
    cannot be told."""
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        try:
            fraction = torch.cuda.get_per_process_memory_fraction(device)
        except (AttributeError, RuntimeError, AssertionError, ValueError):  # an older torch; no such GPU yet
            fraction = 1.0
        if fraction < 1.0:
            free = min(free, max(0, int(fraction * total) - reserved))
        return int(free + reserved - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def blocks_to_swap(free: int | None, run_bytes: int, weight_bytes: int, block_bytes: int, layers: int,
                   forced: int = -1, experts: int = 1) -> int | None:
    """How many of the model's ``layers`` transformer blocks a run streams from host memory
    (:class:`model.block_swap.BlockSwap`): ``forced`` when >= 0, else the fewest that fit ``free`` bytes
    (None: unknown, nothing swapped) beside the run's ``run_bytes`` (:func:`estimate_run_bytes`), the
    weights left on the device (``weight_bytes`` less the swapped blocks, ``block_bytes`` each) and the two
    device slots they stream through. None when even every block swapped does not fit.

    ``experts``: the model's experts (2: a Wan2.2 A14B pair, ``weight_bytes`` both experts' weights): the count is
    then per expert, each streaming that many of its blocks through two slots of its own
    (:meth:`model.experts.ExpertPair.swap_blocks`); all ``layers``: the idle expert's blocks stay off the device."""
    if forced >= 0:
        return forced
    if free is None or run_bytes + weight_bytes <= free:
        return 0
    for swapped in range(1, layers + 1):
        if run_bytes + weight_bytes - experts * (swapped - min(2, swapped)) * block_bytes <= free:
            return swapped
    return None


def placement_words(swapped: int, layers: int, weights: str, experts: int = 1) -> str:
    """The settings line's words for where the weights sit: "weights fp8_e4m3fn, resident" or "..., 12 of 40
    blocks swapped"; for two experts (``experts`` 2) "weights bfloat16, 2 experts resident" or "..., 12 of
    each expert's 40 blocks swapped" (all: "..., the idle expert off the GPU")."""
    if experts == 1:
        return f"weights {weights}, " + ("resident" if not swapped else f"{swapped} of {layers} blocks swapped")
    return f"weights {weights}, " + (
        f"{experts} experts resident" if not swapped else
        f"{swapped} of each expert's {layers} blocks swapped" + (", the idle expert off the GPU"
                                                                 if swapped == layers else ""))


def cheaper_settings(run: RunPlan, model_cfg, dtype: torch.dtype, prompts: int, vae_bytes: int, free: int,
                     weight_bytes: int, block_bytes: int, stored_small: bool, experts: int = 1) -> str:
    """The cheapest of fp8 weights, an fp8 KV cache and a window (12 latent frames, sink 3: LongLive's) that
    would let the run fit ``free`` bytes with every block swapped, as words for a refusal ("" when none).
    ``stored_small``: the weights are fp8 or GGUF already (fp8 weights would not make them smaller);
    ``experts``: as :func:`blocks_to_swap` takes it (``weight_bytes``: every expert's)."""
    def fits(plan: RunPlan, weights: int) -> bool:
        need = estimate_run_bytes(plan, model_cfg, dtype, prompts, vae_bytes, experts=experts)[0]
        return blocks_to_swap(free, need, weights, block_bytes * weights // weight_bytes, model_cfg.num_layers,
                              experts=experts) is not None

    tries = []
    if not stored_small:
        tries.append(("weight_dtype fp8_e4m3fn", run, weight_bytes // 2))
    if run.cfg.kv_dtype != "fp8":
        tries.append(("kv_dtype fp8", replace(run, cfg=replace(run.cfg, kv_dtype="fp8")), weight_bytes))
    if run.cfg.window is None and not run.cfg.kv_recompute:
        try:
            windowed = plan_run(replace(run.cfg, window=12, sink=3), blocks=run.schedule.blocks, width=run.width,
                                height=run.height, patch=run.patch, switches=run.switches, devices=run.devices,
                                latent_space=run.latent_space)
            tries.append(("a window (12 latent frames, sink 3)", windowed, weight_bytes))
        except ValueError:
            pass
    for words, plan, weights in tries:
        if fits(plan, weights):
            return words
    return ""
