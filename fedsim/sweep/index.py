"""A sweep directory's files: the settings, each run's parameters and metrics, the index of every run, and
the types of the partition columns of `runs/`."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.errors import FedsimError, TraceError
from fedsim.output.rundir import RunStatus, read_status, write_atomic
from fedsim.spec.overrides import apply_overrides, parse_value
from fedsim.sweep.plan import SweepRun, value_text

__all__ = ["INDEX_FILE", "SWEEP_FILE", "PARAMS_FILE", "RUNS_DIR", "PARTITIONING_FILE", "METRIC_COLUMNS", "run_metrics",
           "read_index", "grid_types"]

INDEX_FILE = "index.parquet"
SWEEP_FILE = "sweep.json"
PARAMS_FILE = "params.json"
RUNS_DIR = "runs"
PARTITIONING_FILE = "partitioning.parquet"     # no rows: its schema is the partition columns of runs/, typed
METRIC_COLUMNS = [
    ("policy", pa.string()),
    ("rounds", pa.int64()),
    ("final_accuracy", pa.float64()),
    ("best_accuracy", pa.float64()),
    ("sim_time_s", pa.float64()),
    ("energy_j", pa.float64()),
    ("mean_delivered", pa.float64()),
    ("mean_completed", pa.float64()),
    ("time_to_target_s", pa.float64()),
    ("energy_to_target_j", pa.float64()),
    ("rounds_to_target", pa.int64()),
]


def _effective_tree(text: str, overrides) -> dict:
    return apply_overrides(tomllib.loads(text), list(overrides), "<trace>")


def _up_to_date(run_dir: Path, run: SweepRun, scenario_text: str) -> bool:
    """Completed, and its trace records the same scenario (as parsed TOML) and overrides as planned."""
    try:
        if read_status(run_dir)["status"] != RunStatus.COMPLETED.value:
            return False
        meta = pq.read_schema(run_dir / "rounds.parquet").metadata or {}
        text = meta[b"scenario.text"].decode()
        overrides = json.loads(meta[b"scenario.overrides"].decode())
        return _effective_tree(text, overrides) == _effective_tree(scenario_text, run.overrides)
    except (TraceError, OSError, KeyError, ValueError, pa.ArrowException, FedsimError, tomllib.TOMLDecodeError):
        return False


# -- metrics -------------------------------------------------------------------------------------

def run_metrics(run_dir: Path, target_accuracy: float | None = None) -> dict:
    """Headline metrics of one completed run, from its rounds.parquet."""
    t = pq.read_table(Path(run_dir) / "rounds.parquet").sort_by("round")
    col = {name: t.column(name).to_numpy(zero_copy_only=False)
           for name in ("end_s", "energy_j", "delivered_any", "completed")}
    acc = np.array([np.nan if a is None else a for a in t.column("test_accuracy").to_pylist()], dtype=float)
    evaluated = np.flatnonzero(~np.isnan(acc))
    out = {
        "policy": t.column("policy")[0].as_py() if t.num_rows else None,
        "rounds": t.num_rows,
        "final_accuracy": float(acc[evaluated[-1]]) if len(evaluated) else None,
        "best_accuracy": float(acc[evaluated].max()) if len(evaluated) else None,
        "sim_time_s": float(col["end_s"][-1]) if t.num_rows else 0.0,
        "energy_j": float(np.sum(col["energy_j"])),
        "mean_delivered": float(np.mean(col["delivered_any"])) if t.num_rows else None,
        "mean_completed": float(np.mean(col["completed"])) if t.num_rows else None,
        "time_to_target_s": None, "energy_to_target_j": None, "rounds_to_target": None,
    }
    if target_accuracy is not None:
        hits = evaluated[acc[evaluated] >= target_accuracy]
        if len(hits):
            r = int(hits[0])
            out["time_to_target_s"] = float(col["end_s"][r])
            out["energy_to_target_j"] = float(np.sum(col["energy_j"][: r + 1]))
            out["rounds_to_target"] = r + 1
    return out


def _column_type(values: list) -> pa.DataType:
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64()
    return pa.string()          # text, or values of mixed or nested types (as inline TOML)


def grid_types(plan: list[SweepRun], grid_keys: list[str]) -> dict[str, pa.DataType]:
    """The column type of each grid key: bool, int64, float64 (integers and floats together), else string."""
    values = [{k: parse_value(v) for k, v in point} for run in plan for point in (run.points or (run.params,))]
    return {k: _column_type([v[k] for v in values]) for k in grid_keys}


def _typed(value, kind: pa.DataType):
    if kind == pa.string():
        return value_text(value)
    return float(value) if kind == pa.float64() else value


def _index_row(out: Path, run: SweepRun, target_accuracy: float | None, error: str | None = None,
               types: dict[str, pa.DataType] | None = None) -> dict:
    """The index row of one run, from its status.json and rounds.parquet."""
    run_dir = out / RUNS_DIR / run.run_id
    try:
        status = read_status(run_dir)
    except TraceError:
        status = {"status": "missing"}
    metrics = {name: None for name, _ in METRIC_COLUMNS}
    if status["status"] == RunStatus.COMPLETED.value:
        metrics = run_metrics(run_dir, target_accuracy)
    values = {k: _typed(v, (types or {}).get(k, pa.string())) for k, v in run.values.items()}
    return {"run_id": run.run_id, **values, "seed": run.seed, "status": status["status"], **metrics,
            "error": status.get("error", error), "run_dir": f"{RUNS_DIR}/{run.run_id}",
            "ignored": list(run.ignored)}


def point_rows(run: SweepRun, row: dict, types: dict[str, pa.DataType]) -> list[dict]:
    """The index rows of every grid point `run` stands for: its row, with each point's own grid values."""
    return [row | {k: _typed(parse_value(v), types.get(k, pa.string())) for k, v in point}
            for point in (run.points or (run.params,))]


def _index_table(rows: list[dict], types: dict[str, pa.DataType], settings: dict) -> pa.Table:
    grid_keys = list(types)
    fields = ([("run_id", pa.string())] + list(types.items())
              + [("seed", pa.int64()), ("status", pa.string())] + METRIC_COLUMNS
              + [("error", pa.string()), ("run_dir", pa.string()), ("ignored", pa.list_(pa.string()))])
    meta = {"fedsim.sweep.params": json.dumps(grid_keys),
            "fedsim.sweep.target_accuracy": json.dumps(settings["target_accuracy"]),
            "fedsim.sweep.settings": json.dumps(settings, sort_keys=True)}
    return pa.Table.from_pylist(rows, schema=pa.schema(fields, metadata=meta))


def _write_index(out: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(out / INDEX_FILE, buf.getvalue())


def _write_partitioning(out: Path, types: dict[str, pa.DataType]) -> None:
    """`partitioning.parquet`: no rows, the schema of the partition columns of `runs/` (grid keys, seed)."""
    schema = pa.schema([*types.items(), ("seed", pa.int64())])
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    write_atomic(out / PARTITIONING_FILE, buf.getvalue())


def read_index(out: Path) -> pa.Table:
    return pq.read_table(Path(out) / INDEX_FILE)
