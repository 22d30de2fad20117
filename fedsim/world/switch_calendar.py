"""The devices whose next switch is due, found without looking at the whole fleet.

`SwitchCalendar` reads an array of next-switch times it does not own (the owner changes entries in place and
then says which devices moved). It holds, sorted by time, an entry for every device whose next switch is at
most `until_at`, the end of a window that holds about `WINDOW_FRACTION` of the fleet (all of it for a small
fleet). `due(at)` hands out the entries up to `at` in one binary search; only when `at` is past the window is
the fleet looked at again, to lay out the next window. A device that moved within the window gets a new entry
(a switch drawn soon after the last one, or a device replayed from the start), first in a small unsorted
list of late entries (merged into the sorted ones once it holds `WINDOW_MIN`), so a move costs O(1) arrays and
not a copy of the window; its old entry stays and comes out as well, so `due` may name a device that is not
due any more: the owner checks (`next <= at`), as it must for repeated ids anyway. Every device due is named,
whichever order the queries and the moves come in.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SwitchCalendar", "WINDOW_FRACTION", "WINDOW_MIN"]

WINDOW_FRACTION = 1 / 16    # a window holds about this share of the fleet's devices ...
WINDOW_MIN = 1024           # ... and at least this many (a smaller fleet is held whole); also the late list's size

_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False


class SwitchCalendar:
    """Entries (time, device) sorted by time, for every device whose next switch is at most `until_at`."""

    def __init__(self, next_at: np.ndarray):
        self._next_at = next_at
        self._window = max(WINDOW_MIN, int(next_at.size * WINDOW_FRACTION))
        self.until_at = -math.inf       # no window laid out yet: the first `due` lays one
        self._times = np.zeros(0)
        self._devices = _NONE
        self._late_times: list[np.ndarray] = []      # entries of moves, unsorted
        self._late_devices: list[np.ndarray] = []
        self._late_count = 0
        self._late_first_at = math.inf                 # the soonest late entry

    def due(self, at: float) -> np.ndarray:
        """The devices with an entry at or before `at` (entries handed out are dropped): a superset of the
        devices whose next switch is at or before `at`, unsorted, possibly repeated."""
        if at > self.until_at:
            self._lay_window(at)
        n = int(np.searchsorted(self._times, at, side="right"))
        out = self._devices[:n]
        self._times, self._devices = self._times[n:], self._devices[n:]
        if self._late_first_at <= at:
            times, devices = self._late()
            now = times <= at
            out = np.concatenate([out, devices[now]])
            self._keep_late(times[~now], devices[~now])
        return out

    def moved(self, devices: np.ndarray) -> None:
        """`devices`' next switch times changed: an entry for each that now falls in the window."""
        devices = np.asarray(devices, dtype=np.int64)
        at = self._next_at[devices]
        inside = (at <= self.until_at) & (at < math.inf)
        if not inside.any():
            return
        at, devices = at[inside], devices[inside]
        self._late_times.append(at)
        self._late_devices.append(devices)
        self._late_count += at.size
        self._late_first_at = min(self._late_first_at, float(at.min()))
        if self._late_count >= WINDOW_MIN:      # into the sorted entries
            times, devices = self._late()
            order = np.argsort(times, kind="stable")
            where = np.searchsorted(self._times, times[order], side="right")
            self._times = np.insert(self._times, where, times[order])
            self._devices = np.insert(self._devices, where, devices[order])
            self._keep_late(np.zeros(0), _NONE)

    def _late(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._late_times), np.concatenate(self._late_devices)

    def _keep_late(self, times: np.ndarray, devices: np.ndarray) -> None:
        self._late_times, self._late_devices = [times], [devices]
        self._late_count = int(times.size)
        self._late_first_at = float(times.min(initial=math.inf))

    def _lay_window(self, at: float) -> None:
        """A window from the fleet's next switches: up to the `_window`-th soonest one, and at least `at`."""
        next_at = self._next_at
        finite = np.isfinite(next_at)
        n_finite = int(finite.sum())
        if n_finite > self._window:
            until = float(np.partition(next_at, self._window - 1)[self._window - 1])
        else:
            until = math.inf
        self.until_at = max(until, at)
        inside = np.flatnonzero(finite & (next_at <= self.until_at))
        order = np.argsort(next_at[inside], kind="stable")
        self._devices = inside[order]
        self._times = next_at[self._devices]
        self._keep_late(np.zeros(0), _NONE)       # the fleet as it is now: earlier entries are in or not needed
