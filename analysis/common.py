"""Shared helpers of the analysis scripts: load runs, group them, per-run metrics, tables and figures.

Inputs are files only: `status.json`, `params.json`, a sweep's `index.parquet` and the Parquet traces of
each run (`rounds.parquet`, `devices.parquet`, `events.parquet`; schema in fedsim/output/trace.py). Runs whose
`status.json` does not say `completed` are skipped with a warning line on stderr.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

__all__ = ["AnalysisError", "Run", "Table", "Section", "load_runs", "group_runs", "group_label", "sweep_metadata",
           "floats", "final_accuracy", "best_accuracy", "sim_time", "total_energy", "reach",
           "fmt", "save_figure", "warn", "script_main", "plt"]


class AnalysisError(Exception):
    """A directory that holds no usable runs, an unknown run id, a round that does not exist..."""


def warn(message: str) -> None:
    print(f"analysis: warning: {message}", file=sys.stderr)


def floats(values) -> np.ndarray:
    """A Parquet column (or list) as float64, nulls as NaN."""
    if hasattr(values, "to_pylist"):
        values = values.to_pylist()
    return np.array([np.nan if v is None else v for v in values], dtype=float)


# -- runs ----------------------------------------------------------------------------------------

@dataclass
class Run:
    run_id: str
    path: Path
    params: dict[str, str] = field(default_factory=dict)   # grid parameters ({} for a lone run)
    seed: int | None = None

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
        return pq.read_table(self.path / "devices.parquet", columns=["round", "device", "status", "depth"]).to_pydict()

    def events(self, round_: int) -> dict[str, list]:
        t = pq.read_table(self.path / "events.parquet", filters=[("round", "==", round_)])
        return t.to_pydict()

    @cached_property
    def metadata(self) -> dict[str, str]:
        meta = pq.read_schema(self.path / "rounds.parquet").metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items()}

    @property
    def policy(self) -> str:
        names = self.rounds["policy"]
        return names[0] if names else self.metadata.get("policy", "?")

    @property
    def n_layers(self) -> int:
        contributors = self.rounds["contributors"]
        return len(contributors[0]) if contributors else 0

    def setting(self, key: str) -> Any:
        """The value of a dotted scenario key for this run: grid parameter, else the last `--set` override
        recorded in the trace, else the scenario text in the trace metadata; None if absent."""
        if key in self.params:
            return self.params[key]
        for item in reversed(json.loads(self.metadata.get("scenario.overrides", "[]"))):
            k, _, value = item.partition("=")
            if k.strip() == key:
                try:
                    return tomllib.loads(f"v = {value.strip()}")["v"]
                except tomllib.TOMLDecodeError:
                    return value.strip()
        node: Any = tomllib.loads(self.metadata.get("scenario.text", ""))
        for part in key.split("."):
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)", part)
            if m is None or not isinstance(node, dict) or m.group(1) not in node:
                return None
            node = node[m.group(1)]
            for index in re.findall(r"\[(\d+)\]", m.group(2)):
                if not isinstance(node, list) or int(index) >= len(node):
                    return None
                node = node[int(index)]
        return node


def _status(path: Path) -> str:
    try:
        return json.loads((path / "status.json").read_text())["status"]
    except FileNotFoundError:
        return "missing (no status.json)"
    except (ValueError, KeyError, TypeError):
        return "unreadable status.json"


def _params_json(path: Path) -> tuple[dict[str, str], int | None]:
    try:
        body = json.loads((path / "params.json").read_text())
        return {k: str(v) for k, v in body.get("params", {}).items()}, body.get("seed")
    except (FileNotFoundError, ValueError):
        return {}, None


SCHEMA_VERSION = "1"     # the trace schema these scripts read (fedsim/output/trace.py)


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


def load_runs(directory: Path) -> list[Run]:
    """The completed runs of a run directory or of a sweep directory, in index order."""
    d = Path(directory)
    if (d / "index.parquet").exists():
        index = pq.read_table(d / "index.parquet")
        keys = json.loads((index.schema.metadata or {}).get(b"fedsim.sweep.params", b"[]"))
        candidates = [Run(row["run_id"], d / row["run_dir"], {k: row[k] for k in keys}, row["seed"])
                      for row in index.to_pylist()]
    elif (d / "status.json").exists():
        params, seed = _params_json(d)
        candidates = [Run(d.name, d, params, seed)]
    elif (d / "runs").is_dir():
        candidates = []
        for sub in sorted(p for p in (d / "runs").iterdir() if p.is_dir()):
            params, seed = _params_json(sub)
            candidates.append(Run(sub.name, sub, params, seed))
    else:
        raise AnalysisError(f"{d}: neither a run directory (status.json) nor a sweep (index.parquet or runs/)")
    runs = []
    for run in candidates:
        status = _status(run.path)
        if status == "completed":
            _check_schema(run.path)
            runs.append(run)
        else:
            warn(f"skipping {run.path}: status {status}")
    if not runs:
        raise AnalysisError(f"{d}: no completed runs")
    return runs


def sweep_metadata(directory: Path, key: str) -> Any:
    """A JSON value of a sweep index's key-value metadata (`fedsim.sweep.*`), None if absent."""
    path = Path(directory) / "index.parquet"
    if not path.exists():
        return None
    raw = (pq.read_schema(path).metadata or {}).get(key.encode())
    return None if raw is None else json.loads(raw)


def group_key(run: Run, drop: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """The trace's policy name, the grid parameters (policy.name is implied by the policy) and the seed,
    less the keys in `drop`: with drop=("seed",), runs that differ only by seed share a key."""
    rest = tuple((k, v) for k, v in run.params.items() if k not in drop and k != "policy.name")
    seed = () if "seed" in drop else (("seed", str(run.seed if run.seed is not None else
                                                      run.metadata.get("run.seed"))),)
    return (("policy", run.policy),) + rest + seed


def group_label(key: tuple[tuple[str, str], ...]) -> str:
    parts = [key[0][1]] + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in key[1:]]
    return ", ".join(parts)


def group_runs(runs: list[Run], drop: tuple[str, ...] = ()) -> dict[tuple, list[Run]]:
    """Groups in order of first appearance."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run, drop), []).append(run)
    return groups


# -- per-run metrics (same definitions as the sweep index) ----------------------------------------

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


# -- output --------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


@dataclass
class Table:
    name: str                 # file stem: NAME.md and NAME.csv
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])
        return buf.getvalue()

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"

    def write(self, out: Path) -> list[Path]:
        md, cs = out / f"{self.name}.md", out / f"{self.name}.csv"
        md.write_text(self.markdown())
        cs.write_text(self.csv())
        return [md, cs]


@dataclass
class Section:
    """What one script produced: for its command line and for the HTML report."""
    title: str
    figures: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    text: str = ""
    files: list[Path] = field(default_factory=list)


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def finish(section: Section, out: Path) -> Section:
    """Write the section's tables; its figures are already saved."""
    section.files = list(section.figures)
    for table in section.tables:
        section.files += table.write(out)
    return section


def script_main(doc: str, make: Callable, add_arguments: Callable | None = None, argv=None) -> int:
    """The command line shared by every script: `python -m analysis.NAME DIR [--out OUT] [options]`."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run directory or a sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/analysis)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.dir)
        out = args.out if args.out is not None else args.dir / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        section = make(runs, out, args)
    except AnalysisError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    for path in section.files:
        print(path)
    return 0
