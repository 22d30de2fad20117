"""The availability of a device class (`availability = { on_s, off_s, initial }`) and of a fleet
(`availability_file`): their fields, and the availability file read and validated into online intervals.

The online/offline processes they drive are fedsim.world.churn.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedsim.errors import DataError, ScenarioFileError
from fedsim.spec.distributions import Dist, read_dist
from fedsim.spec.fields import Fields, printable

__all__ = ["InitialState", "ChurnSpec", "read_churn_spec", "read_availability_file", "check_availability_file",
           "AvailabilityIntervals", "read_intervals"]


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


def check_availability_file(fields: Fields, key: str, path: Path, n_devices: int) -> AvailabilityIntervals:
    """Read and validate the file of `key` for a fleet of `n_devices`; a bad file is a ScenarioFileError
    naming the scenario, the field, then the file and its row."""
    try:
        return read_intervals(path, n_devices)
    except DataError as exc:
        raise ScenarioFileError(fields.source, fields.field(key), printable(str(exc))) from None


@dataclass(frozen=True, eq=False)
class AvailabilityIntervals:
    """Validated ONLINE intervals of a fleet: sorted by (device, start), non-overlapping, not touching.
    `source`: the file they were read from, for messages."""
    n_devices: int
    device: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    source: str | None = None


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
# the file's content, so the second read is free and a changed file is read again. AvailabilityIntervals
# are read-only, so the object can be shared.
_CACHE: dict[tuple[str, int, str], AvailabilityIntervals] = {}
_CACHE_SIZE = 4


def read_intervals(path: str | Path, n_devices: int) -> AvailabilityIntervals:
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
    trace = _parse_intervals(Path(shown), data, int(n_devices))
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = trace
    return trace


def _parse_intervals(path: Path, data: bytes, n_devices: int) -> AvailabilityIntervals:
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
    return AvailabilityIntervals(n_devices, d[keep_start], s[keep_start], e[keep_end], source=str(path))
