"""The trace contract: the Parquet schemas of a run directory, in one place, and their writer.

A run directory holds `events.parquet`, `rounds.parquet` and `devices.parquet`. Columns carry their unit
in the name. Every file's key-value metadata holds the schema version, the scenario text and overrides,
the seed and the fedsim and torch versions, so any trace can be re-run. Rows are buffered as columns
and written as a Parquet row group every `flush_rows` rows and at the end of each round.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["EventKind", "DeviceStatus", "SCHEMA_VERSION", "EVENTS_SCHEMA", "ROUNDS_SCHEMA",
           "DEVICES_SCHEMA", "TableWriter", "TraceWriter", "SERVER"]

SCHEMA_VERSION = "1"
SERVER = -1          # the `device` value of server-side events


class EventKind(enum.Enum):
    ROUND_START = "round_start"
    DOWNLOAD_START = "download_start"
    DOWNLOAD_END = "download_end"
    FORWARD_END = "forward_end"
    BACKWARD_END = "backward_end"      # `layer` is the layer whose gradient is now complete
    UPLOAD_START = "upload_start"
    UPLOAD_END = "upload_end"          # the layer's gradient has fully arrived at the server
    CUT = "cut"                        # the deadline stopped the device; energy of the unfinished phase
    OFFLINE = "offline"                # churn: the device left mid-round; energy of the unfinished phase
    STOPPED = "stopped"                # the round reached its quorum; energy of the unfinished phase
    DEADLINE = "deadline"
    ROUND_END = "round_end"


class DeviceStatus(enum.Enum):
    COMPLETE = "complete"      # delivered every layer
    PARTIAL = "partial"        # delivered some of the last layers
    NOTHING = "nothing"        # delivered no layer before the deadline
    OFFLINE = "offline"        # went offline mid-round; only what was delivered before counts


_EVENT_NAMES = [k.value for k in EventKind]
_STATUS_NAMES = [s.value for s in DeviceStatus]

EVENTS_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("time_s", pa.float64()),          # simulated time of the event
    ("device", pa.int32()),            # -1 for the server
    ("event", pa.dictionary(pa.int8(), pa.string())),
    ("layer", pa.int16()),             # forward index of the layer, -1 if none
    ("bytes", pa.int64()),             # bytes moved by a transfer that ends here
    ("energy_j", pa.float64()),        # energy spent by the phase that ends here
])

DEVICES_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("device", pa.int32()),
    ("class", pa.string()),
    ("status", pa.dictionary(pa.int8(), pa.string())),
    ("depth", pa.int16()),              # layers delivered (the last `depth` layers)
    ("layers_computed", pa.int16()),    # layers whose backward finished, delivered or not
    ("samples", pa.int32()),            # samples per local step
    ("speed_flops", pa.float64()),      # effective FLOP/s in this round (base / slowdown)
    ("download_s", pa.float64()),
    ("compute_s", pa.float64()),
    ("upload_s", pa.float64()),
    ("idle_s", pa.float64()),
    ("energy_download_j", pa.float64()),
    ("energy_compute_j", pa.float64()),
    ("energy_upload_j", pa.float64()),
    ("energy_idle_j", pa.float64()),
    ("energy_j", pa.float64()),
])

ROUNDS_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("policy", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("duration_s", pa.float64()),
    ("participants", pa.int32()),
    ("delivered_any", pa.int32()),      # participants that delivered at least one layer
    ("completed", pa.int32()),          # participants that delivered every layer
    ("contributors", pa.list_(pa.int32())),   # per layer (forward order): devices aggregated into it
    ("train_loss", pa.float64()),       # mean mini-batch loss of the contributing devices (before update)
    ("test_loss", pa.float64()),        # null when the round was not evaluated
    ("test_accuracy", pa.float64()),
    ("energy_j", pa.float64()),         # fleet energy of the round, all phases
])


def _to_array(values: list, typ: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(typ):
        return pa.array(values, pa.string()).dictionary_encode().cast(typ)
    return pa.array(values, typ)


class TableWriter:
    """Column buffers for one table, written as Parquet row groups."""

    def __init__(self, path: Path, schema: pa.Schema, metadata: dict[str, str], flush_rows: int = 65_536):
        self.path = path
        self.schema = schema.with_metadata(metadata)
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self.flush_rows = flush_rows
        self._writer: pq.ParquetWriter | None = None
        self.rows_written = 0

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def append(self, row: dict[str, Any]) -> None:
        for name, col in self.columns.items():
            col.append(row[name])
        if len(self) >= self.flush_rows:
            self.flush()

    def extend(self, **cols: list) -> None:
        for name, col in self.columns.items():
            col.extend(cols[name])
        if len(self) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        n = len(self)
        if n == 0:
            return
        arrays = [_to_array(self.columns[f.name], f.type) for f in self.schema]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.rows_written += n
        for col in self.columns.values():
            col.clear()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TraceWriter:
    """The three tables of a run directory."""

    def __init__(self, run_dir: Path, metadata: dict[str, str]):
        meta = {"fedsim.schema_version": SCHEMA_VERSION, **metadata}
        self.events = TableWriter(run_dir / "events.parquet", EVENTS_SCHEMA, meta)
        self.devices = TableWriter(run_dir / "devices.parquet", DEVICES_SCHEMA, meta)
        self.rounds = TableWriter(run_dir / "rounds.parquet", ROUNDS_SCHEMA, meta)

    def event(self, round_: int, time_s: float, device: int, kind: EventKind, layer: int = -1,
              nbytes: int = 0, energy_j: float = 0.0) -> None:
        cols = self.events.columns
        cols["round"].append(round_)
        cols["time_s"].append(time_s)
        cols["device"].append(device)
        cols["event"].append(kind.value)
        cols["layer"].append(layer)
        cols["bytes"].append(nbytes)
        cols["energy_j"].append(energy_j)

    def end_round(self) -> None:
        """Called once per round: a crash loses at most the round in flight."""
        for table in (self.events, self.devices, self.rounds):
            table.flush()

    def close(self) -> None:
        for table in (self.events, self.devices, self.rounds):
            table.close()
