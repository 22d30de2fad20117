"""The selection pool of a churned fleet: rank-select on block counts, against the plain computation it
replaces."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.world.counted_mask import BLOCK, CountedMask


# -- rank-select ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 1_000, 20_000])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.99, 1.0])
def test_rank_select_equals_flatnonzero(n, density):
    rng = np.random.default_rng(n + int(density * 100))
    mask = rng.random(n) < density
    counted = CountedMask(mask)
    for step in range(4):
        ids = np.flatnonzero(mask)
        assert counted.count == ids.size
        assert np.array_equal(counted.positions(), ids)
        assert np.array_equal(counted.select(np.arange(ids.size)), ids)          # every rank (the list)
        chunk = max(1, (n - 1) // BLOCK)                                          # every rank, looked up in blocks
        assert np.array_equal(np.concatenate([counted.select(np.arange(i, min(i + chunk, ids.size)))
                                              for i in range(0, ids.size, chunk)] + [np.zeros(0, dtype=np.int64)]),
                              ids)
        if ids.size:
            ranks = rng.integers(0, ids.size, size=(3, 7))                         # any order and shape
            assert np.array_equal(counted.select(ranks), ids[ranks])
            with pytest.raises(IndexError):
                counted.select(np.array([ids.size]))
        # the owner flips some entries in place (blocks hit several times, the last block, one, none) and says
        # which, each once
        size = [0, 1, 50, 2][step]
        touched = np.unique(rng.integers(0, n, size=size)) if n else np.zeros(0, dtype=np.int64)
        mask[touched] = ~mask[touched]
        counted.flipped(touched)


def test_positions_are_listed_once_per_state():
    mask = np.zeros(1_000, dtype=bool)
    mask[::3] = True
    counted = CountedMask(mask)
    first = counted.positions()
    assert counted.positions() is first and not first.flags.writeable
    version = counted.version
    counted.flipped(np.zeros(0, dtype=np.int64))        # nothing changed: nothing changes
    assert counted.positions() is first and counted.version == version
    mask[1] = True
    counted.flipped(np.array([1]))
    assert counted.version == version + 1 and counted.positions()[:2].tolist() == [0, 1]
