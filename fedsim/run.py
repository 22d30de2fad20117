"""Run one scenario end to end: build the components, run the SimPy engine, write the run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import simpy
import torch

from fedsim import __version__
from fedsim.build import Components, build_components
from fedsim.async_engine import AsyncServer, serve_async
from fedsim.engine import run_events, serve_rounds
from fedsim.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_server, save_checkpoint
from fedsim.distributed import sharded_grads
from fedsim.errors import ScenarioError, TraceError
from fedsim.rundir import RunStatus, prepare_run_dir, read_status, write_status
from fedsim.scenario import Scenario, parse_scenario
from fedsim.server import Server
from fedsim.strategies.fedasync import is_asynchronous
from fedsim.trace import SCHEMA_VERSION, TraceWriter

__all__ = ["RunSummary", "run_scenario", "resume_run", "trace_metadata"]


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    rounds: int
    sim_time_s: float
    test_accuracy: float | None
    test_loss: float | None


def trace_metadata(scn: Scenario) -> dict[str, str]:
    return {
        "fedsim.version": __version__,
        "fedsim.schema_version": SCHEMA_VERSION,
        "torch.version": torch.__version__,
        "scenario.source": scn.source,
        "scenario.text": scn.text,
        "scenario.overrides": json.dumps(list(scn.overrides)),
        "run.seed": str(scn.run.seed),
        "policy": scn.policy.describe(),
        # the deadline in force (empty for policies without one): what analysis draws on timelines
        "policy.deadline_s": "" if scn.policy.deadline_s is None else repr(float(scn.policy.deadline_s)),
    }


ProgressFn = Callable[[int, float, float | None], None]


def run_scenario(scn: Scenario, run_dir: Path, progress: ProgressFn | None = None,
                 components: Components | None = None, checkpoint_every: int | None = None,
                 base_dir: Path | None = None, cluster=None) -> RunSummary:
    """Run `scn` into `run_dir`. Bad input is detected (FedsimError) before the directory is touched.

    `checkpoint_every` N saves `checkpoint.pt` after every N rounds (synchronous policies), and
    `base_dir` (the scenario file's folder) is recorded so `resume_run` can re-read relative paths.
    `cluster` (a `--cluster` text or a `distributed.Client`) computes the gradients on a Dask cluster
    (fedsim.distributed.ShardedGradientEngine); the engine, clock and trace stay in this process.
    """
    if checkpoint_every is not None and is_asynchronous(scn.policy):
        raise ScenarioError(scn.source, "policy.name",
                            f"checkpoints are supported for synchronous policies, not {scn.policy.name}")
    comp = components if components is not None else build_components(scn)
    with sharded_grads(cluster, scn, comp) as grads:     # shards load on the workers before any output
        run_dir = Path(run_dir)
        prepare_run_dir(run_dir)
        write_status(run_dir, RunStatus.RUNNING, rounds_done=0)
        trace = TraceWriter(run_dir, trace_metadata(scn))
        return _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state=None, grads=grads)


def resume_run(run_dir: Path, progress: ProgressFn | None = None, checkpoint_every: int | None = None,
               cluster=None) -> RunSummary:
    """Continue a run from its last checkpoint; the result is identical to an uninterrupted run."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status["status"] == RunStatus.COMPLETED.value:
        raise TraceError(f"{run_dir}: the run already completed; nothing to resume")
    state = load_checkpoint(run_dir)
    meta = state["scenario"]
    base_dir = None if meta["base_dir"] is None else Path(meta["base_dir"])
    scn = parse_scenario(meta["text"], meta["source"], meta["overrides"], base_dir=base_dir)
    comp = build_components(scn)
    with sharded_grads(cluster, scn, comp) as grads:
        write_status(run_dir, RunStatus.RUNNING, rounds_done=int(state["next_round"]))
        trace = TraceWriter(run_dir, trace_metadata(scn), keep_rows=state["rows"])
        return _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state, grads=grads)


def _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state, grads=None) -> RunSummary:
    try:
        asynchronous = is_asynchronous(scn.policy)     # fedasync / fedbuff: no rounds (fedsim/async_engine.py)
        parts = (scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        server = AsyncServer(*parts) if asynchronous else Server(*parts, grads=grads)
        if state is not None:
            restore_server(server, state)
        env = simpy.Environment(initial_time=server.clock_at)

        def on_round(done: int) -> None:
            if checkpoint_every and done % checkpoint_every == 0 and done < scn.run.rounds:
                save_checkpoint(run_dir, server, trace, scn, base_dir)
                write_status(run_dir, RunStatus.RUNNING, rounds_done=done, checkpoint_round=done)
            if progress is not None:
                acc = server.last_eval.accuracy if server.last_eval else None
                progress(done, server.clock_at, acc)

        if asynchronous:
            env.process(serve_async(env, server, on_round))
        else:
            env.process(serve_rounds(env, server, scn.run.rounds, on_round))
        run_events(env)
        trace.close()
        torch.save(comp.model.state_dict(), run_dir / "model.pt")
    except BaseException as exc:
        trace.close(complete=False)
        write_status(run_dir, RunStatus.FAILED, rounds_done=server.current_round if "server" in locals() else 0,
                     error=f"{type(exc).__name__}: {exc}")
        raise
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    last = server.last_eval
    write_status(run_dir, RunStatus.COMPLETED, rounds_done=server.current_round, sim_time_s=server.clock_at,
                 test_accuracy=None if last is None else last.accuracy)
    return RunSummary(run_dir, server.current_round, server.clock_at, None if last is None else last.accuracy,
                      None if last is None else last.loss)
