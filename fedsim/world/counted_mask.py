"""A bool mask whose true entries can be found by rank without listing them.

`CountedMask` reads a bool array it does not own (the owner flips entries in place and then says which
positions changed) and keeps the number of true entries in each block of `BLOCK` positions. The r-th true
position (0-based, ascending) is then found in one search of the blocks' running counts and one look inside
the block, so k ranks cost O(N / BLOCK + k * BLOCK) however many entries are true, where listing them all
(`np.flatnonzero`) costs O(N). The full list is made only when asked for (or when k * BLOCK reaches N), once per
state of the mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "CountedMask"]

BLOCK = 256      # positions per counted block: 1,000,000 positions are 3,907 counts


class CountedMask:
    """Counts per block of a shared bool array; `version` changes whenever some entry changed."""

    def __init__(self, mask: np.ndarray):
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise TypeError(f"CountedMask counts a 1-d bool array, got {mask.dtype} with {mask.ndim} dimensions")
        self._mask = mask
        n_blocks = -(-mask.size // BLOCK)
        padded = np.zeros(n_blocks * BLOCK, dtype=bool)
        padded[:mask.size] = mask
        self._counts = padded.reshape(n_blocks, BLOCK).sum(axis=1, dtype=np.int64)
        self._total = int(self._counts.sum())
        self._ends: np.ndarray | None = None        # running counts (true entries up to each block's end)
        self._positions: np.ndarray | None = None   # every true position, once asked for
        self.version = 0

    @property
    def count(self) -> int:
        """Number of true entries."""
        return self._total

    def flipped(self, positions: np.ndarray) -> None:
        """The entries at `positions` (each listed once) have just changed value: count them again."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return
        if positions.size == 1:         # one device at a time (a watcher, an asynchronous run): no array work
            p = int(positions[0])
            step = 1 if self._mask[p] else -1
            self._counts[p // BLOCK] += step
        else:
            steps = np.where(self._mask[positions], 1, -1)
            np.add.at(self._counts, positions // BLOCK, steps)
            step = int(steps.sum())
        self._total += step
        self._ends, self._positions = None, None
        self.version += 1

    def select(self, ranks: np.ndarray) -> np.ndarray:
        """The positions of the true entries of `ranks` (0-based in ascending position order, any order, each
        below `count`): `np.flatnonzero(mask)[ranks]` without listing the mask."""
        ranks = np.asarray(ranks, dtype=np.int64)
        if ranks.size and not (0 <= ranks.min() and ranks.max() < self._total):
            raise IndexError(f"rank out of range: {self._total} true entries")
        if ranks.size * BLOCK >= self._mask.size:      # as many looks as the whole list: the list
            return self.positions()[ranks]
        if self._ends is None:
            self._ends = np.cumsum(self._counts)
        flat = ranks.reshape(-1)
        blocks = np.searchsorted(self._ends, flat, side="right")       # the block holding each rank
        within = flat - (self._ends[blocks] - self._counts[blocks])     # its rank inside that block
        seen = np.cumsum(self._rows(blocks), axis=1, dtype=np.int16)
        offset = np.argmax(seen > within[:, None], axis=1)             # first position with within + 1 seen
        return (blocks * BLOCK + offset).reshape(ranks.shape)

    def positions(self) -> np.ndarray:
        """Every true position, ascending, int64, read-only; the same array until an entry changes."""
        if self._positions is None:
            self._positions = np.flatnonzero(self._mask).astype(np.int64, copy=False)
            self._positions.flags.writeable = False
        return self._positions

    def _rows(self, blocks: np.ndarray) -> np.ndarray:
        """The mask's entries in each of `blocks`, a row each (False past the end of the mask)."""
        whole = self._mask.size // BLOCK
        if blocks.size == 0 or blocks.max() < whole:        # rows of a reshaped view: no index arithmetic
            return self._mask[:whole * BLOCK].reshape(whole, BLOCK)[blocks]
        at = blocks[:, None] * BLOCK + np.arange(BLOCK, dtype=np.int64)
        return self._mask[np.minimum(at, self._mask.size - 1)] & (at < self._mask.size)
