"""Nothing lost: SIGKILL in the middle of a run, then resume; and dead runs are never taken as finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import BASE_TOML, REPO, run
from fedsim.cli import main

ROUNDS = 400


def _start(tmp_path, out, *extra):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(out), "--quiet",
           "--set", f"run.rounds={ROUNDS}", "--set", "run.eval_every=50", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after(proc, out, predicate, timeout_s=60.0):
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed: " + proc.stderr.read().decode())
        if time.monotonic() - start > timeout_s:
            proc.kill()
            pytest.fail("no progress to kill after")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _status(out):
    return json.loads((out / "status.json").read_text())


def _tables(out):
    return {n: pq.read_table(out / f"{n}.parquet") for n in ("events", "rounds", "devices")}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    straight = run(tmp_path, f"run.rounds={ROUNDS}", "run.eval_every=50", name="straight")
    out = tmp_path / "killed"
    proc = _start(tmp_path, out, "--checkpoint-every", "7")
    _kill_after(proc, out, lambda: _status(out).get("checkpoint_round", 0) >= 14 if (out / "status.json").exists() else False)
    assert _status(out)["status"] == "running"          # a dead run never says completed
    assert not (out / "rounds.parquet").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert _status(out)["status"] == "completed"
    assert not (out / "checkpoint.pt").exists()
    a, b = _tables(straight), _tables(out)
    for name in a:
        assert a[name].equals(b[name]), name
    ma, mb = torch.load(straight / "model.pt"), torch.load(out / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_sigkill_leaves_readable_trace_up_to_last_round(tmp_path):
    from fedsim.output.trace import read_journal

    out = tmp_path / "dead"
    proc = _start(tmp_path, out)
    journal = out / "rounds.arrows"
    _kill_after(proc, out, lambda: journal.exists() and journal.stat().st_size > 20_000)
    assert _status(out)["status"] == "running"
    rounds = read_journal(journal)
    n = rounds.num_rows
    assert 0 < n < ROUNDS
    assert rounds.column("round").to_pylist() == list(range(n))      # complete rounds, in order
    events = read_journal(out / "events.arrows")
    last = max(events.column("round").to_pylist())
    assert last <= n                                      # at most the round in flight beyond them
    # every completed round's events are all there: each ends with a round_end event
    ends = [r for r, e in zip(events.column("round").to_pylist(), events.column("event").to_pylist()) if e == "round_end"]
    assert ends[: n] == list(range(n))


def test_resume_refuses_completed_and_foreign_dirs(tmp_path, capsys):
    done = run(tmp_path, name="done")
    assert main(["run", "--resume", str(done), "--quiet"]) == 2
    assert "already completed" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "--resume", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "not a fedsim run directory" in capsys.readouterr().err
