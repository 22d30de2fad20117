"""A sweep directory's files: the settings, each run's parameters and metrics, the index of every run."""

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
from fedsim.spec.overrides import apply_overrides
from fedsim.sweep.plan import SweepRun

__all__ = ["INDEX_FILE", "SWEEP_FILE", "PARAMS_FILE", "RUNS_DIR", "METRIC_COLUMNS", "run_metrics", "read_index"]

INDEX_FILE = "index.parquet"
SWEEP_FILE = "sweep.json"
PARAMS_FILE = "params.json"
RUNS_DIR = "runs"
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


def _index_row(out: Path, run: SweepRun, target_accuracy: float | None, error: str | None = None) -> dict:
    """The index row of one run, from its status.json and rounds.parquet."""
    run_dir = out / RUNS_DIR / run.run_id
    try:
        status = read_status(run_dir)
    except TraceError:
        status = {"status": "missing"}
    metrics = {name: None for name, _ in METRIC_COLUMNS}
    if status["status"] == RunStatus.COMPLETED.value:
        metrics = run_metrics(run_dir, target_accuracy)
    return {"run_id": run.run_id, **dict(run.params), "seed": run.seed, "status": status["status"], **metrics,
            "error": status.get("error", error), "run_dir": f"{RUNS_DIR}/{run.run_id}"}


def _index_table(rows: list[dict], grid_keys: list[str], settings: dict) -> pa.Table:
    fields = ([("run_id", pa.string())] + [(k, pa.string()) for k in grid_keys]
              + [("seed", pa.int64()), ("status", pa.string())] + METRIC_COLUMNS
              + [("error", pa.string()), ("run_dir", pa.string())])
    meta = {"fedsim.sweep.params": json.dumps(grid_keys),
            "fedsim.sweep.target_accuracy": json.dumps(settings["target_accuracy"]),
            "fedsim.sweep.settings": json.dumps(settings, sort_keys=True)}
    return pa.Table.from_pylist(rows, schema=pa.schema(fields, metadata=meta))


def _write_index(out: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(out / INDEX_FILE, buf.getvalue())


def read_index(out: Path) -> pa.Table:
    return pq.read_table(Path(out) / INDEX_FILE)


# -- running -------------------------------------------------------------------------------------

