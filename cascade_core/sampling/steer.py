"""Which prompt each block of a run takes, and prompt switches that arrive while it runs (steering).

Guarantees:
- :class:`LivePrompts` starts from the run's :class:`PromptSchedule`: every prompt's text K/V is
  computed once (``model.encode_prompt``); ``prompt(b)`` is block b's, ``recache_for(b)`` the K/V to
  re-cache under before block b when switches re-cache (switch mode "recache") and b's conditioning
  differs from block b - 1's. A switch with ``blend_blocks`` N conditions its first N blocks on blends
  of the old and new embeddings (:mod:`sampling.blend`), each encoded once, when its block first asks.
  What it keeps grows with the switches and the blocks in flight, not with the video, and
  :meth:`LivePrompts.forget_before` drops the prompts no block from a given one on takes (an endless
  stream steered for hours stays flat).
- With a ``steer`` callable, :meth:`LivePrompts.poll` asks it once before every tick (the sampler asks
  for tick 0 before a context prefix's passes). Each item it returns, (block or None, embeddings [L,
  text_dim]) or (block or None, embeddings, blend_blocks), is a switch that lands at the next block to
  enter the cascade (the block whose first step is in this tick, else the next one to enter), or at the
  given block when that is later (held until that block enters). From there on blocks take the new
  prompt exactly as they would if the schedule had held the switch at that block from the start,
  re-cache included; its text K/V are computed once, when it arrives. A switch landing at block 0 (one
  before the first tick) replaces the first prompt (a blend there is dropped: nothing precedes it); a
  later switch for the same block replaces an earlier one there; a held switch stays in place when an
  earlier one lands before it (and blends from what the blocks before it take by then).
- A switch that cannot land is dropped, not raised, so a live request never ends a run: a block beyond
  the video, or no block left to enter (an endless run has neither). ``on_switch`` gets a
  :class:`SwitchEvent` when a switch lands (in the tick where its block takes its first step) and when
  one is dropped (with the reason).
- A block that is neither None nor an int >= 0, a blend_blocks that is no int in 0..MAX_BLEND_BLOCKS, and
  embeddings of the wrong width or with NaN or infinite values, raise ValueError.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .blend import blend, blend_weight, check_blend_blocks, padded
from .config import PromptSchedule, check_prompt
from .schedule import CascadeSchedule

# (block or None, embeddings [L, text_dim]) or (block or None, embeddings, blend_blocks) per switch
Steer = Callable[[], Sequence[tuple]]


@dataclass(frozen=True)
class SwitchEvent:
    """A steered prompt switch that landed or was dropped.

    ``index``: its place among every switch the steer callable returned, from 0; ``block``: the block
    where it landed (None: dropped); ``tick``: the tick where it landed (its block's first step) or was
    dropped; ``requested``: the block asked for (None: the next to enter); ``dropped``: why it did not
    land ("" when it landed); ``blend_blocks``: the blocks it blends over (0: a hard switch)."""

    index: int
    block: int | None
    tick: int
    requested: int | None
    dropped: str = ""
    blend_blocks: int = 0


class LivePrompts:
    """The prompt of every block of a run, changed by steered switches (see the module docstring).

    ``prompts``: the run's checked schedule; ``plan``: its tick plan; ``recache``: whether a switch
    re-caches (switch mode "recache"); ``steer``/``on_switch``: as :func:`sampling.loop.generate` takes them."""

    def __init__(self, model, prompts: PromptSchedule, plan: CascadeSchedule, recache: bool,
                 steer: Steer | None = None, on_switch: Callable[[SwitchEvent], None] | None = None):
        self.model, self.steer, self.on_switch, self.recache = model, steer, on_switch, recache
        self.plan, self.blocks = plan, plan.blocks  # blocks 0: endless
        text = [model.encode_prompt(e) for _, e in prompts.entries]
        self._starts = [s for s, _ in prompts.entries]  # increasing, from 0
        self._text = dict(zip(self._starts, text))  # start block -> text K/V of the prompt from there on
        self._embeds = dict(prompts.entries)  # start block -> its embeddings [L, text_dim]
        self._blend = {s: n for s, n in prompts.blend_blocks.items() if n}  # start block -> N > 0
        self._from: dict[int, torch.Tensor] = {}  # blending start s -> what block s - 1 takes, [text_len, text_dim]
        self._mixed: dict[int, list] = {}  # block in a blend -> its text K/V
        self._waiting: dict[int, tuple[int, int | None]] = {}  # block -> (index, requested), not landed yet
        self._count = 0

    def _start(self, block: int) -> int:
        i = bisect.bisect_right(self._starts, block) - 1
        if i < 0:
            raise RuntimeError(f"the prompt of block {block} was forgotten (forget_before)")
        return self._starts[i]

    def prompt(self, block: int):
        """The text K/V (``model.encode_prompt``'s) of the prompt ``block`` takes (a blend's: encoded once)."""
        s = self._start(block)
        if block - s >= self._blend.get(s, 0):
            return self._text[s]
        if block not in self._mixed:
            self._mixed[block] = self.model.encode_prompt(self.embedding(block))
        return self._mixed[block]

    def embedding(self, block: int) -> torch.Tensor:
        """The embeddings ``block`` is conditioned on: its prompt's [L, text_dim], or in a blend
        [text_len, text_dim] (:mod:`sampling.blend`)."""
        s = self._start(block)
        n = self._blend.get(s, 0)
        if block - s >= n:
            return self._embeds[s]
        return blend(self._blend_from(s), self._embeds[s], blend_weight(block - s, n), self.model.cfg.text_len)

    def _blend_from(self, start: int) -> torch.Tensor:
        """What block ``start`` - 1 takes, [text_len, text_dim]: where the blend of the switch at ``start``
        starts (kept from when that block has entered)."""
        if start not in self._from:
            self._from[start] = padded(self.embedding(start - 1), self.model.cfg.text_len)
        return self._from[start]

    def recache_for(self, block: int):
        """The text K/V to re-cache the committed frames under before ``block`` enters (switch mode
        "recache"), or None: where its conditioning differs from block - 1's (a switch's block and the
        blocks of its blend, through the first that takes the new prompt alone)."""
        if not self.recache or not block:
            return None
        s = self._start(block)
        return self.prompt(block) if block - s <= self._blend.get(s, 0) else None

    def forget_before(self, block: int) -> None:
        """Drop the prompts (and blends) of switches before the one ``block`` takes, and the blended
        K/V of blocks before ``block``: no later block takes them (what a blend from them needs is kept
        first). ``block`` must have entered. RuntimeError later if an earlier block's prompt is asked for."""
        i = bisect.bisect_right(self._starts, block) - 1
        if i and self._starts[i] in self._blend:
            self._blend_from(self._starts[i])  # block s - 1's, final by now: kept before its prompt goes
        for start in self._starts[:i]:
            for table in (self._text, self._embeds, self._blend, self._from):
                table.pop(start, None)
        del self._starts[:i]
        for b in [b for b in self._mixed if b < block]:
            del self._mixed[b]

    def poll(self, tick: int) -> None:
        """Ask the steer callable (if any) for new switches before ``tick``; report what lands in it."""
        if self.steer is None:
            return
        nxt = self.plan.next_entering(tick)  # == blocks: none is left to enter
        for block, embeds, *blending in self.steer():
            index, self._count = self._count, self._count + 1
            if block is not None and (type(block) is not int or block < 0):
                raise ValueError(f"steered prompt {index}: its block must be an int >= 0 or None (the next block "
                                 f"to enter), got {block!r}")
            check_prompt(embeds, self.model.cfg.text_dim, f"steered prompt {index}")
            n = check_blend_blocks(*(blending or [0]), f"steered prompt {index}")
            why = "" if self.plan.endless else (
                f"block {block} is beyond the video (blocks 0..{self.blocks - 1})"
                if block is not None and block >= self.blocks else
                "every block has entered the cascade" if nxt == self.blocks else "")
            if why:
                self._report(SwitchEvent(index, None, tick, block, why, n))
            else:
                self._switch(max(nxt, block or 0), embeds, n, index, block, tick)
        if nxt in self._waiting and self.plan.entry(nxt) == tick:
            index, requested = self._waiting.pop(nxt)
            self._report(SwitchEvent(index, nxt, tick, requested, "", self._blend.get(nxt, 0)))

    def _switch(self, at: int, embeds: torch.Tensor, n: int, index: int, requested: int | None, tick: int) -> None:
        text = self.model.encode_prompt(embeds)
        if at in self._waiting:
            old, asked = self._waiting[at]
            self._report(SwitchEvent(old, None, tick, asked, f"replaced by steered prompt {index} at block {at}",
                                     self._blend.get(at, 0)))
        elif at not in self._text:
            bisect.insort(self._starts, at)
        self._text[at], self._embeds[at] = text, embeds
        if n and at:  # block 0 has nothing to blend from
            self._blend[at] = n
        else:
            self._blend.pop(at, None)
        self._waiting[at] = (index, requested)

    def _report(self, event: SwitchEvent) -> None:
        if self.on_switch is not None:
            self.on_switch(event)
