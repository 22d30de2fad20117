"""The trace contract: the Parquet schemas of a run directory, in one place, and their writer.

A run directory holds `events.parquet`, `rounds.parquet` and `devices.parquet`. Columns carry their unit
in the name. Every file's key-value metadata holds the schema version, the scenario text and overrides,
the seed and the fedsim and torch versions, so any trace can be re-run. The same metadata, with typed
values, the scenario as resolved and its identity, is `trace.json` (JSON text, for readers that see
Parquet key-value metadata only as binary). Rows are buffered as columns,
journaled at least once per round (see `TableWriter`), and compacted to Parquet when the run completes
(the journals are removed only after the final status is written).
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.errors import TraceError
from fedsim.output.rundir import write_atomic

__all__ = ["EventKind", "DeviceStatus", "SCHEMA_VERSION", "EVENTS_SCHEMA", "ROUNDS_SCHEMA",
           "DEVICES_SCHEMA", "TableWriter", "TraceWriter", "SERVER", "read_journal", "TRACE_JSON"]

SCHEMA_VERSION = "1"
SERVER = -1          # the `device` value of server-side events
TRACE_JSON = "trace.json"


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
    STRAGGLER = "straggler"            # fleet.depth_model drew the device as a straggler; `layer`: the deepest it reaches
    DEADLINE = "deadline"
    ROUND_END = "round_end"
    UPDATE_APPLIED = "update_applied"      # async: the server took a step; `round` is the update index
    UPDATE_DISCARDED = "update_discarded"  # async: `device`'s update was staler than policy.max_staleness


class DeviceStatus(enum.Enum):
    COMPLETE = "complete"      # delivered every layer
    PARTIAL = "partial"        # delivered some of the last layers
    NOTHING = "nothing"        # delivered no layer before the deadline
    OFFLINE = "offline"        # went offline mid-round; only what was delivered before counts
    NONFINITE = "nonfinite"    # its update had NaN/Inf and was dropped (training.on_nonfinite = "drop")


_EVENT_NAMES = [k.value for k in EventKind]
_STATUS_NAMES = [s.value for s in DeviceStatus]


def category_column(names: Sequence[str] | pa.Array, positions: np.ndarray) -> pa.Array:
    """The strings `names[positions]` as an Arrow column, made without a Python string per row."""
    names = names if isinstance(names, pa.Array) else pa.array(list(names), pa.string())
    return names.take(pa.array(positions, pa.int64()))


def status_column(positions: np.ndarray) -> pa.Array:
    """devices.parquet statuses from positions in `DeviceStatus` (its members in definition order)."""
    return category_column(_STATUS_ARROW, positions)


_EVENT_NAMES_ARROW = pa.array(_EVENT_NAMES, pa.string())
_STATUS_ARROW = pa.array(_STATUS_NAMES, pa.string())

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
    ("deadline_s", pa.float64()),       # the round's deadline (null: none, or an asynchronous run)
    ("participants", pa.int32()),
    ("delivered_any", pa.int32()),      # participants that delivered at least one layer
    ("completed", pa.int32()),          # participants that delivered every layer
    ("contributors", pa.list_(pa.int32())),   # per layer (forward order): devices aggregated into it
    ("train_loss", pa.float64()),       # mean mini-batch loss of the contributing devices (before update)
    ("test_loss", pa.float64()),        # null when the round was not evaluated
    ("test_accuracy", pa.float64()),
    ("energy_j", pa.float64()),         # fleet energy of the round, all phases
    ("ended_by", pa.string()),          # last row only: the limit that ended the run (see TraceWriter.close)
])


def _plain(schema: pa.Schema) -> pa.Schema:
    """The journal's schema: dictionary columns as plain strings, so batches need no shared dictionary."""
    fields = [pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def read_journal(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """Every complete batch of an Arrow IPC stream journal; a batch cut short by a crash is ignored."""
    batches = []
    try:
        reader = pa.ipc.open_stream(pa.OSFile(str(path), "rb"))
        schema = reader.schema
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
    except (pa.ArrowInvalid, OSError, EOFError):
        pass                       # truncated by a crash: keep what was complete
    if schema is None:
        raise TraceError(f"{path}: not a readable trace journal")
    return pa.Table.from_batches(batches, schema=schema)


class TableWriter:
    """Column buffers for one table.

    While the run goes, every flush appends one record batch to an Arrow IPC stream journal
    (`events.arrows` next to `events.parquet`) and flushes it to the OS: unlike a Parquet file, whose
    footer is written last, a stream stays readable up to its last complete batch after a SIGKILL. When
    the run completes, the journal is compacted into the Parquet file (and removed once the run's final
    status is written).
    """

    def __init__(self, path: Path, schema: pa.Schema, metadata: dict[str, str], flush_rows: int = 65_536,
                 keep_rows: int | None = None):
        self.path = path
        self.schema = schema.with_metadata(metadata)
        self.journal = path.with_suffix(".arrows")
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self._batches: list[pa.RecordBatch] = []      # rows sealed as batches (arrays, and list rows before them),
                                                       # all before the rows still in `columns`
        self.flush_rows = flush_rows
        self._plain = _plain(self.schema)
        self.rows_written = 0
        if keep_rows is None:
            self._sink = pa.OSFile(str(self.journal), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self._plain)
        else:
            self._reopen(keep_rows)

    def _reopen(self, keep_rows: int) -> None:
        """Resuming: keep exactly the rows of the checkpointed rounds. The kept rows go to a new journal
        under a temporary name, which then replaces the old one: a crash at any instant leaves the old
        journal or the new one, never an emptied one. Writing goes on into the renamed file."""
        kept = read_journal(self.journal).slice(0, keep_rows) if keep_rows else None
        if keep_rows and kept.num_rows != keep_rows:
            raise TraceError(f"{self.journal}: has {kept.num_rows} rows, the checkpoint expects {keep_rows}")
        tmp = self.journal.with_name(f".{self.journal.name}.tmp")
        self._sink = pa.OSFile(str(tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._plain)
        if kept is not None and kept.num_rows:
            self._writer.write_table(kept.cast(self._plain))
            self.rows_written = kept.num_rows
        self._sink.flush()
        _fsync(tmp)
        os.replace(tmp, self.journal)

    def __len__(self) -> int:
        return sum(b.num_rows for b in self._batches) + len(next(iter(self.columns.values())))

    def _check(self, names: Any) -> None:
        if names.keys() != self.columns.keys():
            missing = sorted(self.columns.keys() - names.keys())
            extra = sorted(names.keys() - self.columns.keys())
            raise TraceError(f"{self.path.name}: a row with missing columns {missing} and extra columns {extra}")

    def append(self, row: dict[str, Any]) -> None:
        """One row; its keys must be exactly the table's columns."""
        self._check(row)
        for name, col in self.columns.items():
            col.append(row[name])
        if len(self) >= self.flush_rows:
            self.flush()

    def extend_arrays(self, **cols) -> None:
        """Rows given as arrays (numpy or Arrow), one per column; the names must be exactly the table's columns.
        They are kept as one record batch, after the rows buffered so far, until the next flush (no flush here:
        a round's rows are flushed together at its end)."""
        self._check(cols)
        self._seal()
        arrays = [pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                  else cols[f.name].cast(f.type) for f in self._plain]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._plain)
        if batch.num_rows:
            self._batches.append(batch)

    def _seal(self) -> None:
        """The rows buffered in `columns` as a record batch at the end of `_batches`."""
        if len(next(iter(self.columns.values()))):
            arrays = [pa.array(self.columns[f.name], f.type) for f in self._plain]
            self._batches.append(pa.RecordBatch.from_arrays(arrays, schema=self._plain))
            for col in self.columns.values():
                col.clear()

    def truncate(self, rows: int) -> None:
        """Forget the rows buffered after the first `rows` (rows already flushed stay)."""
        in_batches = sum(b.num_rows for b in self._batches)
        if rows >= in_batches:
            for col in self.columns.values():
                del col[rows - in_batches:]
            return
        for col in self.columns.values():
            col.clear()
        kept, left = [], rows
        for batch in self._batches:
            if left > 0:
                kept.append(batch.slice(0, min(left, batch.num_rows)))
            left -= batch.num_rows
        self._batches = kept

    def flush(self) -> None:
        n = len(self)
        if n == 0 or self._writer is None:
            return
        self._seal()
        for batch in self._batches:          # in order: the journal's rows are the table's rows
            self._writer.write_batch(batch)
        self._sink.flush()
        self.rows_written += n
        self._batches = []

    def close(self, complete: bool = True, last_row: dict[str, Any] | None = None) -> None:
        """Stop writing; if the run completed, write the Parquet file from the journal, with the values of
        `last_row` in its last row (what is known only once the run has ended).

        The journal is kept: it is removed by `discard_journal` only after the run's final status is on
        disk, so a crash anywhere in finalisation leaves a run that can be resumed.
        """
        if self._writer is None:
            return
        if complete:
            self.flush()
        self._writer.close()
        self._sink.close()
        self._writer = None
        if complete:
            table = read_journal(self.journal, self._plain).cast(self.schema)
            if last_row and table.num_rows:
                for name, value in last_row.items():
                    i = table.schema.get_field_index(name)
                    column = table.column(i).to_pylist()
                    column[-1] = value
                    table = table.set_column(i, table.schema.field(i), pa.array(column, table.schema.field(i).type))
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                pq.write_table(table, tmp, row_group_size=65_536, compression="zstd")
                _fsync(tmp)
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def discard_journal(self) -> None:
        self.journal.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TraceWriter:
    """The three tables of a run directory."""

    def __init__(self, run_dir: Path, metadata: dict[str, str], keep_rows: dict[str, int] | None = None,
                 description: dict | None = None):
        """`description`: the metadata as JSON values, written to `trace.json` before any row."""
        meta = {"fedsim.schema_version": SCHEMA_VERSION, **metadata}
        if description is not None:
            body = {"schema_version": SCHEMA_VERSION, **description}
            write_atomic(Path(run_dir) / TRACE_JSON, (json.dumps(body, indent=2) + "\n").encode())
        keep = keep_rows or {}
        self.events = TableWriter(run_dir / "events.parquet", EVENTS_SCHEMA, meta, keep_rows=keep.get("events"))
        self.devices = TableWriter(run_dir / "devices.parquet", DEVICES_SCHEMA, meta, keep_rows=keep.get("devices"))
        self.rounds = TableWriter(run_dir / "rounds.parquet", ROUNDS_SCHEMA, meta, keep_rows=keep.get("rounds"))
        cols = self.events.columns
        self._appends = tuple(cols[name].append for name in EVENTS_SCHEMA.names)

    def rows_written(self) -> dict[str, int]:
        return {"events": self.events.rows_written, "devices": self.devices.rows_written,
                "rounds": self.rounds.rows_written}

    def event_columns(self) -> tuple:
        """The bound `append` of each events column, in schema order, for loops that write many rows
        (the engine's per-layer loop): one call per column instead of one `event` call per row."""
        return self._appends

    def event(self, round_: int, time_s: float, device: int, kind: EventKind, layer: int = -1,
              nbytes: int = 0, energy_j: float = 0.0) -> None:
        # The engine's hot path: appends to column lists (untracked by the cyclic GC, unlike row tuples),
        # through bound methods cached once
        a_round, a_time, a_device, a_event, a_layer, a_bytes, a_energy = self._appends
        a_round(round_)
        a_time(time_s)
        a_device(device)
        a_event(kind._value_)
        a_layer(layer)
        a_bytes(nbytes)
        a_energy(energy_j)

    def event_rows(self, *, event: np.ndarray, **columns) -> None:
        """Many events rows at once, as arrays (every events column), buffered like `event`'s until the round's
        flush (`end_round`). `event` holds positions in `EventKind` (its members in definition order)."""
        self.events.extend_arrays(event=category_column(_EVENT_NAMES_ARROW, event), **columns)

    def end_round(self) -> None:
        """Called once per round: a crash loses at most the round in flight."""
        for table in (self.events, self.devices, self.rounds):
            table.flush()

    def close(self, complete: bool = True, last_round: dict[str, Any] | None = None) -> None:
        """`last_round`: values of the last rounds.parquet row known only at the end (`ended_by`, the final
        evaluation of a run that a time budget ended)."""
        for table in (self.events, self.devices):
            table.close(complete)
        self.rounds.close(complete, last_round)

    def discard_journals(self) -> None:
        """After the run's final status is written: the Parquet files are the trace now."""
        for table in (self.events, self.devices, self.rounds):
            table.discard_journal()
