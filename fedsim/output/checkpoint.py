"""Checkpoints of a synchronous run: everything needed to continue it exactly.

What is saved: the global model and the server optimizer (momentum buffers), the next round and the
simulated clock, what the policy has learned (its `PolicyState`, e.g. SALF's depth histogram), the last evaluation, the divergence rule's state
(`server.NumericalHealth`), and how many rows each trace journal held at that instant. What is not saved, because it is rebuilt exactly from the seed: the data,
the partition, the fleet and every round's random draws (each round has its own stream, see server.py).
A checkpoint is written to a temporary file and renamed, so it is either the old one or the new one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from fedsim.errors import TraceError
from fedsim.learn.evaluate import Evaluation
from fedsim.output.rundir import write_atomic

__all__ = ["CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint", "restore_server"]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2


def save_checkpoint(run_dir: Path, server, trace, scenario, base_dir: Path | None) -> None:
    last = server.last_eval
    state = {
        "format": FORMAT,
        "next_round": server.current_round,
        "clock_at": server.clock_at,
        "model": server.model.state_dict(),
        "optimizer": server.optimizer.state_dict(),
        # the policy's learned state as JSON text (None: a policy that learns nothing)
        "policy_state": json.dumps(None if server.policy_state is None else server.policy_state.to_json()),
        "last_eval": None if last is None else [last.loss, last.accuracy],
        "rows": trace.rows_written(),
        # the divergence rule's running state (reference loss, streak, dropped updates), as JSON text
        "health": json.dumps(server.health.state()),
        "scenario": {"source": scenario.source, "text": scenario.text, "overrides": list(scenario.overrides),
                     "base_dir": None if base_dir is None else str(base_dir)},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(Path(run_dir) / CHECKPOINT_FILE, buf.getvalue())


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_FILE
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise TraceError(f"{run_dir}: no {CHECKPOINT_FILE}; run with --checkpoint-every N to make one") from None
    except Exception as exc:          # torch raises many types for a damaged file
        raise TraceError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TraceError(f"{path}: checkpoint of another format ({json.dumps(state.get('format')) if isinstance(state, dict) else '?'}), "
                         f"this fedsim reads format {FORMAT}")
    return state


def restore_server(server, state: dict) -> None:

    server.model.load_state_dict(state["model"])
    server.optimizer.load_state_dict(state["optimizer"])
    server.current_round = int(state["next_round"])
    server.clock_at = float(state["clock_at"])
    server.policy_state = server.policy.restore(json.loads(state["policy_state"]))
    last = state["last_eval"]
    server.last_eval = None if last is None else Evaluation(float(last[0]), float(last[1]))
    if "health" in state:
        server.health.restore(json.loads(state["health"]))
