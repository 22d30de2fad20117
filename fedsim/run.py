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
from fedsim.engine import serve_rounds
from fedsim.rundir import RunStatus, prepare_run_dir, write_status
from fedsim.scenario import Scenario
from fedsim.server import Server
from fedsim.trace import SCHEMA_VERSION, TraceWriter

__all__ = ["RunSummary", "run_scenario", "trace_metadata"]


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
    }


ProgressFn = Callable[[int, float, float | None], None]


def run_scenario(scn: Scenario, run_dir: Path, progress: ProgressFn | None = None,
                 components: Components | None = None) -> RunSummary:
    """Run `scn` into `run_dir`. Bad input is detected (FedsimError) before the directory is touched."""
    comp = components if components is not None else build_components(scn)
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir)
    write_status(run_dir, RunStatus.RUNNING, rounds_done=0)
    trace = TraceWriter(run_dir, trace_metadata(scn))
    try:
        server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        env = simpy.Environment()

        def on_round(done: int) -> None:
            if progress is not None:
                acc = server.last_eval.accuracy if server.last_eval else None
                progress(done, server.clock_at, acc)

        env.process(serve_rounds(env, server, scn.run.rounds, on_round))
        env.run()
        trace.close()
        torch.save(comp.model.state_dict(), run_dir / "model.pt")
    except BaseException as exc:
        trace.close()
        write_status(run_dir, RunStatus.FAILED, rounds_done=server.current_round if "server" in locals() else 0,
                     error=f"{type(exc).__name__}: {exc}")
        raise
    last = server.last_eval
    write_status(run_dir, RunStatus.COMPLETED, rounds_done=scn.run.rounds, sim_time_s=server.clock_at,
                 test_accuracy=None if last is None else last.accuracy)
    return RunSummary(run_dir, scn.run.rounds, server.clock_at, None if last is None else last.accuracy,
                      None if last is None else last.loss)
