"""`fedsim sweep`: a scenario run over a cartesian grid of overrides x seeds, one process per core.

With `--cluster` the runs are tasks on a Dask cluster instead (fedsim.cluster.sweep, docs/DISTRIBUTED.md):
same run ids, run directories and index; the sweep directory must be on a filesystem the workers share.

Layout of a sweep directory:

    DIR/sweep.json             the sweep's settings (scenario, grid as given, seeds, --set, target accuracy)
    DIR/index.parquet          one row per run: run id, grid values (typed), seed, status, headline metrics
    DIR/partitioning.parquet   no rows: its schema types the partition columns of runs/ (grid keys, seed)
    DIR/runs/KEY=VALUE/.../seed=S/   an ordinary run directory (see fedsim.output.trace) plus params.json

`runs/` is Hive-partitioned: each grid key, in command-line order, then the seed, is one directory level
(`runs/policy.name=salf/policy.deadline_s=0.1/seed=3/`), so pyarrow, polars and DuckDB read every run's
`rounds.parquet` as one table with the grid keys and the seed as columns. The path is a pure function of the
grid point and the seed (`fedsim.sweep.plan.run_key`): values are parsed as TOML and written canonically
(strings as they are, numbers as Python writes them, `0.10` as `0.1`; other characters than letters, digits
and `._-` percent-encoded; a directory name over 120 bytes cut and given a hash). The run id is that path.

Seeds: `--seeds N` runs every grid point with `run.seed = base + i` for i = 0 .. N-1, where `base` is the
scenario's `run.seed` after `--set`. So `--seeds 1` reproduces `fedsim run` exactly, and
`--set run.seed=100` moves the whole sweep to other seeds. `run.seed` cannot be a grid key.

Resuming: a run is skipped when its `status.json` says completed and the scenario its trace records (text
plus overrides, compared as parsed TOML, so comments do not matter) equals the one planned now;
anything else (missing, running, failed, stale) is deleted and redone. Every grid point's scenario is
validated before anything is written, so bad input leaves no output directory.

Index columns: `run_id`, one column per grid key (bool, int64 or float64 when every value of the key is
one, integers and floats together as float64, else string: the value's text), `seed`, `status`
(`completed`, `failed`, or after an interrupted sweep `pending` / `running`; the index is rewritten after
every run), `policy` (as the trace names it), `rounds`, `final_accuracy` (last evaluated), `best_accuracy`,
`sim_time_s` (end of the last round), `energy_j` (fleet energy, all rounds), `mean_delivered` /
`mean_completed` (participants per round that delivered at least one layer / every layer),
`time_to_target_s`, `energy_to_target_j`, `rounds_to_target` (first evaluated round reaching
`--target-accuracy`; null if not given or not reached), `error`, `run_dir` (relative to DIR), `ignored` (the
grid keys the run's policy or data set ignores). Metrics are computed from `rounds.parquet` only.

One row per grid point and seed. Points that differ only in fields their scenario ignores (`wait` at three
deadlines) share one run, run once: their rows have the same `run_id` and `run_dir`, whose path holds
`KEY=__HIVE_DEFAULT_PARTITION__` (null when read as a partition) for each ignored key.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import FedsimError
from fedsim.output.rundir import RunStatus, clear_run_files, write_atomic, write_status
from fedsim.spec.scenario import load_scenario, parse_scenario
from fedsim.sweep.index import (INDEX_FILE, PARAMS_FILE, PARTITIONING_FILE, RUNS_DIR, SWEEP_FILE, _index_row,
                                 _index_table, _up_to_date, _write_index, _write_partitioning, grid_types, point_rows,
                                 read_index, run_metrics)
from fedsim.sweep.plan import SweepRun, parse_grid, plan_sweep, run_key
from fedsim.sweep.progress import SweepProgress

__all__ = ["SweepRun", "SweepResult", "parse_grid", "plan_sweep", "run_key", "run_sweep", "run_metrics",
           "read_index", "INDEX_FILE", "SWEEP_FILE", "PARAMS_FILE", "PARTITIONING_FILE", "RUNS_DIR", "default_jobs"]


@dataclass(frozen=True)
class SweepResult:
    out: Path
    total: int
    skipped: int
    completed: int
    failed: int
    points: int = 0          # grid points x seeds: more than `total` when some differ only in ignored fields


# -- planning ------------------------------------------------------------------------------------

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
             base_dir: str | None = None, rounds=None) -> tuple[str, str | None]:
    """Worker: run one scenario into `run_dir`; never raises, reports ("completed"|"failed", error).

    On a Dask cluster the scenario comes as `text` (with its folder `base_dir`) under its name `scenario`:
    a worker may not share the driver's working directory, and the trace must record the same name.
    `rounds`: a queue that gets (run id, rounds done) after each round, for the sweep's progress.
    """
    from fedsim.run import run_scenario

    run_path = Path(run_dir)
    try:
        scn = (load_scenario(scenario, list(overrides)) if text is None
               else parse_scenario(text, scenario, list(overrides), base_dir=Path(base_dir)))
        report = None
        if rounds is not None:
            run_id = params.get("run_id", run_dir)

            def report(done: int, sim_s: float, acc: float | None) -> None:
                rounds.put((run_id, done))
        run_scenario(scn, run_path, report, force=True)
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
        out = Path("sweeps") / load_scenario(scenario, list(plan[0].overrides)).run.name
    out = Path(out)
    _check_out_dir(out)
    if remote is not None:
        remote.open()                           # connect before anything is written: errors leave no output

    types = grid_types(plan, [k for k, _ in grid])
    settings = {"scenario": str(scenario), "grid": dict(grid), "seeds": seeds, "base_seed": plan[0].seed,
                "set": sets, "target_accuracy": target_accuracy}
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(out / SWEEP_FILE, (json.dumps(settings, indent=2) + "\n").encode())
    _write_partitioning(out, types)

    scenario_text = scenario.read_text(encoding="utf-8")
    rows: dict[str, dict] = {}
    todo: list[SweepRun] = []
    for run in plan:
        run_dir = out / RUNS_DIR / run.run_id
        if _up_to_date(run_dir, run, scenario_text):
            if not (run_dir / PARAMS_FILE).exists():
                write_atomic(run_dir / PARAMS_FILE, (json.dumps(run.params_json(scenario), indent=2) + "\n").encode())
            rows[run.run_id] = _index_row(out, run, target_accuracy, types=types)
        else:
            if run_dir.is_dir():
                clear_run_files(run_dir)      # unfinished, failed or stale: redo from scratch (fedsim's files only)
            todo.append(run)
            rows[run.run_id] = _index_row(out, run, target_accuracy, types=types) | {"status": "pending"}

    def write_index() -> None:
        _write_index(out, _index_table([row for r in plan for row in point_rows(r, rows[r.run_id], types)],
                                       types, settings))

    skipped = len(plan) - len(todo)
    failed = 0
    bar = SweepProgress(out.name, len(plan), skipped, progress)
    try:
        if remote is None:
            execution = _execute(scenario, out, todo, jobs, on_round=bar.round_done if progress else None)
        else:
            execution = remote.execute(scenario, out, todo)
        with closing(execution) as results:     # closing: the pool shuts down, queued cluster tasks are cancelled
            for run, status, error in results:
                rows[run.run_id] = _index_row(out, run, target_accuracy, error, types)
                if status != RunStatus.COMPLETED.value:
                    failed += 1
                    rows[run.run_id]["status"] = RunStatus.FAILED.value
                bar.run_ended(run.run_id, None if status == RunStatus.COMPLETED.value else error)
                write_index()                   # an interrupted sweep still leaves a usable index
    finally:
        bar.close()
        for run in todo:                        # interrupted: what the run directories say
            if rows[run.run_id]["status"] == "pending":
                row = _index_row(out, run, target_accuracy, types=types)
                rows[run.run_id] = row if row["status"] != "missing" else row | {"status": "pending"}
        write_index()
        if remote is not None:
            remote.close()
    return SweepResult(out, len(plan), skipped, len(todo) - failed, failed, sum(len(r.points) for r in plan))


def _execute(scenario: Path, out: Path, todo: list[SweepRun], jobs: int, on_round=None):
    """Run `todo` in worker processes; yield (run, status, error) as each finishes.

    At most `jobs` runs are submitted at a time, so on Ctrl-C no queued run starts after the interrupt.
    `on_round(run_id, rounds_done)` hears of the runs under way (about once a second, from this process).
    """
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if not todo:
        return
    queue = iter(todo)
    in_flight: dict = {}
    ctx = _mp_context()
    manager = ctx.Manager() if on_round is not None else None
    rounds = manager.Queue() if manager is not None else None
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                               initializer=_init_worker, initargs=(os.getpid(),))

    def submit_next() -> None:
        run = next(queue, None)
        if run is not None:
            in_flight[pool.submit(_run_one, str(scenario), run.overrides, str(out / RUNS_DIR / run.run_id),
                                  run.params_json(scenario), None, None, rounds)] = run

    def drain() -> None:
        while rounds is not None:
            try:
                on_round(*rounds.get_nowait())
            except (queues.Empty, OSError, EOFError):
                return

    try:
        for _ in range(min(jobs, len(todo))):
            submit_next()
        while in_flight:
            done, _ = wait(in_flight, timeout=1.0, return_when=FIRST_COMPLETED)
            drain()
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
        if manager is not None:
            manager.shutdown()
