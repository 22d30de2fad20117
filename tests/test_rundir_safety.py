"""Run directories: fedsim's or untouched, one writer at a time, and a crash at any instant recoverable.

The crash tests do not depend on timing: a forked copy of the test process runs `fedsim run` (or
`--resume`) with `os.replace` and `os.unlink` (every step that commits a file: marker, status, checkpoint,
Parquet tables, model, journals) wrapped so that the process dies with `os._exit` just before the k-th of
them, exactly as SIGKILL would leave the disk. Every k is tried; each crashed run is then resumed (or
left alone if it had completed) and must equal an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import BASE_TOML, REPO
from fedsim.cli import main
from fedsim.output.rundir import MARKER_FILE, RunLock, read_status, run_state

TABLES = ("events", "devices", "rounds")


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def snapshot(run_dir: Path) -> dict:
    """What a finished run is: its three tables (content and metadata) and its model."""
    out = {name: pq.read_table(run_dir / f"{name}.parquet") for name in TABLES}
    out["model"] = torch.load(run_dir / "model.pt", weights_only=True)
    return out


def assert_same_run(a: dict, b: dict) -> None:
    for name in TABLES:
        assert a[name].equals(b[name]), name
        assert a[name].schema.metadata == b[name].schema.metadata, name
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# -- a directory is fedsim's or it is not touched --------------------------------------------------

def test_folder_with_a_status_file_and_user_files_is_refused_and_kept(tmp_path, scenario_file, capsys):
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "status.json").write_text('{"status": "completed"}')
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    code, err = cli(capsys, "run", str(scenario_file), "--out", str(folder), "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and str(folder) in err and "not a fedsim run directory" in err
    assert (folder / "thesis.tex").read_text() == "my thesis"
    assert (folder / "sub" / "data.csv").read_text() == "1,2,3"
    assert (folder / "status.json").read_text() == '{"status": "completed"}'
    assert sorted(p.name for p in folder.iterdir()) == ["status.json", "sub", "thesis.tex"]


def test_a_file_as_out_is_refused(tmp_path, scenario_file, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    code, err = cli(capsys, "run", str(scenario_file), "--out", str(target), "--quiet")
    assert code == 2 and "is not a directory" in err
    assert target.read_text() == "keep"


def test_completed_run_is_kept_unless_forced_and_force_keeps_user_files(tmp_path, scenario_file, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")[0] == 0
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["scenario"]["text"] == BASE_TOML and marker["run_name"] == "t"
    (out / "notes.md").write_text("what I saw")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, err = cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet", "--set", "run.seed=4")
    assert code == 2 and "holds a completed run" in err and "--force" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet", "--set", "run.seed=4",
               "--force")[0] == 0
    assert (out / "notes.md").read_text() == "what I saw"
    assert json.loads((out / MARKER_FILE).read_text())["scenario"]["overrides"] == ["run.seed=4"]
    assert (out / "rounds.parquet").read_bytes() != before["rounds.parquet"]


def test_failed_run_is_replaced_without_force(tmp_path, scenario_file, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")[0] == 0
    status = read_status(out)
    (out / "status.json").write_text(json.dumps({**status, "status": "failed", "error": "x"}))
    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")[0] == 0
    assert read_status(out)["status"] == "completed"


def test_second_writer_fails_at_once_while_a_run_holds_the_lock(tmp_path, scenario_file, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with RunLock(out):
        assert run_state(out).state == "completed"
        for args in (["run", str(scenario_file), "--out", str(out), "--quiet", "--force"],
                     ["run", "--resume", str(out), "--quiet"]):
            code, err = cli(capsys, *args)
            assert code == 2 and "another fedsim process is writing" in err, args
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


GATED_MODEL = """
import json, os, time
from pathlib import Path
import torch

OUT, GO = Path(os.environ["GATE_OUT"]), Path(os.environ["GATE_GO"])


class Gated(torch.nn.Sequential):
    def forward(self, x):
        # once this process's run has started (its status file names it), hold it until the test says go
        while _running_here() and not GO.exists():
            time.sleep(0.02)
        return super().forward(x)


def _running_here():
    try:
        return json.loads((OUT / "status.json").read_text()).get("pid") == os.getpid()
    except (OSError, ValueError):
        return False


def build(input_shape, num_classes):
    n = 1
    for d in input_shape:
        n *= d
    return Gated(torch.nn.Flatten(), torch.nn.Linear(n, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))
"""


# for sweeps: hold every run (whatever its directory) whose status names this process, forever
GATED_SWEEP_MODEL = GATED_MODEL.replace(
    'return json.loads((OUT / "status.json").read_text()).get("pid") == os.getpid()',
    'return any(json.loads(p.read_text()).get("pid") == os.getpid() for p in Path("RUNS").glob("*/status.json"))')


def test_second_run_on_a_run_under_way_exits_2_and_the_first_completes(tmp_path, scenario_file):
    """End to end, two processes: the second `fedsim run` is refused while the first is held in its first
    round (its model waits for a file the test creates), and the first then completes normally."""
    out, go = tmp_path / "r", tmp_path / "go"
    (tmp_path / "gated.py").write_text(GATED_MODEL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
           "GATE_OUT": str(out), "GATE_GO": str(go)}
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(scenario_file), "--out", str(out), "--quiet",
           "--set", 'model.name="gated:build"']
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while run_state(out).state != "running":     # the first process holds the lock and is running
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(cmd + ["--force"], env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None                  # still held in its first round
        assert second.returncode == 2, second.stderr
        assert "another fedsim process is writing" in second.stderr and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        go.write_text("go")
        first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert read_status(out)["status"] == "completed" and read_status(out)["rounds_done"] == 3


def test_stale_running_status_is_interrupted_and_resumable(tmp_path, scenario_file, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")[0] == 0
    reference = snapshot(out)
    (out / "status.json").write_text(json.dumps({"status": "running", "rounds_done": 1, "pid": 999999}))
    assert run_state(out).state == "interrupted"
    code, err = cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")
    assert code == 2 and "interrupted run" in err and f"--resume {out}" in err
    assert cli(capsys, "run", "--resume", str(out), "--quiet")[0] == 0     # no checkpoint: from the start
    assert_same_run(snapshot(out), reference)


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "status.json").write_text('{"status": "running"}')
    code, err = cli(capsys, "run", "--resume", str(folder), "--quiet")
    assert code == 2 and MARKER_FILE in err
    assert sorted(p.name for p in folder.iterdir()) == ["status.json"]


# -- environment errors ------------------------------------------------------------------------------

def test_read_only_parent_is_one_line_exit_3_and_no_directory(tmp_path, scenario_file, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:          # root ignores permissions: the file system refuses instead
        import errno

        def read_only(path, *a, **k):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(os, "mkdir", read_only)
        reason = "Read-only file system"
    else:
        parent.chmod(0o500)
        reason = "Permission denied"
    try:
        code, err = cli(capsys, "run", str(scenario_file), "--out", str(parent / "r"), "--quiet")
    finally:
        parent.chmod(0o700)
        monkeypatch.undo()
    assert code == 3 and err == f"fedsim: error: {parent / 'r'}: {reason}\n"
    assert not (parent / "r").exists()


def test_os_error_while_writing_is_exit_3_status_failed_and_no_temporaries(tmp_path, scenario_file, capsys,
                                                                            monkeypatch):
    """A full disk at the model write: one line naming the file, status `failed`, no `.tmp` left."""
    import fedsim.output.rundir

    real = fedsim.output.rundir.os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith("model.pt"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(fedsim.output.rundir.os, "replace", full_disk)
    out = tmp_path / "r"
    code, err = cli(capsys, "run", str(scenario_file), "--out", str(out), "--quiet")
    monkeypatch.undo()
    assert code == 3 and err == f"fedsim: error: {out / 'model.pt'}: No space left on device\n"
    assert read_status(out)["status"] == "failed"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert cli(capsys, "run", "--resume", str(out), "--quiet")[0] == 0


# -- a crash at any instant ------------------------------------------------------------------------

def _forked(args: list[str], k: int | None, log: Path | None = None) -> int:
    """Run the CLI in a forked child whose `os.replace` and `os.unlink` calls are counted; it dies
    (`os._exit(137)`, as SIGKILL would leave the disk) just before its k-th call. With `log`, the child
    records each call's target there. Returns the child's exit code."""
    pid = os.fork()
    if pid == 0:                                   # the child: never returns to pytest
        code = 99
        try:
            calls: list[str] = []

            def counted(fn):
                def wrapped(*a, **kw):
                    calls.append(f"{fn.__name__} {Path(a[-1]).name}")
                    if len(calls) == k:
                        os._exit(137)
                    return fn(*a, **kw)
                return wrapped

            os.replace, os.unlink = counted(os.replace), counted(os.unlink)
            sys.stderr = open(os.devnull, "w")
            code = main(args)
            if log is not None:
                log.write_text("\n".join(calls))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _steps(args: list[str], prepare, tmp_path: Path) -> list[str]:
    prepare()
    log = tmp_path / "steps.log"
    assert _forked(args, None, log) == 0
    return log.read_text().splitlines()


def _crash_every_step(args: list[str], prepare, reference: dict, steps: list[str]) -> None:
    """For every step k: prepare the directory, crash just before step k, recover (`--resume`, which
    must say "nothing to resume" if the run had completed), and compare with the uninterrupted run."""
    for k in range(1, len(steps) + 1):
        out = prepare()
        assert _forked(args, k) == 137, f"step {k} ({steps[k - 1]}) was not reached"
        if not (out / MARKER_FILE).exists():           # nothing of the run was written: run it again
            assert all(p.name.endswith(".tmp") for p in out.iterdir()), k     # at most a temporary
            assert main(args) == 0
        else:
            committed = (out / "status.json").exists() and read_status(out)["status"] == "completed"
            assert main(["run", "--resume", str(out), "--quiet"]) == (2 if committed else 0), \
                f"resume after a crash before step {k} ({steps[k - 1]})"
        assert_same_run(snapshot(out), reference)
        leftovers = [p.name for p in out.iterdir() if p.suffix in (".arrows", ".tmp") or p.name == "checkpoint.pt"]
        assert not leftovers, (k, steps[k - 1], leftovers)


@pytest.fixture
def reference(tmp_path, scenario_file) -> dict:
    ref_dir = tmp_path / "ref"
    assert main(["run", str(scenario_file), "--out", str(ref_dir), "--quiet"]) == 0
    return snapshot(ref_dir)


def test_crash_at_every_step_of_a_run_then_resume_equals_uninterrupted(tmp_path, scenario_file, reference, capsys):
    out = tmp_path / "r"
    args = ["run", str(scenario_file), "--out", str(out), "--quiet", "--checkpoint-every", "1", "--force"]

    def prepare() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        return out

    steps = _steps(args, prepare, tmp_path)
    names = [s.split()[1] for s in steps]
    # every commit of the run is a crash point: the marker, the status, the checkpoints, the three tables,
    # the model, the final status (after the model), then the clean-up of journals and checkpoint
    assert names[:2] == ["fedsim-run.json", "status.json"]
    assert names.count("checkpoint.pt") == 3 and names.index("model.pt") < len(names) - 1 - names[::-1].index("status.json")
    assert {"events.parquet", "rounds.parquet", "devices.parquet", "events.arrows"} <= set(names)
    _crash_every_step(args, prepare, reference, steps)
    capsys.readouterr()


def test_crash_at_every_step_of_a_resume_then_resume_equals_uninterrupted(tmp_path, scenario_file, reference,
                                                                         capsys):
    out = tmp_path / "r"
    run_args = ["run", str(scenario_file), "--out", str(out), "--quiet", "--checkpoint-every", "1", "--force"]
    run_steps = _steps(run_args, lambda: shutil.rmtree(out, ignore_errors=True), tmp_path)
    final_status = len(run_steps) - run_steps[::-1].index("replace status.json")      # 1-based

    def prepare() -> Path:
        """A run killed just before its final status: checkpoint of round 2, tables and model written."""
        shutil.rmtree(out, ignore_errors=True)
        assert _forked(run_args, final_status) == 137
        status = read_status(out)
        assert status["status"] == "running" and status["checkpoint_round"] == 2
        return out

    args = ["run", "--resume", str(out), "--quiet"]
    steps = _steps(args, prepare, tmp_path)
    names = [s.split()[1] for s in steps]
    # the temporary status of the killed run is removed, the journals are cut back to the checkpoint (by
    # a rename each), then the rounds after it are redone and the run is finalised
    assert names[0] == ".status.json.tmp"
    assert {"events.arrows", "devices.arrows", "rounds.arrows"} <= set(names[: names.index("events.parquet")])
    _crash_every_step(args, prepare, reference, steps)
    capsys.readouterr()


def test_crash_at_every_step_of_a_forced_replacement(tmp_path, scenario_file, reference, capsys):
    """`--force` over a completed run of another seed: a crash while clearing it is recoverable too."""
    other = tmp_path / "other"
    assert main(["run", str(scenario_file), "--out", str(other), "--quiet", "--set", "run.seed=9"]) == 0
    out = tmp_path / "r"
    args = ["run", str(scenario_file), "--out", str(out), "--quiet", "--force"]

    def prepare() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(other, out)
        return out

    steps = _steps(args, prepare, tmp_path)
    cleared = [s for s in steps if s.startswith("unlink")][:6]
    assert [s.split()[1] for s in cleared[:2]] == ["status.json", "events.parquet"]
    # a crash while the old run is being cleared: the directory is still fedsim's (the marker goes last),
    # so the same command run again replaces it
    first_new = steps.index("replace fedsim-run.json")
    assert steps[first_new - 1] == "unlink fedsim-run.json"
    for k in range(1, first_new + 1):
        prepare()
        assert _forked(args, k) == 137
        assert (out / MARKER_FILE).exists() or k == first_new
        assert main(args) == 0, k
        assert_same_run(snapshot(out), reference)
    capsys.readouterr()


# -- a killed sweep leaves nothing running -------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":                          # a zombie has ended
            tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_killed_sweep_leaves_no_process_behind(tmp_path, scenario_file):
    """SIGKILL of `fedsim sweep` while its workers are in the middle of runs (held there by a model that
    waits for a file that never comes): every worker process ends within seconds."""
    out = tmp_path / "sweep"
    (tmp_path / "gated.py").write_text(GATED_MODEL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
           "GATE_OUT": str(tmp_path / "never"), "GATE_GO": str(tmp_path / "never-go")}
    (tmp_path / "gated_sweep.py").write_text(GATED_SWEEP_MODEL.replace("RUNS", str(out / "runs")))
    sweep = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "sweep", str(scenario_file), "--out", str(out),
                              "--seeds", "2", "--jobs", "2", "--quiet",
                              "--set", 'model.name="gated_sweep:build"'],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len([d for d in (out / "runs").glob("*") if run_state(d).state == "running"]) < 2:
            assert sweep.poll() is None, sweep.stderr.read()
            assert time.monotonic() < deadline, "the sweep's runs did not start"
            time.sleep(0.1)
        workers = _descendants(sweep.pid)
        assert len(workers) >= 2
        sweep.kill()
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(workers):
            assert time.monotonic() < deadline, f"orphans still running: {sorted(_alive(workers))}"
            time.sleep(0.1)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        for pid in _alive(_descendants(sweep.pid)):
            os.kill(pid, 9)
