"""Finding runs and reading them, and the per-run metrics every study uses.

A *run* is a directory holding fedsim's marker `fedsim-run.json`. DIR may be a run directory, a sweep
directory (its `index.parquet` lists its runs) or any folder: it is searched for both, at any depth.
Only runs whose `status.json` says `completed` are read (the others are skipped with a warning).

A *group* is the runs of one scenario that differ only by their seed: the marker's identity hash `group`
(the scenario after its overrides, without `run.seed`). Groups are never pooled with one another. Two runs
of the same scenario and seed (identity `scenario`), e.g. the same run copied into two folders, count once.
Across the seeds of a group, statistics are the mean and the sample standard deviation (ddof=1).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .scenario import resolve, steps

__all__ = ["AnalysisError", "Run", "load_runs", "warn", "floats", "mean_std", "STD_NOTE", "final_accuracy",
           "best_accuracy", "sim_time", "total_energy", "reach"]

MARKER = "fedsim-run.json"
STATUS = "status.json"
TRACE_JSON = "trace.json"
INDEX = "index.parquet"
SCHEMA_VERSION = "1"         # the trace schema these scripts read (fedsim/output/trace.py)
STD_NOTE = "Mean and sample standard deviation (ddof=1) over seeds; std n/a with one seed"


class AnalysisError(Exception):
    """A directory that holds no usable runs, an unknown run id, a round that does not exist..."""


def warn(message: str) -> None:
    print(f"analysis: warning: {message}", file=sys.stderr)


def floats(values) -> np.ndarray:
    """A Parquet column (or list) as float64, nulls as NaN."""
    if hasattr(values, "to_pylist"):
        values = values.to_pylist()
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) of the finite values; NaN where undefined (std needs two)."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


# -- runs ------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Run:
    path: Path
    run_id: str                 # its path relative to the analysed directory (a sweep's: relative to runs/)
    marker: dict
    sweep: Path | None = None   # the sweep directory it belongs to

    @cached_property
    def rounds(self) -> dict[str, Any]:
        """rounds.parquet sorted by round; numeric columns as numpy arrays (NaN for nulls)."""
        t = pq.read_table(self.path / "rounds.parquet").sort_by("round")
        cols: dict[str, Any] = {name: floats(t.column(name)) for name in
                                ("round", "end_s", "participants", "delivered_any", "test_accuracy", "energy_j")}
        cols["round"] = cols["round"].astype(int)
        cols["policy"] = t.column("policy").to_pylist()
        cols["contributors"] = t.column("contributors").to_pylist()
        return cols

    @cached_property
    def devices(self) -> dict[str, list]:
        return pq.read_table(self.path / "devices.parquet",
                             columns=["round", "device", "class", "status", "depth", "compute_s"]).to_pydict()

    def events(self, round_: int) -> dict[str, list]:
        return pq.read_table(self.path / "events.parquet", filters=[("round", "==", round_)]).to_pydict()

    @cached_property
    def metadata(self) -> dict[str, str]:
        meta = pq.read_schema(self.path / "rounds.parquet").metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items()}

    @cached_property
    def tree(self) -> dict:
        """The resolved scenario: trace.json's without the fields the run ignored (a `wait` run's deadline), else
        the marker's text with its overrides applied."""
        try:
            described = json.loads((self.path / TRACE_JSON).read_text(encoding="utf-8"))
            tree = described["scenario"]
            for path in described.get("ignored", []):
                *tables, key = path.split(".")
                node = tree
                for name in tables:
                    node = node.get(name, {}) if isinstance(node, dict) else {}
                if isinstance(node, dict):
                    node.pop(key, None)
            return tree
        except (OSError, ValueError, KeyError):
            scenario = self.marker["scenario"]
            return resolve(scenario["text"], list(scenario.get("overrides", [])))

    @property
    def seed(self) -> int:
        return int(self.metadata.get("run.seed") or self.tree.get("run", {}).get("seed", -1))

    @property
    def scenario_id(self) -> str:
        return self.marker["identity"]["scenario"]

    @property
    def group_id(self) -> str:
        return self.marker["identity"]["group"]

    @property
    def policy(self) -> str:
        """The policy as the trace describes it, e.g. `salf(mean)`."""
        names = self.rounds["policy"]
        return names[0] if names else self.metadata.get("policy", "?")

    @property
    def policy_name(self) -> str:
        return str(self.tree.get("policy", {}).get("name", self.policy.split("(")[0]))

    @property
    def deadline_s(self) -> float | None:
        """The deadline in force (None for a policy that has none, e.g. wait)."""
        text = self.metadata.get("policy.deadline_s", "")
        return float(text) if text else None

    @property
    def n_layers(self) -> int:
        contributors = self.rounds["contributors"]
        return len(contributors[0]) if contributors else 0

    def setting(self, key: str) -> Any:
        """The value of a dotted scenario key (`policy.deadline_s`, `fleet.classes[1].count`), None if absent."""
        node: Any = self.tree
        for step in steps(key) or [None]:
            if isinstance(step, int) and isinstance(node, list) and step < len(node):
                node = node[step]
            elif isinstance(step, str) and isinstance(node, dict) and step in node:
                node = node[step]
            else:
                return None
        return node

    def command(self) -> str:
        """The command line that made this run."""
        import shlex

        scenario = self.marker["scenario"]
        words = ["fedsim", "run", scenario.get("source", "?")]
        for item in scenario.get("overrides", []):
            words += ["--set", item]
        return " ".join(shlex.quote(str(w)) for w in [*words, "--out", self.path])


def _read_json(path: Path) -> dict | None:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _status(path: Path) -> str:
    body = _read_json(path / STATUS)
    if body is None:
        return "missing or unreadable (status.json)"
    return str(body.get("status", "unreadable (status.json)"))


def _check_schema(run_dir: Path) -> None:
    """Refuse traces written under another schema version rather than misread their columns."""
    for name in ("rounds", "devices", "events"):
        path = run_dir / f"{name}.parquet"
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, ValueError) as exc:      # missing, truncated, or not Parquet at all
            raise AnalysisError(f"{path}: unreadable trace ({exc})") from None
        version = meta.get(b"fedsim.schema_version", b"").decode() or "none"
        if version != SCHEMA_VERSION:
            raise AnalysisError(f"{path}: trace schema version {version}, these scripts read version {SCHEMA_VERSION}")


def _sweep_runs(sweep: Path) -> list[Path]:
    try:
        rows = pq.read_table(sweep / INDEX, columns=["run_dir"]).column("run_dir").to_pylist()
    except Exception as exc:        # noqa: BLE001  (pyarrow raises several kinds on a damaged file)
        raise AnalysisError(f"{sweep / INDEX}: unreadable sweep index ({exc})") from None
    # grid points that differ only in ignored fields share one run: it is listed once per point
    return [sweep / r for r in dict.fromkeys(rows)]


def _candidates(directory: Path, top: Path) -> list[tuple[Path, Path | None]]:
    """(run directory, its sweep or None), in index order for a sweep, path order elsewhere."""
    if (directory / MARKER).is_file():
        return [(directory, None)]
    if (directory / INDEX).is_file():
        return [(path, directory) for path in _sweep_runs(directory)]
    found = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
            found += _candidates(child, top)
    return found


def _run_id(path: Path, top: Path, sweep: Path | None) -> str:
    """Its path relative to the analysed directory; a sweep's runs relative to its runs/ when the sweep is it."""
    if path == top:
        return path.name
    base = top / "runs" if sweep == top else top
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def load_runs(directory: Path) -> list[Run]:
    """The completed runs under `directory`, each scenario and seed once."""
    top = Path(directory)
    if not top.is_dir():
        raise AnalysisError(f"{top}: " + ("not a directory; give the run, sweep or folder that holds it"
                                          if top.exists() else "no such directory"))
    runs: list[Run] = []
    by_scenario: dict[str, Run] = {}
    for path, sweep in _candidates(top, top):
        status = _status(path)
        if status != "completed":
            warn(f"skipping {path}: status {status}")
            continue
        marker = _read_json(path / MARKER)
        if marker is None or not isinstance(marker.get("identity"), dict) or "scenario" not in marker:
            warn(f"skipping {path}: unreadable {MARKER}")
            continue
        _check_schema(path)
        run = Run(path, _run_id(path, top, sweep), marker, sweep)
        if run.scenario_id in by_scenario:
            warn(f"{path}: the same scenario and seed as {by_scenario[run.scenario_id].path}; counted once")
            continue
        by_scenario[run.scenario_id] = run
        runs.append(run)
    if not runs:
        raise AnalysisError(f"{top}: no completed fedsim runs (directories with {MARKER} and a completed status)")
    return runs


# -- per-run metrics (same definitions as the sweep index) -----------------------------------------

def final_accuracy(run: Run) -> float:
    acc = run.rounds["test_accuracy"]
    evaluated = acc[~np.isnan(acc)]
    return float(evaluated[-1]) if len(evaluated) else math.nan


def best_accuracy(run: Run) -> float:
    acc = run.rounds["test_accuracy"]
    return float(np.nanmax(acc)) if np.any(~np.isnan(acc)) else math.nan


def sim_time(run: Run) -> float:
    end = run.rounds["end_s"]
    return float(end[-1]) if len(end) else 0.0


def total_energy(run: Run) -> float:
    return float(np.sum(run.rounds["energy_j"]))


def reach(run: Run, target: float) -> tuple[float, float] | None:
    """(simulated time, fleet energy) at the end of the first evaluated round with accuracy >= target."""
    acc = run.rounds["test_accuracy"]
    hits = np.flatnonzero(acc >= target)      # NaN compares False
    if not len(hits):
        return None
    r = int(hits[0])
    return float(run.rounds["end_s"][r]), float(np.sum(run.rounds["energy_j"][: r + 1]))


def accuracy_at(run: Run, budget_s: float) -> float:
    """The test accuracy the server holds at simulated time `budget_s`: its last evaluation at or before it
    (within fedsim's 1e-9 relative tolerance of run.time_budget_s); NaN before the first."""
    r = run.rounds
    ok = ~np.isnan(r["test_accuracy"]) & (r["end_s"] <= budget_s * (1 + 1e-9))
    return float(r["test_accuracy"][ok][-1]) if ok.any() else math.nan
