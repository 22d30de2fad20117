"""Run one scenario end to end: build the components, run the SimPy engine, write the run directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import simpy
import torch

from fedsim import __version__
from fedsim.sim.build import Components, build_components
from fedsim.sim.async_engine import AsyncServer, serve_async
from fedsim.sim.engine import run_events, serve_rounds
from fedsim.output.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_server, save_checkpoint
from fedsim.errors import ScenarioError, TraceError
from fedsim.output.rundir import (RunStatus, existing_marker, open_run_dir, prepare_run_dir, read_status,
                                  resolved_scenario, scenario_identity, write_atomic, write_marker, write_status)
from fedsim.spec.scenario import Scenario, parse_scenario
from fedsim.sim.server import Server
from fedsim.policies import FixedDeadline, is_asynchronous
from fedsim.output.trace import SCHEMA_VERSION, TraceWriter

__all__ = ["RunSummary", "run_scenario", "resume_run", "trace_metadata", "trace_description"]


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    rounds: int
    sim_time_s: float
    test_accuracy: float | None
    test_loss: float | None
    warnings: dict | None = None      # e.g. updates dropped as non-finite; None when there were none


def trace_metadata(scn: Scenario) -> dict[str, str]:
    deadline = _fixed_deadline_s(scn)
    return {
        "fedsim.version": __version__,
        "fedsim.schema_version": SCHEMA_VERSION,
        "torch.version": torch.__version__,
        "scenario.source": scn.source,
        "scenario.text": scn.text,
        "scenario.overrides": json.dumps(list(scn.overrides)),
        "run.seed": str(scn.run.seed),
        "policy": scn.policy.describe(),
        # the fixed deadline in force (empty for policies without one, or whose deadline changes each round):
        # what analysis draws on timelines
        "policy.deadline_s": "" if deadline is None else repr(deadline),
        **({} if _lr_by_round(scn) is None else {"training.lr_by_round": json.dumps(_lr_by_round(scn))}),
    }


def _lr_by_round(scn: Scenario) -> list[float] | None:
    """The learning rate of every round 0..run.rounds-1 when `training.lr_schedule` is set (None: `lr` throughout)."""
    t = scn.training
    return None if t.lr_schedule is None else t.lr_schedule.rates(t.lr, scn.run.rounds)


def _fixed_deadline_s(scn: Scenario) -> float | None:
    """The deadline of every round, for policies with a fixed one (None: no deadline, or one per round)."""
    return scn.policy.fixed_deadline_s if isinstance(scn.policy, FixedDeadline) else None


def trace_description(scn: Scenario) -> dict:
    """`trace.json`: the trace metadata as JSON values, the resolved scenario and its identity (the hashes
    of fedsim-run.json: `scenario` with the seed, `group` without)."""
    deadline = _fixed_deadline_s(scn)
    return {
        "fedsim_version": __version__,
        "torch_version": torch.__version__,
        "run_seed": scn.run.seed,
        "policy": scn.policy.describe(),
        "deadline_s": deadline,
        "scenario_source": scn.source,
        "scenario_overrides": list(scn.overrides),
        "scenario_text": scn.text,
        "scenario": resolved_scenario(scn.text, scn.overrides),
        "identity": scenario_identity(scn.text, scn.overrides, scn.all_ignored),
        "ignored": list(scn.all_ignored),      # fields given that have no effect on this run
        **({} if _lr_by_round(scn) is None else {"lr_by_round": _lr_by_round(scn)}),
    }


ProgressFn = Callable[[int, float, float | None], None]


def run_scenario(scn: Scenario, run_dir: Path, progress: ProgressFn | None = None,
                 components: Components | None = None, checkpoint_every: int | None = None,
                 base_dir: Path | None = None, gradients=None, force: bool = False) -> RunSummary:
    """Run `scn` into `run_dir`. Bad input is detected (FedsimError) before the directory is touched.

    `run_dir` must be new, empty, or a fedsim run directory (see fedsim.output.rundir): a completed or
    interrupted run there is replaced only with `force`, and only fedsim's own files are removed.
    `checkpoint_every` N saves `checkpoint.pt` after every N rounds (synchronous policies), and
    `base_dir` (the scenario file's folder) is recorded so `resume_run` can re-read relative paths.
    `gradients`, a callable `(scn, components)` returning a context manager that yields a gradient engine,
    computes the gradients elsewhere (`fedsim.cluster.shards.cluster_gradients`: on a Dask cluster); the engine,
    clock and trace stay in this process. None: the local engine.
    """
    if checkpoint_every is not None and is_asynchronous(scn.policy):
        raise ScenarioError(scn.source, "policy.name",
                            f"checkpoints are supported for synchronous policies, not {scn.policy.name}")
    comp = components if components is not None else build_components(scn)
    with _gradients(gradients, scn, comp) as grads:     # shards load on the workers before any output
        run_dir = Path(run_dir)
        with prepare_run_dir(run_dir, force=force):
            write_marker(run_dir, scn, base_dir)
            write_status(run_dir, RunStatus.RUNNING, rounds_done=0, pid=os.getpid())
            trace = TraceWriter(run_dir, trace_metadata(scn), description=trace_description(scn))
            return _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state=None,
                            grads=grads)


def _marked_scenario(marker: dict) -> tuple[Scenario, Path | None]:
    """The scenario a run directory's marker records, and the folder its relative paths start from."""
    meta = marker["scenario"]
    base_dir = None if meta["base_dir"] is None else Path(meta["base_dir"])
    return parse_scenario(meta["text"], meta["source"], meta["overrides"], base_dir=base_dir), base_dir


def resume_scenario(run_dir: Path) -> Scenario:
    """The scenario of the run in `run_dir` (what `resume_run` continues), read without locking it."""
    return _marked_scenario(existing_marker(run_dir))[0]


def resume_run(run_dir: Path, progress: ProgressFn | None = None, checkpoint_every: int | None = None,
               gradients=None) -> RunSummary:
    """Continue an interrupted or failed run; the result is identical to an uninterrupted run.

    From its last checkpoint if it has one, else from the start (the scenario is in the run directory's
    marker). A crash at any instant of a run, of its finalisation or of a resume can be resumed.
    """
    run_dir = Path(run_dir)
    lock, marker = open_run_dir(run_dir)
    with lock:
        try:
            status = read_status(run_dir)
        except TraceError:             # killed between writing the marker and the first status
            status = {"status": RunStatus.RUNNING.value}
        if status["status"] == RunStatus.COMPLETED.value:
            _discard_leftovers(run_dir)
            raise TraceError(f"{run_dir}: the run already completed; nothing to resume")
        has_checkpoint = (run_dir / CHECKPOINT_FILE).exists()
        state = load_checkpoint(run_dir) if has_checkpoint else None
        scn, base_dir = _marked_scenario(marker)
        comp = build_components(scn)
        with _gradients(gradients, scn, comp) as grads:
            next_round = 0 if state is None else int(state["next_round"])
            write_status(run_dir, RunStatus.RUNNING, rounds_done=next_round, pid=os.getpid(),
                         **({} if state is None else {"checkpoint_round": next_round}))
            keep = {"events": 0, "devices": 0, "rounds": 0} if state is None else state["rows"]
            trace = TraceWriter(run_dir, trace_metadata(scn), keep_rows=keep,
                                  description=trace_description(scn))
            return _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state, grads=grads)


def _gradients(gradients, scn, comp):
    return contextlib.nullcontext(None) if gradients is None else gradients(scn, comp)


def _discard_leftovers(run_dir: Path) -> None:
    """What a crash after the final status (the commit point) may have left: journals and checkpoint."""
    for name in ("events.arrows", "devices.arrows", "rounds.arrows", CHECKPOINT_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _execute(scn, comp, run_dir, trace, progress, checkpoint_every, base_dir, state, grads=None) -> RunSummary:
    server = None
    try:
        asynchronous = is_asynchronous(scn.policy)     # fedasync / fedbuff: no rounds (fedsim/sim/async_engine.py)
        parts = (scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        server = AsyncServer(*parts) if asynchronous else Server(*parts, grads=grads)
        if state is not None:
            restore_server(server, state)
        env = simpy.Environment(initial_time=server.clock_at)

        def on_round(done: int) -> None:
            if checkpoint_every and done % checkpoint_every == 0 and done < scn.run.rounds:
                save_checkpoint(run_dir, server, trace, scn, base_dir)
                write_status(run_dir, RunStatus.RUNNING, rounds_done=done, checkpoint_round=done, pid=os.getpid())
            if progress is not None:
                acc = server.last_eval.accuracy if server.last_eval else None
                progress(done, server.clock_at, acc)

        if asynchronous:
            env.process(serve_async(env, server, on_round))
        else:
            env.process(serve_rounds(env, server, scn.run.rounds, on_round))
        run_events(env)
        # Finalisation: every file goes to a temporary name and is renamed; the journals and the checkpoint
        # stay until the final status is written, so a crash at any instant before it leaves a run that
        # `resume_run` continues, and one after it leaves a completed run.
        trace.close(last_round=server.last_row_values())
        buf = io.BytesIO()
        torch.save(comp.model.state_dict(), buf)
        write_atomic(run_dir / "model.pt", buf.getvalue())
        last = server.last_eval
        extra = _warnings(server)
        write_status(run_dir, RunStatus.COMPLETED, rounds_done=server.current_round, sim_time_s=server.clock_at,
                     test_accuracy=None if last is None else last.accuracy, **extra)
    except BaseException as exc:
        trace.close(complete=False)
        _record_failure(run_dir, server, exc)
        raise
    trace.discard_journals()
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return RunSummary(run_dir, server.current_round, server.clock_at, None if last is None else last.accuracy,
                      None if last is None else last.loss, extra.get("warnings"))


def _warnings(server) -> dict:
    """`{"warnings": {...}}` when the run completed with warnings (e.g. updates dropped as non-finite)."""
    report = getattr(server, "warnings", None)
    found = report() if callable(report) else None
    return {"warnings": found} if found else {}


def _record_failure(run_dir: Path, server, exc: BaseException) -> None:
    """Status `failed` with the reason, if the disk still takes it; the original error is what is raised."""
    if isinstance(exc, KeyboardInterrupt):
        error = "interrupted (Ctrl-C); continue with `fedsim run --resume`"
    elif isinstance(exc, SystemExit):
        error = f"user code called sys.exit({exc.code!r})"
    else:
        error = f"{type(exc).__name__}: {exc}"
    try:
        write_status(run_dir, RunStatus.FAILED, rounds_done=0 if server is None else server.current_round,
                     error=error)
    except OSError:
        pass
