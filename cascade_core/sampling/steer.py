"""Which prompt each block of a run takes, and prompt switches that arrive while it runs (steering).

Guarantees:
- :class:`LivePrompts` starts from the run's :class:`PromptSchedule`: every prompt's text K/V is
  computed once (``model.encode_prompt``); ``prompt(b)`` is block b's, ``recache_at`` maps each
  switch block > 0 to its prompt's K/V when switches re-cache (switch mode "recache"). What it keeps
  grows with the switches, not with the video, and :meth:`LivePrompts.forget_before` drops the
  prompts no block from a given one on takes (an endless stream steered for hours stays flat).
- With a ``steer`` callable, :meth:`LivePrompts.poll` asks it once before every tick (the sampler asks
  for tick 0 before a context prefix's passes). Each item it returns, (block or None, embeddings
  [L, text_dim]), is a switch that lands at the next block to enter the cascade (the block whose
  first step is in this tick, else the next one to enter), or at the given block when that is later
  (held until that block enters). From there on blocks take the new prompt exactly as they would if
  the schedule had held the switch at that block from the start, re-cache included; its text K/V are
  computed once, when it arrives. A switch landing at block 0 (one before the first tick) replaces
  the first prompt; a later switch for the same block replaces an earlier one there; a held switch
  stays in place when an earlier one lands before it.
- A switch that cannot land is dropped, not raised, so a live request never ends a run: a block
  beyond the video, or no block left to enter (an endless run has neither). ``on_switch`` gets a :class:`SwitchEvent` when a switch
  lands (in the tick where its block takes its first step) and when one is dropped (with the reason).
- A block that is neither None nor an int >= 0, and embeddings of the wrong width or with NaN or
  infinite values, raise ValueError.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .config import PromptSchedule, check_prompt
from .schedule import CascadeSchedule

Steer = Callable[[], Sequence[tuple["int | None", torch.Tensor]]]


@dataclass(frozen=True)
class SwitchEvent:
    """A steered prompt switch that landed or was dropped.

    ``index``: its place among every switch the steer callable returned, from 0; ``block``: the block
    where it landed (None: dropped); ``tick``: the tick where it landed (its block's first step) or was
    dropped; ``requested``: the block asked for (None: the next to enter); ``dropped``: why it did not
    land ("" when it landed)."""

    index: int
    block: int | None
    tick: int
    requested: int | None
    dropped: str = ""


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
        self.recache_at = {s: t for s, t in zip(self._starts, text) if s and recache}
        self._waiting: dict[int, tuple[int, int | None]] = {}  # block -> (index, requested), not landed yet
        self._count = 0

    def prompt(self, block: int):
        """The text K/V (``model.encode_prompt``'s) of the prompt ``block`` takes."""
        return self._text[self._starts[bisect.bisect_right(self._starts, block) - 1]]

    def forget_before(self, block: int) -> None:
        """Drop the prompts (and re-caches) of switches before the one ``block`` takes: no later block
        takes them. RuntimeError later if an earlier block's prompt is asked for."""
        i = bisect.bisect_right(self._starts, block) - 1
        for start in self._starts[:i]:
            del self._text[start]
            self.recache_at.pop(start, None)
        del self._starts[:i]

    def poll(self, tick: int) -> None:
        """Ask the steer callable (if any) for new switches before ``tick``; report what lands in it."""
        if self.steer is None:
            return
        nxt = self.plan.next_entering(tick)  # == blocks: none is left to enter
        for block, embeds in self.steer():
            index, self._count = self._count, self._count + 1
            if block is not None and (type(block) is not int or block < 0):
                raise ValueError(f"steered prompt {index}: its block must be an int >= 0 or None (the next block "
                                 f"to enter), got {block!r}")
            check_prompt(embeds, self.model.cfg.text_dim, f"steered prompt {index}")
            why = "" if self.plan.endless else (
                f"block {block} is beyond the video (blocks 0..{self.blocks - 1})"
                if block is not None and block >= self.blocks else
                "every block has entered the cascade" if nxt == self.blocks else "")
            if why:
                self._report(SwitchEvent(index, None, tick, block, why))
            else:
                self._switch(max(nxt, block or 0), embeds, index, block, tick)
        if nxt in self._waiting and self.plan.entry(nxt) == tick:
            index, requested = self._waiting.pop(nxt)
            self._report(SwitchEvent(index, nxt, tick, requested))

    def _switch(self, at: int, embeds: torch.Tensor, index: int, requested: int | None, tick: int) -> None:
        text = self.model.encode_prompt(embeds)
        if at in self._waiting:
            old, asked = self._waiting[at]
            self._report(SwitchEvent(old, None, tick, asked, f"replaced by steered prompt {index} at block {at}"))
        elif at not in self._text:
            bisect.insort(self._starts, at)
        self._text[at] = text
        if self.recache and at:
            self.recache_at[at] = text
        self._waiting[at] = (index, requested)

    def _report(self, event: SwitchEvent) -> None:
        if self.on_switch is not None:
            self.on_switch(event)
