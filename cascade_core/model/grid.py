"""Which latent frames each block holds: the block grid that the KV pool, the plan and the tick loop share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockGrid:
    """Latent frames of each block: block 0 holds ``first`` frames, every later block ``frames``.

    ``first == frames`` is the usual grid; ``first = 1`` is an independent first frame (the block
    count still counts block 0). ``offset``: frames of the video before block 0 (a context prefix:
    frames [0, offset), not a block), so block b starts at frame offset + its start in the grid.
    Raises ValueError for sizes below 1 or a negative offset."""

    frames: int
    first: int
    offset: int = 0

    def __post_init__(self):
        if self.frames < 1 or self.first < 1:
            raise ValueError(f"frames per block must be >= 1, got {self.first if self.first < 1 else self.frames}")
        if self.offset < 0:
            raise ValueError(f"the frames before block 0 must be >= 0, got {self.offset}")

    def start(self, block: int) -> int:
        """Absolute index of the block's first latent frame (the prefix's frames counted)."""
        return self.offset + (0 if block == 0 else self.first + (block - 1) * self.frames)

    def end(self, block: int) -> int:
        """One past the block's last latent frame."""
        return self.start(block + 1)

    def size(self, block: int) -> int:
        return self.first if block == 0 else self.frames

    def total(self, blocks: int) -> int:
        """Latent frames of a video of ``blocks`` blocks (the prefix's frames included)."""
        return self.start(blocks)

    def prefix_chunks(self) -> list[tuple[int, int]]:
        """The context prefix's frames [0, offset) as the finished blocks they are written as, oldest
        first: frame ranges [lo, hi) of ``frames`` frames, the first holding the remainder (offset mod
        frames) when ``frames`` does not divide ``offset`` (a start image; a video whose block 0 was an
        independent first frame). This is how Self-Forcing's reference writes a given video's frames
        before generating (``pipeline/causal_inference.py`` of guandeh17/Self-Forcing: frame 0 alone,
        then blocks of ``num_frame_per_block``)."""
        chunks, lo = [], 0
        size = self.offset % self.frames or self.frames
        while lo < self.offset:
            chunks.append((lo, lo + size))
            lo, size = lo + size, self.frames
        return chunks
