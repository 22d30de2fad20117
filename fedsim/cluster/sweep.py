"""`fedsim sweep --cluster`: each run of the sweep is one Dask task running the function the local process
pool runs (`fedsim.sweep._run_one`), writing into the sweep directory, which every worker must see at the
same path (a shared filesystem). Same run ids, traces and index as a local sweep; resumable alike.

`ClusterSweep` is what `fedsim.cli` hands to `fedsim.sweep.run_sweep` as its `remote`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

from fedsim.cluster.session import open_cluster, single_thread
from fedsim.output.rundir import RunStatus, clear_run_files
from fedsim.sweep import RUNS_DIR, _run_one

__all__ = ["ClusterSweep", "sweep_on_cluster", "sweep_task"]


def sweep_task(scenario: str, overrides: tuple[str, ...], run_dir: str, params: dict, text: str,
               base_dir: str) -> tuple[str, str | None]:
    """Worker side of a sweep on a cluster: one run, through the local pool's own `_run_one`."""
    single_thread()
    # The sweep cleared every directory it submitted; files there now were left by an earlier attempt of
    # this very task, whose worker died (Dask re-runs the task elsewhere): start it afresh (fedsim's files only).
    if Path(run_dir).is_dir():
        clear_run_files(Path(run_dir))
    return _run_one(scenario, overrides, run_dir, params, text=text, base_dir=base_dir)


def sweep_on_cluster(client, scenario: Path, out: Path, todo: list) -> Iterator[tuple[Any, str, str | None]]:
    """Submit every run of `todo` to the cluster; yield (run, status, error) as each finishes.

    Runs are submitted at once and the scheduler balances them over the workers; on an interrupt the
    ones not started are dropped (a run already running on a remote worker finishes there, and the
    next sweep takes it as done if it completed). The scenario travels as text, under the name the
    driver uses, so traces record exactly what a local sweep records.
    """
    from distributed import as_completed

    if not todo:
        return
    scenario = Path(scenario)
    text = scenario.read_text(encoding="utf-8")
    base_dir = str(scenario.resolve().parent)
    tag = uuid.uuid4().hex[:8]
    futures = {}
    for run in todo:
        run_dir = (Path(out) / RUNS_DIR / run.run_id).resolve()      # workers need not share our cwd
        future = client.submit(sweep_task, str(scenario), tuple(run.overrides), str(run_dir),
                               run.params_json(scenario), text, base_dir, key=f"fedsim-run-{tag}-{run.run_id}")
        futures[future] = run
    try:
        for future in as_completed(list(futures)):
            run = futures[future]
            try:
                status, error = future.result()
            except Exception as exc:        # the task was lost: its workers kept dying (KilledWorker), ...
                status, error = RunStatus.FAILED.value, f"{type(exc).__name__}: {exc}"
            yield run, status, error
    finally:
        for future in futures:      # the scheduler drops tasks no client holds: runs not started never start
            future.release()        # (a local call: unlike client.cancel, it cannot wait on a lost scheduler)


class ClusterSweep:
    """The runs of a sweep as tasks on `cluster` (a `--cluster` text, a ClusterSpec or a `distributed.Client`):
    `fedsim.sweep.run_sweep`'s `remote`."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.session = None

    def open(self) -> None:
        self.session = open_cluster(self.cluster)

    def execute(self, scenario: Path, out: Path, todo: list) -> Iterator[tuple[Any, str, str | None]]:
        return sweep_on_cluster(self.session.client, scenario, out, todo)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
