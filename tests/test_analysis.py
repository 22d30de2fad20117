"""The analysis scripts: each runs on a sweep, writes its files, and its tables equal numbers recomputed
here from the Parquet traces; the Gantt bars match the round's events; analysis never imports fedsim."""

from __future__ import annotations

import importlib
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML, REPO, run
from fedsim.cli import main as fedsim_main

SCRIPTS = ["accuracy_time", "deadline", "pareto", "layer_updates", "gantt", "depths", "report"]
POLICY = {"salf": "salf(mean)", "drop": "drop"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    scenario = base / "s.toml"
    scenario.write_text(BASE_TOML)
    out = base / "sweep"
    assert fedsim_main(["sweep", str(scenario), "--grid", "policy.name=salf,drop", "--grid",
                        "policy.deadline_s=0.05,0.1", "--seeds", "2", "--set", "run.rounds=4", "--jobs", "2",
                        "--out", str(out), "--quiet"]) == 0
    return out


def script(name):
    return importlib.import_module(f"analysis.{name}")


def md_table(path):
    """Rows of the Markdown table in `path` as dicts of cell text."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def num(text):
    return None if text == "n/a" else float(text)


def close(cell, value):
    """A Markdown cell (6 significant digits) equals a recomputed value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == "n/a"
    return num(cell) == pytest.approx(value, rel=1e-5, abs=1e-12)


def runs_of(sweep):
    """Index rows plus each run's rounds/devices tables, read directly."""
    rows = pq.read_table(sweep / "index.parquet").to_pylist()
    for r in rows:
        r["label"] = f"{POLICY[r['policy.name']]}, deadline_s={r['policy.deadline_s']}"
        r["rounds_t"] = pq.read_table(sweep / r["run_dir"] / "rounds.parquet").sort_by("round").to_pydict()
        r["devices_t"] = pq.read_table(sweep / r["run_dir"] / "devices.parquet").to_pydict()
    return rows


def finals(r):
    return [a for a in r["rounds_t"]["test_accuracy"] if a is not None]


def groups(rows, key=lambda r: r["label"]):
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def mean(xs):
    return sum(xs) / len(xs)


def test_every_script_writes_its_outputs(sweep):
    out = sweep / "analysis"
    for name in SCRIPTS:
        assert script(name).main([str(sweep)]) == 0, name
    for name in SCRIPTS[:-1]:
        assert (out / f"{name}.png").stat().st_size > 1000
        assert md_table(out / f"{name}.md")
        assert (out / f"{name}.csv").read_text().count("\n") >= 2
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(SCRIPTS) - 1
    assert re.findall(r'src="(?!data:)', page) == []               # self-contained
    for title in ("Runs", "Deadline study", "Pareto-optimal", "Per-layer updates", "Device timeline",
                  "Straggler depths", "Accuracy vs time"):
        assert title in page


def test_accuracy_time_table(sweep):
    assert script("accuracy_time").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "accuracy_time.md")
    expected = groups(runs_of(sweep))
    assert [row["group"] for row in table] == list(expected)
    for row in table:
        members = expected[row["group"]]
        last = [finals(r)[-1] for r in members]
        assert int(row["seeds"]) == len(members) == 2
        assert close(row["sim_time_s_mean"], mean([max(r["rounds_t"]["end_s"]) for r in members]))
        assert close(row["final_accuracy_mean"], mean(last))
        assert close(row["final_accuracy_min"], min(last))
        assert close(row["final_accuracy_max"], max(last))
        assert close(row["best_accuracy_mean"], mean([max(finals(r)) for r in members]))
    curves = (sweep / "analysis" / "accuracy_time_curves.csv").read_text().splitlines()
    assert len(curves) == 1 + 4 * 4                   # 4 groups x 4 evaluated rounds


@pytest.mark.parametrize("target", [None, 0.3])
def test_deadline_table(sweep, target):
    argv = [str(sweep)] + ([] if target is None else ["--target", str(target)])
    assert script("deadline").main(argv) == 0
    path = sweep / "analysis" / "deadline.md"
    rows = runs_of(sweep)
    if target is None:       # 25th percentile of the best accuracies, rounded down to 0.01
        bests = sorted(max(finals(r)) for r in rows)
        pos = 0.25 * (len(bests) - 1)
        q = bests[int(pos)] + (bests[int(pos) + 1] - bests[int(pos)]) * (pos - int(pos))
        target = math.floor(q * 100) / 100
    assert f"Target accuracy {target:g}." in path.read_text()
    table = md_table(path)
    expected = groups(rows, key=lambda r: (POLICY[r["policy.name"]], float(r["policy.deadline_s"])))
    assert [(row["group"], float(row["deadline_s"])) for row in table] == [
        (p, d) for p in ("salf(mean)", "drop") for d in (0.05, 0.1)]
    for row in table:
        members = expected[(row["group"], float(row["deadline_s"]))]
        last = [finals(r)[-1] for r in members]
        m = mean(last)
        hits = []
        for r in members:
            t = r["rounds_t"]
            i = next((i for i, a in enumerate(t["test_accuracy"]) if a is not None and a >= target), None)
            if i is not None:
                hits.append((t["end_s"][i], sum(t["energy_j"][: i + 1])))
        assert int(row["seeds"]) == 2
        assert close(row["final_accuracy_mean"], m)
        assert close(row["final_accuracy_std"], math.sqrt(mean([(x - m) ** 2 for x in last])))
        assert row["reached"] == f"{len(hits)}/2"
        assert close(row["time_to_target_s_mean"], mean([h[0] for h in hits]) if hits else None)
        assert close(row["energy_to_target_j_mean"], mean([h[1] for h in hits]) if hits else None)


@pytest.mark.parametrize("by", ["group", "run"])
def test_pareto_table(sweep, tmp_path, by):
    assert script("pareto").main([str(sweep), "--by", by, "--out", str(tmp_path)]) == 0
    rows = runs_of(sweep)
    key = (lambda r: r["label"]) if by == "group" else (lambda r: r["run_id"])
    points = {}
    for name, members in groups(rows, key).items():
        points[name] = (mean([max(r["rounds_t"]["end_s"]) for r in members]),
                        mean([sum(r["rounds_t"]["energy_j"]) for r in members]),
                        mean([finals(r)[-1] for r in members]))

    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q[2] >= p[2] and q != p for q in points.values())

    front = {name for name, p in points.items() if not dominated(p)}
    table = md_table(tmp_path / "pareto.md")
    assert {row[by] for row in table} == front
    for row in table:
        t, e, a = points[row[by]]
        assert close(row["sim_time_s"], t) and close(row["energy_j"], e) and close(row["final_accuracy"], a)


def test_layer_updates_table(sweep):
    assert script("layer_updates").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "layer_updates.md")
    expected = groups(runs_of(sweep))
    assert len(table) == len(expected) * 3                  # the MLP has 3 layers
    for row in table:
        members = expected[row["group"]]
        layer = int(row["layer"])
        counts = [c[layer] for r in members for c in r["rounds_t"]["contributors"]]
        shares = [c[layer] / p for r in members
                  for c, p in zip(r["rounds_t"]["contributors"], r["rounds_t"]["participants"])]
        assert close(row["update_fraction"], mean([c > 0 for c in counts]))
        assert close(row["mean_contributors"], mean(counts))
        assert close(row["mean_share"], mean(shares))
    # SALF at the tight deadline: the last layer has at least as many contributors as the first
    salf = {int(r["layer"]): num(r["mean_contributors"]) for r in table if r["group"] == "salf(mean), deadline_s=0.05"}
    assert salf[2] >= salf[1] >= salf[0] and salf[2] > salf[0]


def test_depths_table(sweep):
    assert script("depths").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "depths.md")
    expected = groups(runs_of(sweep))
    for label, members in expected.items():
        depths = [d for r in members for s, d in zip(r["devices_t"]["status"], r["devices_t"]["depth"])
                  if s != "complete"]
        mine = {int(row["depth"]): row for row in table if row["group"] == label}
        assert sorted(mine) == [0, 1, 2]
        for depth, row in mine.items():
            assert int(row["count"]) == depths.count(depth)
            assert close(row["fraction"], depths.count(depth) / len(depths) if depths else None)
    assert sum(int(row["count"]) for row in table) > 0


def check_gantt(run_dir, out, round_):
    """The bars of gantt.csv against the round's events and against devices.parquet's phase durations."""
    import csv

    with open(out / "gantt.csv") as fh:
        bars = list(csv.DictReader(fh))
    events = pq.read_table(run_dir / "events.parquet", filters=[("round", "==", round_)]).to_pylist()
    devices = [r for r in pq.read_table(run_dir / "devices.parquet").to_pylist() if r["round"] == round_]
    end_kind = {"download": "download_end", "forward": "forward_end", "backward": "backward_end",
                "upload": "upload_end", "cut": "cut", "offline": "offline", "stopped": "stopped"}
    # one bar per phase-ending event, ending exactly at it, same device and layer
    ends = sorted((e["device"], e["event"], e["layer"], e["time_s"]) for e in events
                  if e["device"] >= 0 and e["event"] in end_kind.values())
    got = sorted((int(b["device"]), end_kind[b["phase"]], int(b["layer"]), float(b["end_s"])) for b in bars)
    assert got == ends
    # each bar starts where its phase started
    by_device = {}
    for e in events:
        by_device.setdefault(e["device"], []).append(e)
    for b in bars:
        evs = by_device[int(b["device"])]
        start, end = float(b["start_s"]), float(b["end_s"])
        assert start <= end
        if b["phase"] == "download":
            assert start == next(e["time_s"] for e in evs if e["event"] == "download_start")
        elif b["phase"] == "upload":
            assert start == next(e["time_s"] for e in evs if e["event"] == "upload_start"
                                 and e["layer"] == int(b["layer"]))
        elif b["phase"] in ("forward", "backward"):       # from the previous compute-chain event
            i = next(i for i, e in enumerate(evs) if e["event"] == end_kind[b["phase"]]
                     and e["layer"] == int(b["layer"]) and e["time_s"] == end)
            prev = [e["time_s"] for e in evs[:i] if e["event"] in ("download_end", "forward_end", "backward_end")]
            assert start == prev[-1]
    # durations add up to the per-device phase times of devices.parquet
    for d in devices:
        mine = [b for b in bars if int(b["device"]) == d["device"]]
        dur = {}
        for b in mine:
            phase = b["phase"]
            if phase in ("cut", "offline", "stopped"):
                evs = by_device[d["device"]]
                layer = int(b["layer"])
                if any(e["event"] == "upload_start" and e["layer"] == layer for e in evs):
                    phase = "upload"
                elif not any(e["event"] == "download_end" for e in evs):
                    phase = "download"
                else:
                    phase = "compute"
            phase = "compute" if phase in ("forward", "backward") else phase
            dur[phase] = dur.get(phase, 0.0) + float(b["end_s"]) - float(b["start_s"])
        assert dur.get("download", 0.0) == pytest.approx(d["download_s"], abs=1e-12)
        assert dur.get("compute", 0.0) == pytest.approx(d["compute_s"], abs=1e-12)
        assert dur.get("upload", 0.0) == pytest.approx(d["upload_s"], abs=1e-12)
    return bars


def test_gantt_bars_match_the_events(sweep):
    run_id = "policy.name=salf,policy.deadline_s=0.05,seed=3"
    out = sweep / "analysis"
    assert script("gantt").main([str(sweep), "--run", run_id, "--round", "1", "--max-devices", "100"]) == 0
    bars = check_gantt(sweep / "runs" / run_id, out, 1)
    assert {b["phase"] for b in bars} >= {"download", "forward", "backward", "cut"}
    assert f"run {run_id}, round 1" in (out / "gantt.md").read_text()
    md = md_table(out / "gantt.md")
    assert len(md) == len(bars)
    for row, bar in zip(md, bars):
        assert row["device"] == bar["device"] and row["phase"] == bar["phase"]
        assert close(row["start_s"], float(bar["start_s"])) and close(row["end_s"], float(bar["end_s"]))
    # --max-devices keeps the lowest ids
    assert script("gantt").main([str(sweep), "--run", run_id, "--max-devices", "3"]) == 0
    assert {row["device"] for row in md_table(out / "gantt.md")} == {"0", "1", "2"}


@pytest.mark.parametrize("mode,deadline,phases", [
    ("streaming", "0.004", {"download", "forward", "backward", "upload", "cut"}),   # cuts in compute and upload
    ("streaming", "0.01", {"download", "forward", "backward", "upload", "cut"}),    # upload queued, then cut
    ("after_compute", "0.01", {"download", "forward", "backward", "upload", "cut"}),
    ("ideal", "0.0005", {"cut"}),                                                   # cut during the download
])
def test_gantt_interrupted_phases(tmp_path, mode, deadline, phases):
    run_dir = run(tmp_path, f'network.upload_mode="{mode}"', f"policy.deadline_s={deadline}", name=mode)
    out = tmp_path / "an"
    assert script("gantt").main([str(run_dir), "--round", "0", "--out", str(out)]) == 0
    bars = check_gantt(run_dir, out, 0)
    assert {b["phase"] for b in bars} == phases


def test_skips_runs_that_did_not_complete(sweep, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    broken = "policy.name=drop,policy.deadline_s=0.1,seed=4"
    (copy / "runs" / broken / "status.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert script("accuracy_time").main([str(copy)]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and broken in err
    seeds = {row["group"]: row["seeds"] for row in md_table(copy / "analysis" / "accuracy_time.md")}
    assert seeds["drop, deadline_s=0.1"] == "1" and seeds["drop, deadline_s=0.05"] == "2"


def test_single_run_directory_and_bad_directory(sweep, tmp_path, capsys):
    run_dir = sweep / "runs" / "policy.name=salf,policy.deadline_s=0.1,seed=3"
    assert script("report").main([str(run_dir), "--out", str(tmp_path / "one")]) == 0
    rows = md_table(tmp_path / "one" / "deadline.md")
    assert [(r["group"], r["deadline_s"], r["seeds"]) for r in rows] == [("salf(mean)", "0.1", "1")]
    assert (tmp_path / "one" / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    assert script("accuracy_time").main([str(tmp_path / "empty")]) == 2
    assert "analysis: error" in capsys.readouterr().err


def test_analysis_never_imports_fedsim(sweep, tmp_path):
    for path in (REPO / "analysis").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+fedsim\b", path.read_text(), re.M), path
    code = ("import sys; from analysis import report; rc = report.main([sys.argv[1], '--out', sys.argv[2]]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'fedsim'); "
            "assert rc == 0 and not bad, (rc, bad)")
    proc = subprocess.run([sys.executable, "-c", code, str(sweep), str(tmp_path / "r")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "analysis.depths", str(sweep), "--out", str(tmp_path / "d")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "depths.png").is_file()


def test_paper_check_table(sweep, tmp_path):
    from analysis import paper_check

    out = tmp_path / "pc"
    assert paper_check.main([str(sweep), "--out", str(out), "--budget-s", "0.15", "--target", "0.2"]) == 0
    assert {p.name for p in out.iterdir()} >= {"paper_check.md", "paper_check.csv", "accuracy_round.png",
                                                 "accuracy_time.png", "final_vs_deadline.png"}
    table = {(r["policy"], r["deadline_s"]): r for r in md_table(out / "paper_check.md")}
    for (policy, deadline), members in groups(runs_of(sweep), key=lambda r: (r["policy.name"], r["policy.deadline_s"])).items():
        row = table[(policy, deadline)]
        assert row["seeds"] == str(len(members))
        final = [finals(r)[-1] for r in members]
        m, s = (float(x) for x in row["final accuracy"].split(" ± "))
        assert m == pytest.approx(sum(final) / len(final), abs=6e-4)
        assert s == pytest.approx(float(np.std(final, ddof=1)), abs=6e-4)
        frac = [np.mean([st != "complete" for st in r["devices_t"]["status"]]) for r in members]
        assert float(row["straggler fraction"].split(" ± ")[0]) == pytest.approx(np.mean(frac), abs=6e-4)
        at_budget = [[a for a, t in zip(r["rounds_t"]["test_accuracy"], r["rounds_t"]["end_s"])
                      if a is not None and t <= 0.15 + 1e-9] for r in members]
        if all(at_budget):
            got = float(row["accuracy at 0.15 s"].split(" ± ")[0])
            assert got == pytest.approx(np.mean([a[-1] for a in at_budget]), abs=6e-4)


def test_traces_of_another_schema_version_are_refused(sweep, tmp_path, capsys):
    run_dir = tmp_path / "old"
    shutil.copytree(sweep / pq.read_table(sweep / "index.parquet").to_pylist()[0]["run_dir"], run_dir)
    table = pq.read_table(run_dir / "rounds.parquet")
    meta = dict(table.schema.metadata)
    meta[b"fedsim.schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(meta), run_dir / "rounds.parquet")
    assert script("accuracy_time").main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "rounds.parquet" in err and "schema version 0" in err and "Traceback" not in err
    (run_dir / "events.parquet").write_bytes(b"garbage")
    pq.write_table(table, run_dir / "rounds.parquet")
    assert script("accuracy_time").main([str(run_dir)]) == 2
    assert "events.parquet: unreadable trace" in capsys.readouterr().err
