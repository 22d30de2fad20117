"""The command line: exit codes, error messages naming file/field/value, no half-written output."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML, REPO, run, table
from fedsim.cli import main

BAD = [
    # (description, edit of the base text, words the message must contain)
    ("missing field", lambda t: t.replace("rounds = 3\n", ""), ["run.rounds", "missing"]),
    ("wrong type", lambda t: t.replace("rounds = 3", 'rounds = "three"'), ["run.rounds", "'three'"]),
    ("negative count", lambda t: t.replace("count = 4\nspeed_flops = 2.0e7", "count = -3\nspeed_flops = 2.0e7"),
     ["fleet.classes[1].count", "positive integer", "-3"]),
    ("unknown policy", lambda t: t.replace('name = "salf"', 'name = "salsa"'), ["policy.name", "'salsa'"]),
    ("unknown dataset", lambda t: t.replace('name = "synthetic"', 'name = "cifar"'), ["data.name", "'cifar'"]),
    ("missing dataset directory", lambda t: t.replace('name = "synthetic"', 'name = "mnist"\ndir = "/nonexistent/mnist"'),
     ["data.dir", "/nonexistent/mnist"]),
    ("malformed TOML", lambda t: t.replace("[run]", "[run"), ["malformed TOML"]),
    ("unknown key", lambda t: t.replace("lr = 0.1", "lr = 0.1\nlearning_rate = 0.1"), ["training.learning_rate", "unknown"]),
    ("nan", lambda t: t.replace("lr = 0.1", "lr = nan"), ["training.lr", "finite"]),
    ("absurd fleet", lambda t: t.replace("count = 4\nspeed_flops = 2.0e7", "count = 1000000000\nspeed_flops = 2.0e7"),
     ["fleet.classes[1].count", "1000000000"]),
    ("bad distribution", lambda t: t.replace('dist = "uniform"', 'dist = "gamma"'), ["fleet.classes[0].slowdown.dist", "'gamma'"]),
]


@pytest.mark.parametrize("desc,edit,words", BAD, ids=[b[0] for b in BAD])
def test_bad_scenarios_exit_2_naming_the_field(tmp_path, capsys, desc, edit, words):
    path = tmp_path / "bad.toml"
    path.write_text(edit(BASE_TOML))
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_override_names_the_key(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    assert main(["validate", str(path), "--set", "policy.deadline_s=-1"]) == 2
    assert "policy.deadline_s" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "fleet.classes[5].count=1"]) == 2
    assert "fleet.classes[5].count" in capsys.readouterr().err


def test_run_and_validate_subprocess(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(tmp_path / "r"),
                          "--set", "policy.deadline_s=0.05"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "round" in res.stderr                     # the progress bar
    for name in ("events", "rounds", "devices"):
        meta = pq.read_metadata(tmp_path / "r" / f"{name}.parquet").metadata
        assert meta[b"run.seed"] == b"3"
        assert b"policy.deadline_s=0.05" in meta[b"scenario.overrides"]
        assert meta[b"scenario.text"].decode() == BASE_TOML
    assert (tmp_path / "r" / "model.pt").exists()
    assert '"completed"' in (tmp_path / "r" / "status.json").read_text()


def test_the_command_exits_as_main_returns_and_its_trace_is_whole(tmp_path):
    """`python -m fedsim.cli` (the `fedsim` entry) skips the interpreter's last garbage scan: what it wrote is
    the run `main` writes in process, every row, and a bad input still exits 2."""
    import tomllib

    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(tmp_path / "cmd"),
                          "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert main(["run", str(path), "--out", str(tmp_path / "inproc"), "--quiet"]) == 0
    for name in ("events", "rounds", "devices"):
        a, b = pq.read_table(tmp_path / "cmd" / f"{name}.parquet"), pq.read_table(tmp_path / "inproc" / f"{name}.parquet")
        assert a.num_rows > 0 and a.equals(b)
    assert '"completed"' in (tmp_path / "cmd" / "status.json").read_text()
    bad = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(path), "--set", "policy.deadline_s=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "policy.deadline_s" in bad.stderr and "Traceback" not in bad.stderr
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedsim"] == "fedsim.cli:entry"


def test_same_seed_same_trace_other_seed_differs(tmp_path):
    a = run(tmp_path, name="a")
    b = run(tmp_path, name="b")
    c = run(tmp_path, "run.seed=4", name="c")
    for name in ("events", "rounds", "devices"):
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.equals(tb) and ta.schema.metadata == tb.schema.metadata
    assert table(a, "rounds") != table(c, "rounds")


def test_shipped_scenarios_validate():
    for path in sorted((REPO / "scenarios").rglob("*.toml")):
        assert main(["validate", str(path)]) == 0, path


def test_validate_into_a_closed_pipe_stops_quietly(tmp_path):
    """`fedsim validate s.toml | head -1`: the reader leaves; no error message, the shell's SIGPIPE status."""
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "validate", str(path), "--set",
                             'training.lr_schedule={ kind = "step", every = 2, factor = 0.5 }'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                 # before the command prints anything (its imports take a second)
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == "", err


def test_validate_names_the_budget_and_the_learning_rate_schedule(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(path), "--set", "run.time_budget_s=2",
                          "--set", 'training.lr_schedule={ kind = "step", every = 2, factor = 0.5 }'],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "3 rounds, time budget 2 s" in res.stdout
    assert "training  batch 8, 1 local step, lr 0.1, step (every 2, factor 0.5)" in res.stdout
