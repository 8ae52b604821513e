"""How a video is sampled (:class:`CascadeConfig`) and which prompt each block takes
(:class:`PromptSchedule`): the settings of a run and their checks, apart from the run loop
(:mod:`sampling.loop`); the rules of a whole run are checked once by :func:`sampling.plan.plan_run`.

Guarantees: :meth:`CascadeConfig.validate` and :meth:`PromptSchedule.validate` raise ValueError naming
the allowed range for anything out of range, and :meth:`CascadeConfig.check_run` refuses a KV
re-cache or a KV recompute where it is not defined, before any model work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.grid import BlockGrid
from ..model.kv_pool import check_window
from ..model.kv_store import KV_DTYPES
from .blend import blend_text_sets, check_blend_blocks
from .schedule import CascadeSchedule, FlowSchedule
from .unipc import UniPCSchedule

ATTENTION_MODES = ("causal", "bidirectional")
FLASHBLOCK_MODES = ("off", "exact", "reuse")
# What a prompt switch at block s does: "none" (Block Cascading: blocks pick up the new prompt at their
# next step, no extra forward); "recache" (LongLive: before block s, the committed frames it will see
# are run once more under the new prompt, one extra forward, rewriting their K/V).
SWITCH_MODES = ("none", "recache")
# Keys' RoPE frame positions: "absolute" (the frame index) or "slots" (the KV pool slot: Reward Forcing's
# positions relative to the keys attended, [sink | recent frames] at 0..F-1, the block at the last ones)
ROPE_POSITIONS = ("absolute", "slots")
# How a block moves from one step to the next: "renoise" (x0, then fresh noise to the next level: the Wan2.1
# families) or "unipc" (a UniPC solver per block, no random draw: LongLive 2.0; :mod:`sampling.unipc`)
SOLVERS = ("renoise", "unipc")
# A prompt that starts with this text starts a new shot (LongLive 2.0, NVlabs/LongLive@7860ad9 utils/dataset.py:22)
SCENE_CUT_PREFIX = "The scene transitions. "


def is_scene_cut(text: str) -> bool:
    """Whether a prompt text starts a new shot in LongLive 2.0 (it starts with :data:`SCENE_CUT_PREFIX`)."""
    return isinstance(text, str) and text.startswith(SCENE_CUT_PREFIX)


@dataclass(frozen=True)
class CascadeConfig:
    """How a video is sampled. ``steps``: denoising timesteps on the 0..1000 scale, strictly
    decreasing; ``shift``: flow-matching shift; ``warp``: read the step list through the shifted
    sigma table (Self-Forcing, LongLive) or use it as the timesteps themselves (CausVid);
    ``first_block_steps``: block 0's own step list (None: ``steps``); ``frames_per_block``: latent
    frames per block (3 chunk-wise, 1 frame-wise); ``independent_first_frame``: block 0 is one latent
    frame, later blocks ``frames_per_block``; ``context_noise``: timestep of the clean pass (0..1000);
    ``parallel``: blocks in flight, 1..len(steps)+1; ``window``/``sink``: in latent frames;
    ``switch_mode``: what a prompt switch does (see :data:`SWITCH_MODES`); ``rope_positions``: see
    :data:`ROPE_POSITIONS`; ``sink_ema``: the EMA sink's weight a (0 = off; Reward Forcing 0.999): each
    block the window drops is blended into the sink's K/V, sink = a*sink + (1-a)*dropped (see
    :mod:`model.kv_pool`). Both need parallel 1 without ``fold_clean`` (one block in flight: otherwise the
    pool's slots are no relative positions and the eviction moment differs from the reference).
    ``rolling_window``: Rolling Forcing's window (denoising steps see the sink re-positioned just before
    the last window - sink frames up to the newest block in flight; clean passes see the last
    ``window`` frames: :meth:`model.kv_pool.PoolLayout.visible_frames`); needs a window.
    ``kv_recompute``: K >= 2 context frames from which the KV cache is rebuilt before every block, with
    no clean passes (Krea Realtime: 3; 0 = off; the rules: :mod:`sampling.recompute`); one block in flight,
    no window, sink, other RoPE positions, independent first frame or re-cache of its own.
    ``solver``: the step rule (:data:`SOLVERS`); with "unipc" ``steps`` are the solver's timesteps for its step
    count at ``shift`` (:func:`sampling.unipc.unipc_levels`: 999, 937, 833, 624 for 4 steps at shift 5), ``warp``
    off and no first-block steps. ``multi_shot_sink``: a scene cut's block is pinned beside the sink once the
    window has passed it (LongLive 2.0; needs a window, sink = frames per block, window - sink a whole number of
    blocks, one block size, absolute RoPE, no EMA sink, rolling window, KV recompute or re-cache);
    ``shot_rope_offset``: frames added to the RoPE positions per scene cut (LongLive 2.0: 8). Scene cuts come
    from the prompt schedule (:attr:`PromptSchedule.scene_cuts`).
    :meth:`validate` raises ValueError naming the allowed range."""

    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    warp: bool = True
    frames_per_block: int = 3
    context_noise: float = 0.0
    parallel: int = 1
    attention: str = "causal"  # in-flight visibility: causal or bidirectional
    window: int | None = None  # latent frames attended (sink and own block included); None = all
    sink: int = 0  # latent frames at the start that the window never drops
    # FlashBlock: "reuse" computes a block's attention to keys outside it at its first step and reuses
    # it (merged by log-sum-exp with fresh in-block attention) at its later steps; clean passes stay
    # exact. "exact" splits and merges at every step (equal to "off"; for tests).
    flashblock: str = "off"
    # P1 only: run a block's clean pass in the same forward as the next block's first step (the same
    # result up to float rounding, one forward fewer per block); see CascadeSchedule
    fold_clean: bool = False
    first_block_steps: tuple[int, ...] | None = None
    independent_first_frame: bool = False
    switch_mode: str = "none"
    rope_positions: str = "absolute"
    sink_ema: float = 0.0
    rolling_window: bool = False
    kv_recompute: int = 0
    # the KV cache's storage: "default" (the model's dtype) or "fp8" (e4m3, a scale per token and head:
    # about half the memory, an approximation; :mod:`model.kv_store`)
    kv_dtype: str = "default"
    solver: str = "renoise"
    multi_shot_sink: bool = False
    shot_rope_offset: int = 0

    @property
    def attended_window(self) -> int | None:
        """Latent frames a block attends (None: all): the window, or with a KV recompute its K context
        frames and itself."""
        return self.kv_recompute + self.frames_per_block if self.kv_recompute else self.window

    @property
    def holds_image(self) -> bool:
        """Whether a start image is block 0's frame 0, held at timestep 0 (LongLive 2.0, the UniPC step rule:
        ``generate``'s ``image_latent``) rather than a context prefix before block 0 (the Wan2.1 families)."""
        return self.solver == "unipc"

    @property
    def grid(self) -> BlockGrid:
        """Which latent frames each block holds."""
        return BlockGrid(self.frames_per_block, 1 if self.independent_first_frame else self.frames_per_block)

    def flows(self) -> tuple[FlowSchedule | UniPCSchedule, FlowSchedule | UniPCSchedule]:
        """(block 0's noise levels, every later block's); raises ValueError for a bad step list."""
        if self.solver == "unipc":
            return (flow := self._unipc_flow()), flow
        flow = FlowSchedule(self.steps, self.shift, self.warp)
        first = flow if self.first_block_steps is None else FlowSchedule(self.first_block_steps, self.shift, self.warp)
        return first, flow

    def check_run(self, switches: int, devices: int = 1, endless: bool = False) -> None:
        """Refuse what is not defined for a run with ``switches`` prompt switches on ``devices`` devices,
        ``endless`` or not: a KV re-cache (switch mode recache) needs parallel 1 (at P>1 blocks before
        the switch are still in flight and would see the re-cached keys), fold-clean off (the previous
        block's clean pass must be done first) and one device (the committed latents stay with the
        devices that made them); a KV recompute runs on one device (its context is re-encoded from the
        decoded video); an endless video needs a window (memory flat: a block attends a bounded
        number of frames) and runs on one device for now. Raises ValueError."""
        if endless and self.attended_window is None:
            raise ValueError("an endless video (blocks 0, until stopped) needs a local window, or every frame it "
                             "made would stay attended and memory would grow without bound: set a window (LongLive's "
                             "is 12 with sink 3: --window 12 --sink 3, or the config's window and sink), a family "
                             "that has one (longlive), or a length in blocks")
        if endless and devices > 1:
            raise ValueError("an endless video (blocks 0) runs on one device for now: give one device, or a length "
                             "in blocks")
        if self.kv_recompute and devices > 1:
            raise ValueError(f"a KV cache recomputed every block (kv_recompute {self.kv_recompute}, as Krea Realtime "
                             f"samples) runs one block at a time on one device: give one device")
        if self.switch_mode != "recache" or not switches:
            return
        why = ("is not defined with a rolling window" if self.rolling_window else
               "needs parallel 1: at P>1 blocks before the switch are still in flight" if self.parallel > 1 else
               "needs the previous block's clean pass done first: turn fold-clean off" if self.fold_clean else
               "runs on one device for now: the committed blocks' latents stay with the devices that made them"
               if devices > 1 else None)
        if why:
            raise ValueError(f"a KV re-cache at a prompt switch (switch mode recache) {why}; or use switch mode none")

    def _unipc_flow(self) -> UniPCSchedule:
        """The UniPC solver of ``len(steps)`` steps at ``shift``; ValueError unless ``steps`` are its timesteps,
        warp is off and there are no first-block steps."""
        flow = UniPCSchedule(len(self.steps), self.shift)
        if tuple(self.steps) != flow.steps:
            raise ValueError(f"the unipc solver's timesteps follow from its step count and shift: {len(self.steps)} "
                             f"steps at shift {self.shift:g} are {','.join(map(str, flow.steps))}, got "
                             f"{','.join(map(str, self.steps))}")
        if self.warp or self.first_block_steps is not None:
            raise ValueError("the unipc solver takes its timesteps from its step count and shift: "
                             + ("warp must be off" if self.warp else "block 0 has no step list of its own"))
        return flow

    def _check_shots(self) -> None:
        """The multi-shot settings (see the class docstring); ValueError."""
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if type(self.shot_rope_offset) is not int or self.shot_rope_offset < 0:
            raise ValueError(f"the RoPE offset per scene cut must be an int >= 0 (frames), got "
                             f"{self.shot_rope_offset!r}")
        if self.shot_rope_offset and (self.rope_positions != "absolute" or self.switch_mode == "recache"
                                      or self.kv_recompute):
            raise ValueError("a RoPE offset per scene cut needs absolute RoPE positions, no re-cache at prompt "
                             "switches and no KV recompute (their forwards rewrite frames of several shots at once)")
        if not self.multi_shot_sink:
            return
        n = self.frames_per_block
        if (self.window is None or self.sink != n or (self.window - self.sink) % n
                or self.window < self.sink + 2 * n):
            raise ValueError(f"a multi-shot sink (LongLive 2.0's) pins a scene cut's block beside a sink of one block: "
                             f"it needs sink = frames per block ({n}) and a window of whole blocks holding the sink "
                             f"and two more (>= {3 * n}), got window "
                             f"{'unlimited' if self.window is None else self.window}, sink {self.sink}")
        clash = [name for name, on in (
            ("an independent first frame", self.independent_first_frame), ("a rolling window", self.rolling_window),
            (f"RoPE positions {self.rope_positions}", self.rope_positions != "absolute"),
            ("an EMA sink", self.sink_ema), ("a KV recompute", self.kv_recompute),
            ("switch mode recache", self.switch_mode == "recache")) if on]
        if clash:
            raise ValueError(f"a multi-shot sink cannot be combined with {', '.join(clash)}")

    def _check_kv_recompute(self) -> None:
        if type(self.kv_recompute) is not int or self.kv_recompute < 0 or self.kv_recompute == 1:
            raise ValueError(f"kv_recompute must be 0 (off) or the context frames the KV cache is rebuilt from, >= 2 "
                             f"(Krea Realtime: 3), got {self.kv_recompute!r}")
        if not self.kv_recompute:
            return
        clash = [name for name, on in (
            (f"parallel {self.parallel}", self.parallel > 1), ("fold-clean", self.fold_clean),
            ("bidirectional attention", self.attention != "causal"),
            (f"window {self.window}", self.window is not None), (f"sink {self.sink}", self.sink),
            (f"RoPE positions {self.rope_positions}", self.rope_positions != "absolute"),
            ("an EMA sink", self.sink_ema), ("a rolling window", self.rolling_window),
            ("an independent first frame", self.independent_first_frame),
            ("switch mode recache", self.switch_mode == "recache"), ("the unipc solver", self.solver == "unipc"),
            ("a multi-shot sink", self.multi_shot_sink)) if on]
        if clash:
            raise ValueError(f"a KV cache recomputed every block (kv_recompute {self.kv_recompute}, as Krea Realtime "
                             f"samples) runs one block at a time and attends only its {self.kv_recompute} context "
                             f"frames, so it cannot be combined with {', '.join(clash)}: leave those to the family, or "
                             f"set kv_recompute 0 (then it is no longer Krea Realtime's sampler)")

    def validate(self, unlimited_window: str | None = None) -> None:
        """Raise ValueError with the allowed range for anything out of range. ``unlimited_window``:
        how the caller spells "no window" (see :func:`model.kv_pool.check_window`)."""
        try:
            self.flows()
        except ValueError as exc:
            if self.first_block_steps is None:
                raise
            raise ValueError(f"step list {list(self.steps)} / first-block steps {list(self.first_block_steps)}: "
                             f"{exc}") from None
        if self.frames_per_block < 1:
            raise ValueError(f"frames per block must be >= 1, got {self.frames_per_block}")
        CascadeSchedule(1, len(self.steps), self.parallel, self.fold_clean)  # blocks in flight: its rules
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"in-flight attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        self._check_kv_recompute()  # first: a window or sink is refused with it, not explained apart
        self._check_shots()
        if self.attention == "bidirectional" and self.parallel == 1:
            raise ValueError("bidirectional in-flight attention needs parallel 2 or more (at P1 no other block is "
                             "in flight to see)")
        check_window(self.window, self.sink, self.frames_per_block, unlimited_window)
        if self.flashblock not in FLASHBLOCK_MODES:
            raise ValueError(f"flashblock must be one of {FLASHBLOCK_MODES}, got {self.flashblock!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if not 0 <= self.context_noise <= 1000:  # (NaN fails this too)
            raise ValueError(f"context noise must lie in 0..1000, got {self.context_noise}")
        if self.switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {self.switch_mode!r}")
        if self.rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"RoPE positions must be one of {ROPE_POSITIONS}, got {self.rope_positions!r}")
        if not 0 <= self.sink_ema < 1:
            raise ValueError(f"the EMA sink's weight must lie in [0, 1) (0 = off), got {self.sink_ema}")
        if (self.rope_positions != "absolute" or self.sink_ema) and (self.parallel > 1 or self.fold_clean):
            raise ValueError("slot RoPE positions and an EMA sink need one block in flight: parallel 1 "
                             "without fold_clean")
        if self.sink_ema and (self.window is None or self.sink != self.frames_per_block
                              or (self.window - self.grid.first) % self.frames_per_block):
            raise ValueError(f"an EMA sink takes whole dropped blocks of the sink's size: it needs a window that "
                             f"ends on a block and sink = frames per block ({self.frames_per_block}), got window "
                             f"{'unlimited' if self.window is None else self.window}, sink {self.sink}")
        in_flight = min(self.parallel, len(self.steps)) * self.frames_per_block  # frames denoised together
        if self.rolling_window and self.window is not None and self.attention == "bidirectional" \
                and self.window - self.sink < in_flight:
            raise ValueError(f"a rolling window with bidirectional in-flight attention must hold every block being "
                             f"denoised: window - sink >= {in_flight} latent frames ({min(self.parallel, len(self.steps))} "
                             f"blocks of {self.frames_per_block}), got window {self.window}, sink {self.sink}")
        if self.rolling_window and (self.window is None or self.rope_positions != "absolute" or self.sink_ema):
            raise ValueError("a rolling window (Rolling Forcing) needs a window, absolute RoPE positions and no EMA "
                             "sink")
        mixed = self.grid.first != self.grid.frames
        if mixed and self.attention == "bidirectional" and self.parallel > 1:
            raise ValueError("bidirectional in-flight attention needs blocks of one size: it cannot be combined "
                             "with an independent first frame at parallel > 1")


def check_prompt(embeds: torch.Tensor, text_dim: int | None, what: str) -> None:
    """Raise ValueError (naming ``what``) for prompt embeddings [L, text_dim] of another width
    (``text_dim`` None: any) or holding NaN or infinite values."""
    if text_dim is not None and embeds.shape[-1] != text_dim:
        raise ValueError(f"{what} has width {embeds.shape[-1]}; the model expects {text_dim} (umt5-xxl embeddings)")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{what} holds NaN or infinite values")


@dataclass
class PromptSchedule:
    """(start block, prompt embeddings [L, text_dim]) entries; the first must start at block 0.
    ``blend_blocks``: {start block of a switch: N}, the blocks over which that switch blends the old and
    the new embeddings (absent or 0: a hard switch; the rule: :mod:`sampling.blend`).
    ``scene_cuts``: start blocks of switches that start a new shot (LongLive 2.0: the caller that has the text
    sets it where the text starts with :data:`SCENE_CUT_PREFIX`, :func:`is_scene_cut`); the switch's first block
    is the cut. LongLive 2.0 reads a cut off each block's prompt text, and its prompt builders prefix only a
    shot's first block (``utils/dataset.py:262, 358, 999``): that shot is a cut switch at s and a plain one
    at s + 1; a prefixed text held by several blocks is one cut here.

    :meth:`validate` raises ValueError for an empty schedule, starts that do not increase, a switch
    beyond the video (``blocks`` 0: an endless one, which has none), embeddings of the wrong width, a
    blend that is no int in 0..MAX_BLEND_BLOCKS, is at block 0 or at no switch, or a scene cut at no switch."""

    entries: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    blend_blocks: dict[int, int] = field(default_factory=dict)
    scene_cuts: set[int] = field(default_factory=set)

    @classmethod
    def single(cls, embeds: torch.Tensor) -> "PromptSchedule":
        return cls([(0, embeds)])

    def validate(self, blocks: int, text_dim: int | None = None) -> None:
        if not self.entries:
            raise ValueError("the prompt schedule is empty")
        starts = [s for s, _ in self.entries]
        if starts[0] != 0:
            raise ValueError(f"the first prompt must start at block 0, got {starts[0]}")
        if any(a >= b for a, b in zip(starts, starts[1:])):
            raise ValueError(f"prompt switches must be at increasing blocks, got {starts}")
        if blocks and starts[-1] >= blocks:  # blocks 0: endless
            raise ValueError(f"a prompt switch at block {starts[-1]} is beyond the video "
                             f"(blocks 0..{blocks - 1})")
        for s, e in self.entries:
            check_prompt(e, text_dim, f"the prompt at block {s}")
        for s, n in self.blend_blocks.items():
            check_blend_blocks(n, f"the prompt switch at block {s}")
            if n and s not in starts[1:]:
                raise ValueError(f"blend_blocks given for block {s}, which " + (
                    "takes the first prompt: it has nothing to blend from" if s == 0 else
                    f"holds no prompt switch (switches at {starts[1:]})"))
        for s in sorted(self.scene_cuts):
            if s not in starts[1:]:
                raise ValueError(f"a scene cut at block {s}, which " + (
                    "takes the first prompt (a cut starts a new shot after another)" if s == 0 else
                    f"holds no prompt switch (switches at {starts[1:]})"))

    def text_sets(self, in_flight: int) -> int:
        """Text K/V sets a run of this schedule with ``in_flight`` blocks in flight holds at most: one per
        prompt and those its blends add (:func:`sampling.blend.blend_text_sets`)."""
        return len(self.entries) + blend_text_sets(self.blend_blocks.values(), in_flight)

    def index_for(self, block: int) -> int:
        return max(i for i, (s, _) in enumerate(self.entries) if s <= block)
