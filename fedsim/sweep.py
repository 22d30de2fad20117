"""`fedsim sweep`: a scenario run over a cartesian grid of overrides x seeds, one process per core.

With `--cluster` the runs are tasks on a Dask cluster instead (fedsim.cluster.sweep, docs/DISTRIBUTED.md):
same run ids, run directories and index; the sweep directory must be on a filesystem the workers share.

Layout of a sweep directory:

    DIR/sweep.json           the sweep's settings (scenario, grid, seeds, --set, target accuracy)
    DIR/index.parquet        one row per run: run id, grid parameters, seed, status, headline metrics
    DIR/runs/<run-id>/       an ordinary run directory (see fedsim.output.trace) plus params.json

Seeds: `--seeds N` runs every grid point with `run.seed = base + i` for i = 0 .. N-1, where `base` is the
scenario's `run.seed` after `--set`. So `--seeds 1` reproduces `fedsim run` exactly, and
`--set run.seed=100` moves the whole sweep to other seeds. `run.seed` cannot be a grid key.

Run ids are readable: the grid's `key=value` pairs in command-line order, then `seed=S`, joined by commas
(`policy.name=salf,policy.deadline_s=0.5,seed=1`). Characters other than letters, digits and `._=,+-`
become `_`; if that changed anything (or the id is long) an 8-hex hash of the exact parameters is
appended, so ids stay unique.

Resuming: a run is skipped when its `status.json` says completed and the scenario its trace records (text
plus overrides, compared as parsed TOML, so comments do not matter) equals the one planned now;
anything else (missing, running, failed, stale) is deleted and redone. Every grid point's scenario is
validated before anything is written, so bad input leaves no output directory.

Index columns: `run_id`, one string column per grid key, `seed`, `status` (`completed`, `failed`, or after
an interrupted sweep `pending` / `running`; the index is rewritten after every run), `policy` (as the trace names
it), `rounds`, `final_accuracy` (last evaluated), `best_accuracy`, `sim_time_s` (end of the last round),
`energy_j` (fleet energy, all rounds), `mean_delivered` / `mean_completed` (participants per round that
delivered at least one layer / every layer), `time_to_target_s`, `energy_to_target_j`,
`rounds_to_target` (first evaluated round reaching `--target-accuracy`; null if not given or not reached),
`error`, `run_dir` (relative to DIR). Metrics are computed from `rounds.parquet` only.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tomllib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedsim.errors import FedsimError, ScenarioError, TraceError
from fedsim.spec.overrides import apply_overrides
from fedsim.output.rundir import RunStatus, clear_run_files, read_status, write_atomic, write_status
from fedsim.spec.scenario import load_scenario, parse_scenario

__all__ = ["SweepRun", "SweepResult", "parse_grid", "plan_sweep", "run_sweep", "run_metrics",
           "read_index", "INDEX_FILE", "SWEEP_FILE", "PARAMS_FILE", "default_jobs"]

INDEX_FILE = "index.parquet"
SWEEP_FILE = "sweep.json"
PARAMS_FILE = "params.json"
RUNS_DIR = "runs"
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_ID = 120

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


@dataclass(frozen=True)
class SweepRun:
    run_id: str
    params: tuple[tuple[str, str], ...]     # grid key -> value text, in command-line order
    seed: int
    overrides: tuple[str, ...]              # --set, then the grid point, then run.seed

    def params_json(self, scenario: Path) -> dict:
        return {"run_id": self.run_id, "params": dict(self.params), "seed": self.seed,
                "scenario": str(scenario), "overrides": list(self.overrides)}


@dataclass(frozen=True)
class SweepResult:
    out: Path
    total: int
    skipped: int
    completed: int
    failed: int


# -- planning ------------------------------------------------------------------------------------

def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes (values are TOML values)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["policy.name=salf,drop", ...]` -> `[("policy.name", ["salf", "drop"]), ...]`."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values_text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FedsimError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        if key == "run.seed":
            raise FedsimError("--grid run.seed: use --seeds N (and --set run.seed=BASE) for seeds")
        if key in (k for k, _ in grid):
            raise FedsimError(f"--grid {key}: given twice; list all its values in one --grid")
        values = _split_values(values_text)
        if any(v == "" for v in values):
            raise FedsimError(f"--grid {key}: empty value in {values_text!r}")
        if len(set(values)) != len(values):
            raise FedsimError(f"--grid {key}: repeated value in {values_text!r}")
        grid.append((key, values))
    return grid


def _run_id(params: tuple[tuple[str, str], ...], seed: int) -> str:
    raw = ",".join([f"{k}={v}" for k, v in params] + [f"seed={seed}"])
    safe = _SAFE.sub("_", raw)
    if safe != raw or len(safe) > _MAX_ID:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:_MAX_ID]}-{digest}"
    return safe


def _grid_points(grid: list[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    points: list[tuple[tuple[str, str], ...]] = [()]
    for key, values in grid:
        points = [p + ((key, v),) for p in points for v in values]
    return points


def _blame(scenario: Path, sets: list[str], point, exc: ScenarioError) -> FedsimError:
    """Name the grid key whose value is bad: the first one that fails on its own, else the whole point."""
    for key, value in point:
        try:
            load_scenario(scenario, [*sets, f"{key}={value}"])
        except ScenarioError as single:
            return FedsimError(f"--grid {key}={value}: {single}")
    shown = ",".join(f"{k}={v}" for k, v in point)
    return FedsimError(f"--grid point {shown}: {exc}")


def plan_sweep(scenario: Path, grid: list[tuple[str, list[str]]], seeds: int,
               sets: list[str]) -> list[SweepRun]:
    """Every run of the sweep, each scenario validated; raises FedsimError before anything is written."""
    if seeds < 1:
        raise FedsimError(f"--seeds must be at least 1, got {seeds}")
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for key, _ in grid:
        if key in set_keys:
            raise FedsimError(f"--grid {key}: also given with --set; keep one")
    base_seed = load_scenario(scenario, sets).run.seed       # errors here name the --set key
    runs: list[SweepRun] = []
    for point in _grid_points(grid):
        grid_overrides = [f"{k}={v}" for k, v in point]
        for i in range(seeds):
            seed = base_seed + i
            overrides = (*sets, *grid_overrides, f"run.seed={seed}")
            try:
                load_scenario(scenario, list(overrides))
            except ScenarioError as exc:
                raise _blame(scenario, sets, point, exc) from None
            runs.append(SweepRun(_run_id(point, seed), point, seed, overrides))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise FedsimError("two grid points map to the same run id; give distinct values")
    return runs


# -- resuming ------------------------------------------------------------------------------------

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

def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _init_worker(sweep_pid: int) -> None:
    import torch

    torch.set_num_threads(1)     # one single-thread process per core beats fewer multi-thread ones
    _die_with(sweep_pid)


def _die_with(pid: int) -> None:
    """End this worker as soon as process `pid` (the sweep) ends, however it ended (SIGKILL included):
    a killed sweep leaves no runs going on behind it. Its unfinished runs are redone by the next sweep."""
    import threading

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):          # no pidfd (not Linux, or old kernel): poll the parent instead
        def watch() -> None:
            import time
            while os.getppid() != 1:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            os._exit(1)
    else:
        def watch() -> None:
            import select
            select.select([fd], [], [])        # readable when the process has ended
            os._exit(1)
    threading.Thread(target=watch, name="fedsim-die-with-sweep", daemon=True).start()


def _run_one(scenario: str, overrides: tuple[str, ...], run_dir: str, params: dict, text: str | None = None,
             base_dir: str | None = None) -> tuple[str, str | None]:
    """Worker: run one scenario into `run_dir`; never raises, reports ("completed"|"failed", error).

    On a Dask cluster the scenario comes as `text` (with its folder `base_dir`) under its name `scenario`:
    a worker may not share the driver's working directory, and the trace must record the same name.
    """
    from fedsim.run import run_scenario

    run_path = Path(run_dir)
    try:
        scn = (load_scenario(scenario, list(overrides)) if text is None
               else parse_scenario(text, scenario, list(overrides), base_dir=Path(base_dir)))
        run_scenario(scn, run_path, force=True)
        result: tuple[str, str | None] = (RunStatus.COMPLETED.value, None)
    except Exception as exc:           # a failed run must not stop the sweep; status.json records it
        error = f"{type(exc).__name__}: {exc}"
        if not (run_path / "status.json").exists():
            run_path.mkdir(parents=True, exist_ok=True)
            write_status(run_path, RunStatus.FAILED, rounds_done=0, error=error)
        result = (RunStatus.FAILED.value, error)
    write_atomic(run_path / PARAMS_FILE, (json.dumps(params, indent=2) + "\n").encode())
    return result


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["fedsim.run"])     # workers fork with torch already imported
        return ctx
    return multiprocessing.get_context("spawn")


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SWEEP_FILE).exists())):
        raise FedsimError(f"{out}: exists and is not a fedsim sweep directory; choose another --out")


def run_sweep(scenario: Path, grid_items: list[str], seeds: int = 1, sets: list[str] = (), out: Path | None = None,
              jobs: int | None = None, target_accuracy: float | None = None,
              progress: bool = True, remote=None) -> SweepResult:
    """Plan, validate, run what is not done yet (in parallel), then write the index.

    `remote` runs the runs elsewhere instead of the local process pool, with the same results: an object with
    `open()` (called before anything is written), `execute(scenario, out, todo)` yielding (run, status,
    error) as each finishes, and `close()`; `fedsim.cluster.sweep.ClusterSweep` runs them on a Dask cluster.
    """
    from tqdm import tqdm

    scenario = Path(scenario)
    sets = list(sets)
    if remote is not None and jobs is not None:
        raise FedsimError("--jobs sizes the local process pool; with --cluster the cluster's workers run the "
                          "runs (local:N for N local workers): give one of them")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise FedsimError(f"--jobs must be at least 1, got {jobs}")
    if target_accuracy is not None and not 0.0 < target_accuracy <= 1.0:
        raise FedsimError(f"--target-accuracy must be in (0, 1], got {target_accuracy}")
    grid = parse_grid(list(grid_items))
    plan = plan_sweep(scenario, grid, seeds, sets)
    if out is None:
        out = Path("sweeps") / load_scenario(scenario, sets).run.name
    out = Path(out)
    _check_out_dir(out)
    if remote is not None:
        remote.open()                           # connect before anything is written: errors leave no output

    grid_keys = [k for k, _ in grid]
    settings = {"scenario": str(scenario), "grid": dict(grid), "seeds": seeds, "base_seed": plan[0].seed,
                "set": sets, "target_accuracy": target_accuracy}
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(out / SWEEP_FILE, (json.dumps(settings, indent=2) + "\n").encode())

    scenario_text = scenario.read_text(encoding="utf-8")
    rows: dict[str, dict] = {}
    todo: list[SweepRun] = []
    for run in plan:
        run_dir = out / RUNS_DIR / run.run_id
        if _up_to_date(run_dir, run, scenario_text):
            if not (run_dir / PARAMS_FILE).exists():
                write_atomic(run_dir / PARAMS_FILE, (json.dumps(run.params_json(scenario), indent=2) + "\n").encode())
            rows[run.run_id] = _index_row(out, run, target_accuracy)
        else:
            if run_dir.is_dir():
                clear_run_files(run_dir)      # unfinished, failed or stale: redo from scratch (fedsim's files only)
            todo.append(run)
            rows[run.run_id] = _index_row(out, run, target_accuracy) | {"status": "pending"}

    def write_index() -> None:
        _write_index(out, _index_table([rows[r.run_id] for r in plan], grid_keys, settings))

    skipped = len(plan) - len(todo)
    failed = 0
    bar = tqdm(total=len(plan), initial=skipped, unit="run", desc=out.name, file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    try:
        if remote is None:
            execution = _execute(scenario, out, todo, jobs)
        else:
            execution = remote.execute(scenario, out, todo)
        with closing(execution) as results:     # closing: the pool shuts down, queued cluster tasks are cancelled
            for run, status, error in results:
                rows[run.run_id] = _index_row(out, run, target_accuracy, error)
                if status != RunStatus.COMPLETED.value:
                    failed += 1
                    rows[run.run_id]["status"] = RunStatus.FAILED.value
                    bar.write(f"fedsim: run {run.run_id} failed: {error}", file=sys.stderr)
                bar.update(1)
                write_index()                   # an interrupted sweep still leaves a usable index
    finally:
        bar.close()
        for run in todo:                        # interrupted: what the run directories say
            if rows[run.run_id]["status"] == "pending":
                row = _index_row(out, run, target_accuracy)
                rows[run.run_id] = row if row["status"] != "missing" else row | {"status": "pending"}
        write_index()
        if remote is not None:
            remote.close()
    return SweepResult(out, len(plan), skipped, len(todo) - failed, failed)


def _execute(scenario: Path, out: Path, todo: list[SweepRun], jobs: int):
    """Run `todo` in worker processes; yield (run, status, error) as each finishes.

    At most `jobs` runs are submitted at a time, so on Ctrl-C no queued run starts after the interrupt.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if not todo:
        return
    queue = iter(todo)
    in_flight: dict = {}
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=_mp_context(),
                               initializer=_init_worker, initargs=(os.getpid(),))

    def submit_next() -> None:
        run = next(queue, None)
        if run is not None:
            in_flight[pool.submit(_run_one, str(scenario), run.overrides, str(out / RUNS_DIR / run.run_id),
                                  run.params_json(scenario))] = run

    try:
        for _ in range(min(jobs, len(todo))):
            submit_next()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                run = in_flight.pop(future)
                try:
                    status, error = future.result()
                except Exception as exc:        # the worker process died (BrokenProcessPool, ...)
                    status, error = RunStatus.FAILED.value, f"{type(exc).__name__}: {exc}"
                submit_next()
                yield run, status, error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
