"""`fedsim sweep`: the grid x seeds plan, run directories, the index and its metrics, resuming, bad input."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML, REPO
from fedsim.cli import main
from fedsim.errors import FedsimError
from fedsim.sweep import parse_grid, plan_sweep

GRID = ["--grid", "policy.name=salf,drop", "--grid", "policy.deadline_s=0.05,0.1"]
SEEDS = [3, 4]                    # BASE_TOML has run.seed = 3; --seeds 2 gives base + 0, base + 1
TARGET = 0.3
IDS = [f"policy.name={p}/policy.deadline_s={d}/seed={s}"           # Hive partition paths under runs/
       for p in ("salf", "drop") for d in ("0.05", "0.1") for s in SEEDS]


def sweep_argv(scenario, out, *extra):
    return ["sweep", str(scenario), *GRID, "--seeds", "2", "--set", "run.rounds=4", "--jobs", "2",
            "--target-accuracy", str(TARGET), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    scenario = base / "s.toml"
    scenario.write_text(BASE_TOML)
    out = base / "out"
    assert main(sweep_argv(scenario, out, "--quiet")) == 0
    return scenario, out


def test_run_directories_and_index(sweep):
    scenario, out = sweep
    assert sorted(str(p.parent.relative_to(out / "runs")) for p in (out / "runs").rglob("status.json")) == sorted(IDS)
    for run_id in IDS:
        run_dir = out / "runs" / run_id
        assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
        for name in ("events", "rounds", "devices"):
            assert (run_dir / f"{name}.parquet").is_file()
        params = json.loads((run_dir / "params.json").read_text())
        assert params["run_id"] == run_id
        assert params["seed"] == int(run_id.rsplit("=", 1)[1])
        assert params["overrides"][-1] == f"run.seed={params['seed']}"
        meta = pq.read_schema(run_dir / "rounds.parquet").metadata
        assert meta[b"run.seed"].decode() == str(params["seed"])
        assert json.loads(meta[b"scenario.overrides"]) == params["overrides"]

    index = pq.read_table(out / "index.parquet")
    assert index.column_names[:5] == ["run_id", "policy.name", "policy.deadline_s", "seed", "status"]
    assert index.schema.field("policy.name").type == "string"
    assert index.schema.field("policy.deadline_s").type == "double"           # typed, not text
    rows = index.to_pylist()
    assert [r["run_id"] for r in rows] == IDS
    assert all(r["status"] == "completed" and r["error"] is None for r in rows)
    for r in rows:
        params = f"policy.name={r['policy.name']}/policy.deadline_s={r['policy.deadline_s']}"
        assert r["run_id"] == f"{params}/seed={r['seed']}"
        assert r["run_dir"] == f"runs/{r['run_id']}"
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"policy.name": ["salf", "drop"],
                                                                    "policy.deadline_s": ["0.05", "0.1"]}


def recompute(run_dir, target):
    """Headline metrics straight from rounds.parquet, in plain Python."""
    t = pq.read_table(run_dir / "rounds.parquet").to_pydict()
    order = sorted(range(len(t["round"])), key=lambda i: t["round"][i])
    col = {k: [t[k][i] for i in order] for k in t}
    evaluated = [(i, a) for i, a in enumerate(col["test_accuracy"]) if a is not None]
    hit = next((i for i, a in evaluated if a >= target), None)
    return {
        "policy": col["policy"][0],
        "rounds": len(order),
        "final_accuracy": evaluated[-1][1],
        "best_accuracy": max(a for _, a in evaluated),
        "sim_time_s": max(col["end_s"]),
        "energy_j": sum(col["energy_j"]),
        "mean_delivered": sum(col["delivered_any"]) / len(order),
        "mean_completed": sum(col["completed"]) / len(order),
        "time_to_target_s": None if hit is None else col["end_s"][hit],
        "energy_to_target_j": None if hit is None else sum(col["energy_j"][: hit + 1]),
        "rounds_to_target": None if hit is None else hit + 1,
    }


def test_index_metrics_equal_the_traces(sweep):
    _, out = sweep
    rows = pq.read_table(out / "index.parquet").to_pylist()
    reached = 0
    for row in rows:
        expected = recompute(out / row["run_dir"], TARGET)
        for name, value in expected.items():
            if value is None or isinstance(value, (str, int)):
                assert row[name] == value, (row["run_id"], name)
            else:
                assert row[name] == pytest.approx(value, rel=1e-12), (row["run_id"], name)
        reached += expected["time_to_target_s"] is not None
        assert row["rounds"] == 4
        assert row["policy"] == ("salf(mean)" if row["policy.name"] == "salf" else "drop")
    assert 0 < reached < len(rows)        # the target splits the runs: both branches are checked
    devices = pq.read_table(out / rows[0]["run_dir"] / "devices.parquet")
    assert rows[0]["energy_j"] == pytest.approx(sum(devices.column("energy_j").to_pylist()), rel=1e-12)


def test_resume_redoes_only_missing_or_unfinished_runs(sweep, tmp_path, capsys):
    scenario, original = sweep
    out = tmp_path / "copy"
    shutil.copytree(original, out)            # copy2 keeps mtimes
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    deleted, crashed = IDS[1], IDS[6]
    shutil.rmtree(out / "runs" / deleted)
    (out / "runs" / crashed / "status.json").write_text(json.dumps({"status": "running", "rounds_done": 2}))

    assert main(sweep_argv(scenario, out)) == 0            # with the progress bar
    captured = capsys.readouterr()
    assert "8 runs: 6 already done, 2 completed now, 0 failed" in captured.out
    assert "run/s" in captured.err or "s/run" in captured.err or "8/8" in captured.err

    for path, mtime in before.items():
        run_id = "/".join(path.parts[1:4]) if path.parts[0] == "runs" else None
        if run_id in (deleted, crashed) or path.name in ("index.parquet", "sweep.json", "partitioning.parquet"):
            continue
        assert (out / path).stat().st_mtime_ns == mtime, path           # untouched
    for run_id in (deleted, crashed):
        status = json.loads((out / "runs" / run_id / "status.json").read_text())
        assert status["status"] == "completed"
        assert (out / "runs" / run_id / "rounds.parquet").stat().st_mtime_ns > before[
            (out / "runs" / IDS[0] / "rounds.parquet").relative_to(out)]
    # same seeds, same scenario: the redone runs are bit-identical, so is the index
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(original / "index.parquet"))
    assert pq.read_table(out / "runs" / deleted / "rounds.parquet").equals(
        pq.read_table(original / "runs" / deleted / "rounds.parquet"))

    assert main(sweep_argv(scenario, out, "--quiet")) == 0          # nothing left to do
    assert "8 runs: 8 already done, 0 completed now, 0 failed" in capsys.readouterr().out


def test_changed_settings_redo_the_runs(sweep, tmp_path, capsys):
    scenario, original = sweep
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    argv = sweep_argv(scenario, out, "--quiet", "--set", "training.lr=0.05")
    argv[argv.index("policy.deadline_s=0.05,0.1")] = "policy.deadline_s=0.05"      # a smaller grid, other lr
    assert main(argv) == 0
    assert "4 runs: 0 already done, 4 completed now, 0 failed" in capsys.readouterr().out
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 4
    for row in index:
        meta = pq.read_schema(out / row["run_dir"] / "rounds.parquet").metadata
        assert "training.lr=0.05" in json.loads(meta[b"scenario.overrides"])


@pytest.mark.parametrize("grid,words", [
    ("policy.deadlin_s=0.5,1", ["policy.deadlin_s", "unknown field"]),
    ("policy.deadline_s=0.5,-1", ["policy.deadline_s=-1", "must be > 0"]),
    ("policy.name=salf,salsa", ["policy.name=salsa", "'salsa'"]),
    ("fleet.classes[7].count=1", ["fleet.classes[7].count"]),
    ("nosuchsection.x=1", ["nosuchsection.x"]),
    ("policy.name", ["policy.name", "KEY=VALUE"]),
    ("run.seed=1,2", ["run.seed", "--seeds"]),
])
def test_bad_grid_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, grid, words):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    out = tmp_path / "out"
    code = main(["sweep", str(scenario), "--grid", "training.lr=0.1,0.2", "--grid", grid, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not out.exists()


def test_a_grid_key_may_complete_a_scenario_invalid_alone(tmp_path, capsys):
    """A schedule that cannot fit run.rounds = 1000 is replaced by every grid point: the sweep plans; a bad
    --set value is still named as such, not blamed on a grid key."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML.replace("deadline_s = ", 'deadline_s = { optimize = "adel", total_s = 1.0, '
                                          'min_s = 0.1 }\n# ', 1))
    runs = plan_sweep(scenario, parse_grid(["policy.deadline_s=0.05,0.1"]), 1, ["run.rounds=1000"])
    assert [r.params for r in runs] == [(("policy.deadline_s", "0.05"),), (("policy.deadline_s", "0.1"),)]
    with pytest.raises(FedsimError, match="policy.deadline_s.total_s"):       # no grid key replaces it
        plan_sweep(scenario, parse_grid(["training.lr=0.1,0.2"]), 1, ["run.rounds=1000"])
    code = main(["sweep", str(scenario), "--grid", "policy.deadline_s=0.05,0.1", "--set", "training.lr=-1",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "training.lr" in err and "--grid" not in err, err


def test_failed_run_is_recorded_not_fatal(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    out = tmp_path / "out"
    code = main(["sweep", str(scenario), "--grid", "model.name=mlp,tests.helper_models:no_such_model",
                 "--set", "run.rounds=1", "--jobs", "2", "--out", str(out), "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "no_such_model" in captured.err
    rows = {r["model.name"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert rows["mlp"]["status"] == "completed"
    bad = rows["tests.helper_models:no_such_model"]
    assert bad["status"] == "failed" and "no_such_model" in bad["error"] and bad["final_accuracy"] is None
    assert json.loads((out / bad["run_dir"] / "status.json").read_text())["status"] == "failed"


def test_grid_values_and_run_ids(tmp_path):
    assert parse_grid(["a.b=1,2", 'c.d=[1, 2],{ x = "a,b" },"p,q"']) == [
        ("a.b", ["1", "2"]), ("c.d", ["[1, 2]", '{ x = "a,b" }', '"p,q"'])]
    with pytest.raises(FedsimError, match="repeated value"):
        parse_grid(["a.b=1,1"])
    with pytest.raises(FedsimError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    grid = parse_grid(["fleet.classes[1].speed_flops=1e7,{ dist = \"fixed\", value = 3e7 }"])
    runs = plan_sweep(scenario, grid, 1, ["run.seed=10"])
    assert [r.seed for r in runs] == [10, 10]
    ids = [r.run_id for r in runs]
    assert ids == ["fleet.classes[1].speed_flops=10000000.0/seed=10",        # canonical value text
                   "fleet.classes[1].speed_flops=%7B%20dist%20%3D%20%22fixed%22%2C%20value%20%3D%2030000000.0%20%7D"
                   "/seed=10"]                                              # percent-encoded, as Hive does
    assert ids == [r.run_id for r in plan_sweep(scenario, grid, 1, ["run.seed=10"])]   # stable


# -- reading a sweep as one dataset ----------------------------------------------------------------

def test_runs_read_as_one_hive_partitioned_dataset(sweep):
    """pyarrow reads every run's rounds.parquet as one table, the grid keys and the seed typed columns
    (types from partitioning.parquet), each row's partition values those its run recorded."""
    import pyarrow.dataset as ds

    _, out = sweep
    files = sorted((out / "runs").glob("**/rounds.parquet"))
    assert len(files) == len(IDS)
    part = ds.partitioning(pq.read_schema(out / "partitioning.parquet"), flavor="hive")
    rounds = ds.dataset(files, partitioning=part, partition_base_dir=str(out / "runs")).to_table()
    assert rounds.schema.field("policy.name").type == "string"
    assert rounds.schema.field("policy.deadline_s").type == "double"
    assert rounds.schema.field("seed").type == "int64"
    assert rounds.num_rows == len(IDS) * 4
    seen = set()
    for row in rounds.select(["policy.name", "policy.deadline_s", "seed", "policy"]).to_pylist():
        assert row["policy"] == ("salf(mean)" if row["policy.name"] == "salf" else "drop")
        seen.add((row["policy.name"], row["policy.deadline_s"], row["seed"]))
    assert seen == {(p, d, s) for p in ("salf", "drop") for d in (0.05, 0.1) for s in SEEDS}
    # the partition values are what each run was given: its trace records them
    for path in files:
        meta = pq.read_schema(path).metadata
        overrides = json.loads(meta[b"scenario.overrides"])
        parts = dict(seg.split("=", 1) for seg in path.parent.relative_to(out / "runs").parts)
        assert overrides[-3:] == [f"policy.name={parts['policy.name']}",
                                  f"policy.deadline_s={parts['policy.deadline_s']}", f"run.seed={parts['seed']}"]


def test_the_readmes_pyarrow_query_reads_a_sweep(sweep):
    """The README's pyarrow block, run as written on this sweep (its pandas line only where pandas is installed)."""
    import importlib.util
    import re

    _, out = sweep
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    block = next(b for b in blocks if "ds.dataset(" in b)
    assert 'Path("sweeps/qs")' in block
    code = block.replace('Path("sweeps/qs")', f"Path({str(out)!r})")
    if importlib.util.find_spec("pandas") is None:
        code = "\n".join(line for line in code.splitlines() if "to_pandas" not in line)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    rounds = namespace["rounds"]
    assert rounds.num_rows == len(IDS) * 4
    assert [str(rounds.schema.field(k).type) for k in ("policy.name", "policy.deadline_s", "seed")] == [
        "string", "double", "int64"]
    if "df" in namespace:
        assert set(namespace["df"]["policy.deadline_s"]) == {0.05, 0.1}


def test_trace_json_is_the_metadata_as_typed_json(sweep):
    _, out = sweep
    run_dir = out / "runs" / IDS[0]
    body = json.loads((run_dir / "trace.json").read_text(encoding="utf-8"))
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(run_dir / "rounds.parquet").metadata.items()}
    marker = json.loads((run_dir / "fedsim-run.json").read_text())
    assert body["schema_version"] == meta["fedsim.schema_version"] == "1"
    assert body["fedsim_version"] == meta["fedsim.version"] and body["torch_version"] == meta["torch.version"]
    assert body["run_seed"] == int(meta["run.seed"]) == 3
    assert body["deadline_s"] == float(meta["policy.deadline_s"]) == 0.05
    assert body["policy"] == meta["policy"] and body["scenario_text"] == meta["scenario.text"]
    assert body["scenario_overrides"] == json.loads(meta["scenario.overrides"])
    assert body["identity"] == marker["identity"]
    resolved = body["scenario"]
    assert resolved["policy"] == {"name": "salf", "deadline_s": 0.05}           # overrides applied, typed
    assert resolved["run"]["rounds"] == 4 and resolved["run"]["seed"] == 3
    assert resolved["fleet"]["classes"][0]["speed_flops"]["median"] == 2.0e6


def test_grid_values_are_typed_and_equal_values_share_a_run_key():
    from fedsim.sweep import run_key
    from fedsim.sweep.index import grid_types
    from fedsim.sweep.plan import SweepRun

    assert run_key((("policy.deadline_s", "0.10"),), 1) == run_key((("policy.deadline_s", "0.1"),), 1) \
        == "policy.deadline_s=0.1/seed=1"
    assert run_key((("policy.name", "salf"), ("policy.name2", '"salf"')), 0) == "policy.name=salf/policy.name2=salf/seed=0"
    assert run_key((), 5) == "seed=5"
    with pytest.raises(FedsimError, match=r"--grid policy.deadline_s: 0.5 and 5e-1 are the same value"):
        parse_grid(["policy.deadline_s=0.5,5e-1"])
    grid = {"a.int": ["1", "2"], "a.num": ["1", "0.5"], "a.flag": ["true", "false"], "a.name": ["x", '"y"'],
            "a.mixed": ["1", "x"], "a.table": ["{ v = 1 }", "[1, 2]"]}
    plan = [SweepRun("r", tuple((k, v[i]) for k, v in grid.items()), 0, ()) for i in range(2)]
    types = grid_types(plan, list(grid))
    assert {k: str(t) for k, t in types.items()} == {"a.int": "int64", "a.num": "double", "a.flag": "bool",
                                                     "a.name": "string", "a.mixed": "string", "a.table": "string"}
    assert plan[0].values == {"a.int": 1, "a.num": 1, "a.flag": True, "a.name": "x", "a.mixed": 1,
                              "a.table": {"v": 1}}


def test_a_journal_reads_back_with_pyarrow_as_documented(tmp_path):
    """The README's way to read a run's journal while it runs or after a crash: an Arrow IPC stream."""
    import pyarrow as pa

    from fedsim.output.trace import EventKind, TraceWriter, read_journal

    trace = TraceWriter(tmp_path, {"run.seed": "3"})
    trace.event(0, 0.5, 2, EventKind.DOWNLOAD_END, nbytes=100)
    trace.event(0, 0.75, -1, EventKind.ROUND_END)
    trace.end_round()
    with pa.ipc.open_stream(tmp_path / "events.arrows") as reader:
        table = reader.read_all()
    assert table.column("event").to_pylist() == ["download_end", "round_end"]
    assert table.schema.metadata[b"run.seed"] == b"3"
    with open(tmp_path / "events.arrows", "ab") as fh:         # a crash in the middle of the next batch
        fh.write(b"\xff\xff\xff\xff\x10\x00")
    assert read_journal(tmp_path / "events.arrows").equals(table)
    trace.close(complete=False)


def test_points_differing_only_in_ignored_fields_run_once(tmp_path, capsys):
    """The issue's sweep: salf and wait x two deadlines x two seeds is 8 grid points but 6 runs, since wait
    ignores policy.deadline_s. wait's run has a null deadline partition; the index keeps a row per point."""
    import glob

    import pyarrow.dataset as ds

    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    out = tmp_path / "out"
    argv = ["sweep", str(scenario), "--grid", "policy.name=salf,wait", "--grid", "policy.deadline_s=0.1,0.2",
            "--seeds", "2", "--set", "run.rounds=2", "--jobs", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "6 runs (8 grid points x seeds; 2 differ only in ignored fields): 0 already done, 6 completed" in \
        capsys.readouterr().out
    runs = sorted(str(p.parent.relative_to(out / "runs")) for p in (out / "runs").rglob("status.json"))
    assert runs == sorted([f"policy.name=salf/policy.deadline_s={d}/seed={s}" for d in ("0.1", "0.2") for s in SEEDS]
                          + [f"policy.name=wait/policy.deadline_s=__HIVE_DEFAULT_PARTITION__/seed={s}" for s in SEEDS])
    wait_dir = out / "runs" / f"policy.name=wait/policy.deadline_s=__HIVE_DEFAULT_PARTITION__/seed={SEEDS[0]}"
    params = json.loads((wait_dir / "params.json").read_text())
    assert params["ignored"] == ["policy.deadline_s"] and len(params["points"]) == 2
    assert not any("deadline_s" in o for o in params["overrides"])         # the run's scenario leaves it out
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert len(rows) == 8
    waits = [r for r in rows if r["policy.name"] == "wait"]
    assert sorted((r["policy.deadline_s"], r["seed"]) for r in waits) == [(0.1, 3), (0.1, 4), (0.2, 3), (0.2, 4)]
    assert len({r["run_id"] for r in waits}) == 2 and all(r["ignored"] == ["policy.deadline_s"] for r in waits)
    assert all(r["ignored"] == [] for r in rows if r["policy.name"] == "salf")
    # as one dataset: wait's deadline reads as null
    files = sorted(glob.glob(str(out / "runs" / "**" / "rounds.parquet"), recursive=True))
    part = ds.partitioning(pq.read_schema(out / "partitioning.parquet"), flavor="hive")
    table = ds.dataset(files, partitioning=part, partition_base_dir=str(out / "runs")).to_table()
    pairs = {(n, d) for n, d in zip(table["policy.name"].to_pylist(), table["policy.deadline_s"].to_pylist())}
    assert pairs == {("salf", 0.1), ("salf", 0.2), ("wait", None)}
    # a second sweep finds every run done
    assert main(argv) == 0
    assert "0 completed now" in capsys.readouterr().out
    # analysis reads each shared run once: 6 runs in 3 groups (wait's is one, whatever its grid deadline)
    from analysis.runs import load_runs
    from analysis.groups import group_runs

    runs = load_runs(out)
    assert len(runs) == 6 and "counted once" not in capsys.readouterr().err
    assert sorted(g.label for g in group_runs(runs)) == ["salf, deadline_s=0.1", "salf, deadline_s=0.2", "wait"]


def test_sweep_progress_names_the_runs_under_way_and_their_round(tmp_path, capsys, monkeypatch):
    """Not on a terminal: plain lines, one per finished run, and the runs under way with the rounds they have
    done (reported by the worker processes after each round)."""
    from fedsim.sweep import progress as mod
    from fedsim.sweep import run_sweep

    assert mod.short_id("policy.name=salf/policy.deadline_s=0.1/seed=3") == "salf,0.1,s3"
    assert mod.short_id("policy.name=wait/policy.deadline_s=__HIVE_DEFAULT_PARTITION__/seed=3") == "wait,-,s3"
    monkeypatch.setattr(mod, "PLAIN_EVERY_S", 0.0)
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    run_sweep(scenario, ["policy.name=salf,wait"], 1, ["run.rounds=3"], tmp_path / "out", 2, None, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    ended = [ln for ln in lines if "runs (" in ln]
    assert sorted(ln.split("(")[1] for ln in ended) == ["salf,s3 done)", "wait,s3 done)"]
    assert ended[-1].startswith("out: 2/2 runs (")
    rounds = {int(m) for ln in lines if "under way" in ln for m in re.findall(r" r(\d+)", ln)}
    assert rounds and rounds <= {1, 2, 3}
