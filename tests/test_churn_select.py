"""The selection pool of a churned fleet: rank-select on block counts, the calendar of due switches, and
the candidates a round draws from, each against the plain computation it replaces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.policies.overselect import Overselect
from fedsim.policies.wait import Wait
from fedsim.spec.availability import ChurnSpec, InitialState
from fedsim.spec.distributions import Dist, DistKind
from fedsim.world.candidates import ArrayCandidates, MaskCandidates
from fedsim.world.churn import RenewalAvailability
from fedsim.world.counted_mask import BLOCK, CountedMask
from fedsim.world.switch_calendar import WINDOW_MIN, SwitchCalendar


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


# -- the calendar of due switches -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [50, WINDOW_MIN, 5 * WINDOW_MIN, 40_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_calendar_names_every_device_due(n, seed):
    """An owner advancing what the calendar names, moving other devices forward and back (a replay) and some to
    never: at every query, every device whose next switch is due has been named since it was last moved."""
    rng = np.random.default_rng(seed)
    next_at = rng.exponential(30.0, n)
    next_at[rng.random(n) < 0.05] = math.inf                 # never switches
    next_at[rng.random(n) < 0.05] = 12.5                      # ties
    calendar = SwitchCalendar(next_at)
    at = 0.0
    for step in range(150):
        at += float(rng.exponential(2.0)) * (10.0 if step % 40 == 39 else 1.0)   # some long leaps
        named = calendar.due(at)
        expected = np.flatnonzero(next_at <= at)
        assert np.isin(expected, named).all(), (step, at)
        # advance what is due (an owner skips the stale names), sometimes past several periods
        due = np.unique(named[next_at[named] <= at])
        next_at[due] = at + rng.exponential(30.0, due.size) * rng.choice([0.01, 1.0], due.size)
        calendar.moved(due)
        # others moved: a participant advanced ahead, a replay from the past, one that stops switching
        others = rng.choice(n, size=min(n, 5), replace=False)
        next_at[others] = np.where(rng.random(others.size) < 0.5, at + rng.exponential(5.0, others.size),
                                   rng.uniform(0.0, at + 1.0, others.size))
        next_at[others[0]] = math.inf
        calendar.moved(others)
    final = calendar.due(at)
    assert np.isin(np.flatnonzero(next_at <= at), final).all()


def test_calendar_window_holds_a_share_of_a_large_fleet():
    next_at = np.random.default_rng(3).exponential(100.0, 64 * WINDOW_MIN)
    calendar = SwitchCalendar(next_at)
    assert calendar.due(0.0).size == 0
    assert calendar.until_at == pytest.approx(np.sort(next_at)[4 * WINDOW_MIN - 1])    # 1/16 of the fleet
    small = SwitchCalendar(np.array([1.0, math.inf, 3.0]))
    assert small.due(2.0).tolist() == [0] and small.until_at == math.inf


def test_calendar_sorts_in_many_late_entries():
    """Moves inside the window wait in a late list until it holds WINDOW_MIN entries, then join the sorted ones."""
    n = 3 * WINDOW_MIN
    next_at = np.arange(1.0, n + 1.0)
    calendar = SwitchCalendar(next_at)
    assert calendar.due(0.5).size == 0 and calendar.until_at == WINDOW_MIN
    rng = np.random.default_rng(2)
    for batch in np.array_split(rng.permutation(n), 6):          # half of them sooner, one move at a time or many
        next_at[batch] = rng.uniform(0.5, 2 * WINDOW_MIN, batch.size)
        for part in (batch[:3], batch[3:]):
            calendar.moved(part)
    for at in (0.75, 10.0, 10.0, WINDOW_MIN / 2, WINDOW_MIN - 1.0):
        named = calendar.due(at)
        assert np.isin(np.flatnonzero(next_at <= at), named).all(), at
        next_at[named[next_at[named] <= at]] = math.inf
        calendar.moved(named)


# -- the candidates of a round ------------------------------------------------------------------------------------

SPECS = [ChurnSpec(Dist(DistKind.EXPONENTIAL, 40.0), Dist(DistKind.EXPONENTIAL, 15.0), InitialState.STATIONARY),
         None, ChurnSpec(Dist(DistKind.FIXED, 3.0), Dist(DistKind.UNIFORM, 1.0, 9.0), InitialState.OFFLINE)]


def test_candidates_take_what_a_fresh_source_lists():
    cls = np.arange(6_000) % 3
    kept = RenewalAvailability(cls, SPECS, np.random.default_rng(4))
    watched = np.random.default_rng(0).choice(6_000, 300, replace=False)
    rng = np.random.default_rng(9)
    for at in [0.0, 0.5, 3.0, 7.25, 60.0, 61.0, 1.5, 62.0, 500.0, 499.0, 900.0, 900.0]:
        expected = np.flatnonzero(RenewalAvailability(cls, SPECS, np.random.default_rng(4))
                                  .online_mask(np.arange(6_000), at))
        pool = kept.candidates(at)
        assert len(pool) == expected.size, at
        positions = rng.integers(0, expected.size, 200)
        assert np.array_equal(pool.take(positions), expected[positions]), at
        assert np.array_equal(np.asarray(pool), expected), at
        kept.next_switches(watched, at + 4.0)


def test_candidates_after_a_switch_are_stale():
    spec = ChurnSpec(Dist(DistKind.FIXED, 1.0), Dist(DistKind.FIXED, 1.0), InitialState.ONLINE)
    avail = RenewalAvailability(np.zeros(10, dtype=np.int64), [spec], np.random.default_rng(0))
    pool = avail.candidates(0.5)
    assert len(pool) == 10 and isinstance(pool, MaskCandidates)
    assert len(avail.candidates(0.75)) == 10      # nobody switched: still good
    assert pool.take(np.array([3])).tolist() == [3]
    assert len(avail.candidates(1.5)) == 0
    with pytest.raises(RuntimeError, match="stale"):
        pool.take(np.array([3]))


@pytest.mark.parametrize("population", [7, 1_000, 20_000, 830_000])
def test_drawing_positions_draws_what_drawing_ids_draws(population):
    """`rng.choice(ids, k, replace=False)` draws positions and indexes `ids` with them (Floyd's algorithm for
    small k, a tail shuffle above 1/50 of a population over 10,000): drawing the positions alone and taking
    the ids at them is the same draw, and the default selection and overselect's are unchanged."""
    ids = np.sort(np.random.default_rng(population).choice(2 * population, population, replace=False))
    mask = np.zeros(2 * population, dtype=bool)
    mask[ids] = True
    pools = [MaskCandidates(CountedMask(mask)), ArrayCandidates(ids)]
    for k in sorted({1, min(100, population - 1), population // 50 + 1, population - 1}):
        for seed in range(3):
            old = np.sort(np.random.default_rng(seed).choice(ids, size=k, replace=False))
            assert np.array_equal(ids[np.random.default_rng(seed).choice(population, size=k, replace=False)],
                                  np.random.default_rng(seed).choice(ids, size=k, replace=False))
            for pool in pools:
                assert np.array_equal(Wait().select(pool, k, np.random.default_rng(seed)), old)
                assert np.array_equal(np.sort(np.random.default_rng(seed).choice(pool, size=k, replace=False)), old)
    assert np.array_equal(Wait().select(pools[0], None, np.random.default_rng(0)), ids)
    over = Overselect(fraction=1.5)
    k = min(60, population // 2)
    n = math.ceil(1.5 * k - 1e-9)
    old = np.sort(np.random.default_rng(5).choice(ids, size=min(n, population), replace=False))
    assert np.array_equal(over.select(pools[0], k, np.random.default_rng(5)), old)


@pytest.mark.parametrize("make", ["array", "mask"])
def test_candidates_read_as_the_array_of_their_ids(make):
    """A policy written for an array of ids (indexing, masks, slices, iteration, size) reads the same ids."""
    cls = np.arange(3_000) % 3
    if make == "array":
        ids = np.flatnonzero(np.arange(3_000) % 7 != 2)
        pool = ArrayCandidates(ids)
    else:
        avail = RenewalAvailability(cls, SPECS, np.random.default_rng(4))
        pool = avail.candidates(30.0)
        ids = np.flatnonzero(avail.online_mask(np.arange(3_000), 30.0))
    assert pool.size == len(pool) == ids.size and pool.shape == ids.shape
    assert pool[5] == ids[5] and pool[-1] == ids[-1]
    assert np.array_equal(pool[[0, 7, 3]], ids[[0, 7, 3]])
    assert np.array_equal(pool[np.array([4, 4, 1])], ids[[4, 4, 1]])
    assert np.array_equal(pool[:9], ids[:9]) and np.array_equal(pool[ids % 2 == 0], ids[ids % 2 == 0])
    assert list(pool)[:5] == ids[:5].tolist()
    assert np.array_equal(np.sort(np.random.default_rng(1).choice(pool, 10, replace=False)),
                          np.sort(np.random.default_rng(1).choice(ids, 10, replace=False)))
    with pytest.raises(ValueError, match="copy"):
        pool.__array__(np.int32, copy=False)
