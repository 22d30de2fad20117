"""Availability churn: when each device is online, and a SimPy process announcing every switch.

Two sources, one interface (`Availability`):

* `RenewalAvailability`: per device class, alternating online/offline durations drawn from
  `fedsim.distributions.Dist` (an alternating renewal process). Online intervals are half-open
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

`churn(env, availability, device_ids, on_switch)` is one process for any number of devices, with a heap
of their next switch times; watching only the current round's participants keeps it cheap.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import heapq
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import simpy

from fedsim.distributions import Dist, DistKind, read_dist
from fedsim.errors import DataError, ScenarioFileError
from fedsim.fields import Fields, printable

__all__ = [
    "InitialState", "ChurnSpec", "read_churn_spec", "read_availability_file", "check_availability_file",
    "Availability", "AlwaysOnline",
    "RenewalAvailability", "TraceAvailability", "build_availability", "load_availability_trace", "churn",
]


class InitialState(enum.Enum):
    STATIONARY = "stationary"   # as if the process had run forever: P(online) = E[on] / (E[on] + E[off])
    ONLINE = "online"           # a fresh online period starts at t = 0
    OFFLINE = "offline"         # a fresh offline period starts at t = 0


@dataclass(frozen=True)
class ChurnSpec:
    on_s: Dist
    off_s: Dist
    initial: InitialState
    online_prob: float | None = None   # STATIONARY only: P(online at t = 0) instead of the mean ratio

    @property
    def stationary_online_prob(self) -> float:
        return self.on_s.mean / (self.on_s.mean + self.off_s.mean)


def read_churn_spec(fields: Fields, key: str) -> ChurnSpec | None:
    """`key = { on_s = DIST, off_s = DIST, initial = "stationary" | "online" | "offline" | P }`; None if absent.

    A number P in [0, 1] for `initial` starts online with probability P, in a stationary residual period.
    """
    if fields.raw(key, None) is None:
        return None
    sub = fields.sub(key)
    on_s, off_s = read_dist(sub, "on_s"), read_dist(sub, "off_s")
    raw = sub.raw("initial", InitialState.STATIONARY.value)
    prob = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        initial, prob = InitialState.STATIONARY, sub.number("initial", low=0.0, high=1.0)
    else:
        initial = InitialState(sub.choice("initial", [s.value for s in InitialState], raw))
    sub.finish()
    return ChurnSpec(on_s, off_s, initial, prob)


def read_availability_file(fields: Fields, key: str, base_dir: Path | None = None) -> Path | None:
    """A fleet-level `key = "intervals.csv"` (or .parquet); relative paths fall back to `base_dir`."""
    path = fields.existing_path(key, base_dir, kind="file", what="availability file", default=None)
    if path is None:
        return None
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise fields.error(key, f"must be a .csv or .parquet file, got {str(path)!r}")
    return path


def check_availability_file(fields: Fields, key: str, path: Path, n_devices: int) -> TraceAvailability:
    """Read and validate the file of `key` for a fleet of `n_devices`; a bad file is a ScenarioFileError
    naming the scenario, the field, then the file and its row."""
    try:
        return load_availability_trace(path, n_devices)
    except DataError as exc:
        raise ScenarioFileError(fields.source, fields.field(key), printable(str(exc))) from None


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
        """Ids of the devices online at `at`, ascending: the server's selection pool."""
        return np.flatnonzero(self.online_mask(np.arange(self.n_devices), at))


class AlwaysOnline(Availability):
    def __init__(self, n_devices: int):
        self.n_devices = int(n_devices)

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
        if back.size:   # asked about the past: replay those devices from t = 0 (same stream, same result)
            self._start(back)
        todo = devices[self._next_at[devices] <= at]
        while todo.size:
            self._online[todo] = ~self._online[todo]
            self._last_at[todo] = self._next_at[todo]
            self._next_at[todo] = self._last_at[todo] + self._periods(todo)
            self._drawn[todo] += 1
            todo = todo[self._next_at[todo] <= at]

    def online_mask(self, devices, at):
        devices = np.asarray(devices, dtype=np.int64)
        self._advance(devices, at)
        return self._online[devices].copy()

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

    def next_switches(self, devices, after_at):
        devices = np.asarray(devices, dtype=np.int64)
        passed = self._passed(devices, after_at)
        index = self.ptr[devices] + passed
        has = index < self.ptr[devices + 1]
        switch_at = np.full(len(devices), math.inf)
        switch_at[has] = self.bounds[index[has]]
        return switch_at, passed % 2 == 0


_COLUMNS = ("device", "start_s", "end_s")


def _read_table(path: Path, data: bytes, csv: bool):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not data:
        raise DataError(f"{path}: empty file, expected " + ("a header line device,start_s,end_s" if csv
                                                            else "a Parquet file"))
    if csv:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise DataError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line}") from None
    try:
        # Only empty fields are missing: "nan" must reach the finiteness check, not become a null.
        if csv:
            return pacsv.read_csv(pa.BufferReader(data), convert_options=pacsv.ConvertOptions(null_values=[""]))
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        detail = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise DataError(f"{path}: cannot read the availability file: {detail}") from None


def _read_columns(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], Callable[[int], str]]:
    import pyarrow as pa

    csv = path.suffix.lower() == ".csv"
    where = (lambda i: f"row {i + 1} (line {i + 2})") if csv else (lambda i: f"row {i + 1}")
    table = _read_table(path, data, csv)
    try:
        return _columns(path, table, where), where
    except (pa.ArrowException, UnicodeDecodeError) as exc:      # a damaged Parquet file: names, values
        detail = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise DataError(f"{path}: cannot read the availability file: {detail}") from None


def _columns(path: Path, table, where: Callable[[int], str]) -> dict[str, np.ndarray]:
    import pyarrow as pa

    names = table.column_names
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        found = ", ".join(printable(repr(n)) for n in names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {found or 'none'}")
    twice = [c for c in _COLUMNS if names.count(c) > 1]
    if twice:
        raise DataError(f"{path}: column {twice[0]} appears {names.count(twice[0])} times")
    columns: dict[str, np.ndarray] = {}
    for name in _COLUMNS:
        col = table.column(name)
        if col.null_count:
            i = next(i for i, v in enumerate(col.to_pylist()) if v is None)
            raise DataError(f"{path}: {where(i)}: {name}: missing value")
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
            columns[name] = col.cast(pa.float64(), safe=False).to_numpy()
            continue
        values = col.to_pylist()
        numbers = np.empty(len(values))
        for i, v in enumerate(values):   # not a numeric column: only text that reads as a number is accepted
            try:
                if not isinstance(v, str):
                    raise TypeError
                numbers[i] = float(v)
            except (TypeError, ValueError):
                shown = printable(repr(v))
                shown = shown if len(shown) <= 60 else shown[:60] + "..."
                raise DataError(f"{path}: {where(i)}: {name}: not a number, got {shown}") from None
        columns[name] = numbers
    return columns


# The server reads the file the scenario check has already read: the last few results are kept, keyed by
# the file's content, so the second read is free and a changed file is read again. TraceAvailability is
# read-only, so the object can be shared.
_CACHE: dict[tuple[str, int, str], TraceAvailability] = {}
_CACHE_SIZE = 4


def load_availability_trace(path: str | Path, n_devices: int) -> TraceAvailability:
    """Read and validate ONLINE intervals; every problem is a DataError naming the file and the row.

    Rules: columns `device`, `start_s`, `end_s` (others ignored); device ids integers in [0, n_devices);
    times finite, >= 0 (simulated time starts at 0), with start_s < end_s; each device's rows sorted by start
    and not overlapping (they need not be grouped). Touching intervals (end == next start) are merged.
    Devices absent are never online. A CSV file must be UTF-8 text.
    """
    path = Path(path)
    shown = printable(str(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"{shown}: no such availability file") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: is a directory, expected an availability file") from None
    except OSError as exc:
        raise DataError(f"{shown}: cannot read the availability file: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{shown}: cannot read the availability file: {exc}") from None
    key = (str(path.resolve()), int(n_devices), hashlib.sha256(data).hexdigest())
    if key in _CACHE:
        return _CACHE[key]
    trace = _parse_trace(Path(shown), data, int(n_devices))
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = trace
    return trace


def _parse_trace(path: Path, data: bytes, n_devices: int) -> TraceAvailability:
    cols, where = _read_columns(path, data)
    device, start, end = cols["device"], cols["start_s"], cols["end_s"]
    if device.size == 0:
        raise DataError(f"{path}: no intervals: nobody would ever be online")

    def fail(mask: np.ndarray, message: Callable[[int], str]) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(f"{path}: {where(i)}: {message(i)}")

    fail(~np.isfinite(device) | (device != np.round(device)),
         lambda i: f"device: not an integer id, got {float(device[i])!r}")
    fail((device < 0) | (device >= n_devices),
         lambda i: f"device: id {float(device[i]):.0f} out of range (the fleet has {n_devices} devices: "
                   f"0..{n_devices - 1})")
    for name, values in (("start_s", start), ("end_s", end)):
        fail(~np.isfinite(values), lambda i, n=name, v=values: f"{n}: must be a finite number, got {float(v[i])!r}")
        fail(values < 0, lambda i, n=name, v=values: f"{n}: must be >= 0 (simulated time starts at 0), "
                                                     f"got {float(v[i])!r}")
    fail(start >= end, lambda i: f"start_s {float(start[i])!r} must be before end_s {float(end[i])!r}")
    ids = device.astype(np.int64)
    order = np.argsort(ids, kind="stable")        # by device, file order within a device
    d, s, e = ids[order], start[order], end[order]
    same = d[1:] == d[:-1]
    bad = same & (s[1:] < e[:-1])
    if bad.any():
        candidates = np.flatnonzero(bad)
        k = int(candidates[np.argmin(order[candidates + 1])])   # the earliest offending row in file order
        i, prev = int(order[k + 1]), int(order[k])
        raise DataError(f"{path}: {where(i)}: device {int(d[k])}'s interval [{float(s[k + 1])!r}, "
                        f"{float(e[k + 1])!r}) starts before the end of its previous interval [{float(s[k])!r}, "
                        f"{float(e[k])!r}) at {where(prev)}; each device's intervals must be sorted by start "
                        "and must not overlap")
    keep_start = np.concatenate([[True], ~(same & (s[1:] == e[:-1]))])   # merge touching intervals
    keep_end = np.concatenate([keep_start[1:], [True]])
    return TraceAvailability(n_devices, d[keep_start], s[keep_start], e[keep_end], source=str(path))


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
