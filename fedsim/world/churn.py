"""Availability churn: when each device is online, and a SimPy process announcing every switch.

Two sources, one interface (`Availability`):

* `RenewalAvailability`: per device class, alternating online/offline durations drawn from
  `fedsim.spec.distributions.Dist` (an alternating renewal process). Online intervals are half-open
  `[switch_on, switch_off)`: at a switch time the device already has its new state.
* `TraceAvailability`: ONLINE intervals read from a CSV or Parquet file (`device, start_s, end_s`);
  a device is offline outside its intervals (before the first and after the last one).

Scale and determinism. A fleet of 100,000 devices holds four flat arrays of state (online, next switch,
last switch, durations drawn) and no per-device Python object, process or Generator (100,000 numpy
Generators cost about 5 s and 90 MB here). A device's state is advanced lazily and vectorised, only when
it is asked about. Its k-th duration is a pure function of (key, device, k): a counter-based stream
(SplitMix64 mixing of a counter, the construction of Java's SplittableRandom) keyed by 64 bits drawn
once from the injected Generator. So a device's sequence does not depend on who else was asked about,
on the query times, or on how many rounds the run has: a longer run replays the same switches first.
A round's selection pool (`candidates`) is kept event by event: a calendar names the devices whose switch
is due (`fedsim.world.switch_calendar`) and block counts of the online flags find the K drawn without
listing the online devices (`fedsim.world.counted_mask`, `fedsim.world.candidates`).

`churn(env, availability, device_ids, on_switch)` is one process for any number of devices, with a heap
of their next switch times; watching only the current round's participants keeps it cheap.
"""

from __future__ import annotations

import abc
import heapq
import math
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import simpy

from fedsim.spec.availability import ChurnSpec, InitialState, read_intervals
from fedsim.spec.distributions import Dist, DistKind
from fedsim.world.candidates import ArrayCandidates, Candidates, MaskCandidates
from fedsim.world.counted_mask import CountedMask
from fedsim.world.switch_calendar import SwitchCalendar

__all__ = ["Availability", "AlwaysOnline", "RenewalAvailability", "TraceAvailability", "build_availability",
           "load_availability_trace", "churn"]


# -- the interface -------------------------------------------------------------------------------------------

class Availability(abc.ABC):
    """Who is online when. Query times may go back and forth (the renewal source replays if needed)."""

    n_devices: int

    @abc.abstractmethod
    def online_mask(self, devices: np.ndarray, at: float) -> np.ndarray:
        """Bool array: is each of `devices` online at time `at`."""

    @abc.abstractmethod
    def next_switches(self, devices: np.ndarray, after_at: float) -> tuple[np.ndarray, np.ndarray]:
        """For each device, the first switch strictly after `after_at` (inf if none) and the state it
        switches to, which is always the opposite of the state at `after_at` (on and off alternate)."""

    def is_online(self, device: int, at: float) -> bool:
        return bool(self.online_mask(np.array([device]), at)[0])

    def online_devices(self, at: float) -> np.ndarray:
        """Ids of the devices online at `at`, ascending."""
        return np.flatnonzero(self.online_mask(np.arange(self.n_devices), at))

    def candidates(self, at: float) -> Candidates:
        """The devices online at `at` as the server's selection pool (valid until the next query)."""
        return ArrayCandidates(self.online_devices(at))


class AlwaysOnline(Availability):
    def __init__(self, n_devices: int):
        self.n_devices = int(n_devices)
        self._everyone: np.ndarray | None = None

    def online_devices(self, at: float) -> np.ndarray:
        """Every device, as one read-only int64 array made once: a round's selection pool costs nothing
        however large the fleet is."""
        if self._everyone is None:
            self._everyone = np.arange(self.n_devices, dtype=np.int64)
            self._everyone.flags.writeable = False
        return self._everyone

    def online_mask(self, devices, at):
        return np.ones(len(devices), dtype=bool)

    def next_switches(self, devices, after_at):
        return np.full(len(devices), math.inf), np.zeros(len(devices), dtype=bool)


# -- counter-based uniforms -------------------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(key: np.uint64, counter: np.ndarray) -> np.ndarray:
    """SplitMix64's output number `counter` (1-based) from seed `key`: a bijective mix of key + counter * gamma."""
    z = key + counter * _GAMMA          # uint64 arithmetic wraps modulo 2^64, as SplitMix64 needs
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _uniforms(key: np.uint64, devices: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uniforms in (0, 1) for each (device, draw index < 2^31): counters 2 * index and 2 * index + 1
    of the device's stream, 53 high bits each, offset by half a step so that log() is finite."""
    counter = (devices.astype(np.uint64) << np.uint64(32)) | (index.astype(np.uint64) * np.uint64(2))
    z = _splitmix64(key, np.concatenate([counter, counter | np.uint64(1)]))
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return u[: counter.size], u[counter.size:]


def _normal(u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    return np.sqrt(-2.0 * np.log(u0)) * np.cos(2.0 * np.pi * u1)   # Box-Muller


def _sample(dist: Dist, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    if dist.kind is DistKind.FIXED:
        return np.full(u0.shape, dist.a)
    if dist.kind is DistKind.UNIFORM:
        return dist.a + (dist.b - dist.a) * u0
    if dist.kind is DistKind.LOGNORMAL:
        return dist.a * np.exp(dist.b * _normal(u0, u1))
    return -dist.a * np.log(u0)


def _sample_length_biased(dist: Dist, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    """A period length as seen from a random instant (density x f(x) / E[X]): the period the
    stationary process is in at t = 0. Closed forms for every `DistKind`."""
    if dist.kind is DistKind.FIXED:
        return np.full(u0.shape, dist.a)
    if dist.kind is DistKind.UNIFORM:
        return np.sqrt(dist.a**2 + u0 * (dist.b**2 - dist.a**2))
    if dist.kind is DistKind.LOGNORMAL:
        return dist.a * np.exp(dist.b**2 + dist.b * _normal(u0, u1))
    return -dist.a * (np.log(u0) + np.log(u1))   # Gamma(2, mean)


# Draw indices of a device's stream: 0 initial state and residual fraction, 1 the length-biased period,
# 2 + k the k-th full period.
_FIRST_PERIOD = 2


class RenewalAvailability(Availability):
    """Alternating on/off periods per device; classes with spec None are always online."""

    def __init__(self, class_of: np.ndarray, specs: Sequence[ChurnSpec | None], rng: np.random.Generator):
        self.class_of = np.asarray(class_of, dtype=np.int64)
        self.specs = tuple(specs)
        self.n_devices = int(self.class_of.shape[0])
        self._key = np.uint64(rng.integers(0, 2**64, dtype=np.uint64))
        self._online = np.ones(self.n_devices, dtype=bool)
        self._next_at = np.full(self.n_devices, math.inf)
        self._last_at = np.full(self.n_devices, -math.inf)   # time of the last switch
        self._drawn = np.zeros(self.n_devices, dtype=np.int64)  # full periods drawn so far
        self._start(np.arange(self.n_devices))
        # the online set, event-driven (candidates): the latest time asked about, and the online flags' block
        # counts with the calendar of next switches, both told by `_advance` of every device it changes; made at
        # the first `candidates` (a run that only asks about devices, as the asynchronous one, needs neither)
        self._asked_at = -math.inf
        self._pool: tuple[CountedMask, SwitchCalendar] | None = None

    def _start(self, devices: np.ndarray) -> None:
        """State at t = 0 for `devices` (also used to replay them from the start)."""
        self._last_at[devices] = -math.inf
        self._drawn[devices] = 0
        cls = self.class_of[devices]
        for c, spec in enumerate(self.specs):
            d = devices[cls == c]
            if spec is None or d.size == 0:
                if d.size:
                    self._online[d], self._next_at[d] = True, math.inf
                continue
            if spec.initial is InitialState.STATIONARY:
                p = spec.stationary_online_prob if spec.online_prob is None else spec.online_prob
                zero = np.zeros(d.size, dtype=np.int64)
                state_u, residual_u = _uniforms(self._key, d, zero)
                online = state_u < p
                u0, u1 = _uniforms(self._key, d, zero + 1)
                period = np.where(online, _sample_length_biased(spec.on_s, u0, u1),
                                  _sample_length_biased(spec.off_s, u0, u1))
                self._online[d] = online
                self._next_at[d] = residual_u * period   # the residual of that period
            else:
                self._online[d] = spec.initial is InitialState.ONLINE
                self._next_at[d] = self._periods(d)
                self._drawn[d] = 1

    def _periods(self, devices: np.ndarray) -> np.ndarray:
        """The next full period of each device, of the kind of its current state."""
        out = np.empty(len(devices))
        index = self._drawn[devices] + _FIRST_PERIOD
        u0, u1 = _uniforms(self._key, devices, index)
        cls, online = self.class_of[devices], self._online[devices]
        for c, spec in enumerate(self.specs):
            if spec is None:
                continue
            for state, dist in ((True, spec.on_s), (False, spec.off_s)):
                mask = (cls == c) & (online == state)
                if mask.any():
                    out[mask] = _sample(dist, u0[mask], u1[mask])
        return out

    def _advance(self, devices: np.ndarray, at: float) -> None:
        devices = np.asarray(devices, dtype=np.int64)
        if devices.size > 1:
            devices = np.unique(devices)   # repeated ids would be advanced as one anyway; keep it explicit
        back = devices[self._last_at[devices] > at]
        was_online = None if self._pool is None else self._online[devices]
        if back.size:   # asked about the past: replay those devices from t = 0 (same stream, same result)
            self._start(back)
        self._asked_at = max(self._asked_at, at)
        todo = devices[self._next_at[devices] <= at]
        moved = np.union1d(back, todo) if back.size else todo
        while todo.size:
            self._online[todo] = ~self._online[todo]
            self._last_at[todo] = self._next_at[todo]
            self._next_at[todo] = self._last_at[todo] + self._periods(todo)
            self._drawn[todo] += 1
            todo = todo[self._next_at[todo] <= at]
        if was_online is not None and moved.size:   # the online set's counts and the calendar of switches follow
            online_count, calendar = self._pool
            online_count.flipped(devices[self._online[devices] != was_online])
            calendar.moved(moved)

    def online_mask(self, devices, at):
        devices = np.asarray(devices, dtype=np.int64)
        self._advance(devices, at)
        return self._online[devices].copy()

    def candidates(self, at: float) -> Candidates:
        """The online devices, kept event by event: going forward in time, only the devices the calendar names
        as due are advanced, and the online flags' block counts follow them, so neither finding who switched nor
        drawing K of the online devices looks at the whole fleet. A time before one already asked about replays
        the fleet (the general path)."""
        if at < self._asked_at:
            return ArrayCandidates(super().online_devices(at))
        if self._pool is None:
            self._pool = CountedMask(self._online), SwitchCalendar(self._next_at)
        online_count, calendar = self._pool
        due = calendar.due(at)
        if due.size:
            self._advance(due, at)
        self._asked_at = at
        return MaskCandidates(online_count)

    def online_devices(self, at: float) -> np.ndarray:
        """The online ids (listed once per state of the online set: the same read-only array until a switch)."""
        return self.candidates(at).ids()

    def next_switches(self, devices, after_at):
        devices = np.asarray(devices, dtype=np.int64)
        self._advance(devices, after_at)
        return self._next_at[devices].copy(), ~self._online[devices]


def build_availability(class_of: np.ndarray, specs: Sequence[ChurnSpec | None],
                       rng: np.random.Generator) -> Availability:
    """Renewal churn for the classes that have a spec; AlwaysOnline if none has (no key is drawn then)."""
    if all(s is None for s in specs):
        return AlwaysOnline(len(class_of))
    return RenewalAvailability(class_of, specs, rng)


# -- trace-driven availability ---------------------------------------------------------------------------------------

class TraceAvailability(Availability):
    """Online intervals per device, as sorted boundaries `[s0, e0, s1, e1, ...]` in one flat array.

    Boundaries up to time t counted per device: odd means online (half-open intervals).
    """

    def __init__(self, n_devices: int, device: np.ndarray, start_s: np.ndarray, end_s: np.ndarray,
                 source: str | None = None):
        """`device`, `start_s`, `end_s`: intervals sorted by (device, start), non-overlapping, not touching.
        `source`: the file they were read from, for messages."""
        self.n_devices = int(n_devices)
        self.source = source
        self.last_online_s = float(np.max(end_s)) if len(end_s) else 0.0   # after this nobody is online
        self.bounds = np.column_stack([start_s, end_s]).reshape(-1).astype(np.float64)
        counts = np.bincount(np.asarray(device, dtype=np.int64), minlength=self.n_devices) * 2
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._times = np.unique(self.bounds)      # every switch time: the online set is constant in between
        self._ids_span = (math.inf, -math.inf)    # [from, until) in which `_ids` are the online devices
        self._ids: np.ndarray | None = None

    def _passed(self, devices: np.ndarray, at: float) -> np.ndarray:
        """Number of each device's boundaries <= at."""
        if len(devices) < 64:
            return np.array([np.searchsorted(self.bounds[self.ptr[d]:self.ptr[d + 1]], at, "right")
                             for d in devices], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(self.bounds <= at)])
        return cum[self.ptr[devices + 1]] - cum[self.ptr[devices]]

    def online_mask(self, devices, at):
        devices = np.asarray(devices, dtype=np.int64)
        return self._passed(devices, at) % 2 == 1

    def online_devices(self, at: float) -> np.ndarray:
        """The online ids, recomputed only when `at` is past another switch time than the last query's."""
        since, until = self._ids_span
        if not since <= at < until:
            k = int(np.searchsorted(self._times, at, "right"))
            self._ids_span = (self._times[k - 1] if k else -math.inf, self._times[k] if k < self._times.size
                              else math.inf)
            self._ids = super().online_devices(at)
            self._ids.flags.writeable = False
        return self._ids

    def next_switches(self, devices, after_at):
        devices = np.asarray(devices, dtype=np.int64)
        passed = self._passed(devices, after_at)
        index = self.ptr[devices] + passed
        has = index < self.ptr[devices + 1]
        switch_at = np.full(len(devices), math.inf)
        switch_at[has] = self.bounds[index[has]]
        return switch_at, passed % 2 == 0


# The server reads the file the scenario check has already read (fedsim.spec.availability keeps the last few
# reads): the intervals read once become one TraceAvailability, read-only and shared.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_availability_trace(path: str | Path, n_devices: int) -> TraceAvailability:
    """The availability of the ONLINE intervals of a file; a bad file is a DataError naming the file and the
    row (the rules: fedsim.spec.availability.read_intervals)."""
    intervals = read_intervals(path, n_devices)
    trace = _TRACES.get(intervals)
    if trace is None:
        trace = TraceAvailability(intervals.n_devices, intervals.device, intervals.start_s, intervals.end_s,
                                  source=intervals.source)
        _TRACES[intervals] = trace
    return trace


# -- the process ------------------------------------------------------------------------------------------------------

def churn(env: simpy.Environment, availability: Availability, device_ids,
          on_switch: Callable[[list[int], list[bool]], None]):
    """Call `on_switch(devices, online)` at each instant some of `device_ids` switch, after `env.now`.

    `devices` are the devices switching at that instant (ascending id), `online` the state each enters.
    Everything else already due at that instant happens first: a phase that ends exactly when its device
    leaves is complete, as one that ends exactly at a round's deadline is. One process and one heap for
    all the devices: one wake-up per distinct switch time. Interrupt the process to stop watching.
    """
    devices = np.unique(np.asarray(device_ids, dtype=np.int64))
    switch_at, _ = availability.next_switches(devices, env.now)
    heap = [(float(t), int(d)) for t, d in zip(switch_at, devices) if t < math.inf]
    heapq.heapify(heap)
    try:
        while heap:
            at = heap[0][0]
            yield env.timeout(at - env.now)
            yield env.timeout(0)       # after the events scheduled earlier for this instant
            batch = []
            while heap and heap[0][0] == at:
                batch.append(heapq.heappop(heap)[1])
            # One vectorised call: the state each device enters now is the opposite of the one it enters next.
            next_at, next_online = availability.next_switches(np.array(batch, dtype=np.int64), at)
            on_switch(batch, [not online for online in next_online.tolist()])
            for t, d in zip(next_at, batch):
                if t < math.inf:
                    heapq.heappush(heap, (float(t), d))
    except simpy.Interrupt:
        return
