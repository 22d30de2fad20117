"""The analysis: runs found in a run directory, a sweep or any folder, grouped by scenario (never pooled, a
duplicate counted once), seeds summarised by mean and sample std; every table equals numbers recomputed here
from the Parquet traces; the Gantt bars match the round's events; `fedsim report` and `fedsim plot` write
into the directory analysed and nowhere else; analysis never imports fedsim."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML, REPO, run
from fedsim.cli import main as fedsim_main

SCRIPTS = ["accuracy_time", "deadline", "pareto", "layer_updates", "depths", "gantt"]
DEADLINES = ("0.05", "0.1")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    scenario = base / "s.toml"
    scenario.write_text(BASE_TOML)
    out = base / "sweep"
    assert fedsim_main(["sweep", str(scenario), "--grid", "policy.name=salf,drop", "--grid",
                        f"policy.deadline_s={','.join(DEADLINES)}", "--seeds", "2", "--set", "run.rounds=4",
                        "--jobs", "2", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder of runs made one by one: salf with seeds 3 and 4, drop with seed 3, nested at any depth."""
    base = tmp_path_factory.mktemp("folder") / "runs"
    run(base, name="salf-3")
    run(base / "more", "run.seed=4", name="salf-4")
    run(base, "policy.name=drop", name="drop-3")
    return base


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


def sample_std(xs):
    """By hand: sqrt(sum((x - mean)^2) / (n - 1)); None with one value."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def runs_of(sweep):
    """Index rows plus each run's rounds/devices tables, read directly."""
    rows = pq.read_table(sweep / "index.parquet").to_pylist()
    for r in rows:
        r["label"] = f"{r['policy.name']}, deadline_s={r['policy.deadline_s']:g}"
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


LABELS = [f"{p}, deadline_s={d}" for p in ("salf", "drop") for d in DEADLINES]


# -- grouping ----------------------------------------------------------------------------------------

def test_two_policies_in_one_folder_are_two_groups_and_seeds_aggregate_by_sample_std(folder):
    """The folder holds salf (seeds 3, 4) and drop (seed 3): two groups, never one pooled curve."""
    from analysis.groups import load_study

    study = load_study(folder)
    assert [(g.label, g.seeds) for g in study.groups] == [("drop", [3]), ("salf", [3, 4])]
    assert script("accuracy_time").main([str(folder)]) == 0
    table = {row["group"]: row for row in md_table(folder / "analysis" / "accuracy_time.md")}
    assert set(table) == {"salf", "drop"}
    salf = [finals({"rounds_t": pq.read_table(p / "rounds.parquet").sort_by("round").to_pydict()})[-1]
            for p in (folder / "salf-3", folder / "more" / "salf-4")]
    assert table["salf"]["seeds"] == "2" and table["drop"]["seeds"] == "1"
    assert close(table["salf"]["final_accuracy_mean"], mean(salf))
    assert close(table["salf"]["final_accuracy_std"], abs(salf[0] - salf[1]) / math.sqrt(2))   # ddof=1, by hand
    assert table["drop"]["final_accuracy_std"] == "n/a"                                        # one seed
    assert "sample standard deviation (ddof=1)" in (folder / "analysis" / "accuracy_time.md").read_text()


def test_a_duplicate_run_counts_once(folder, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.copytree(folder / "salf-3", copy / "again" / "salf-3-copy")          # the same scenario and seed
    assert script("accuracy_time").main([str(copy), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "the same scenario and seed as" in err and "counted once" in err
    seeds = {row["group"]: row["seeds"] for row in md_table(tmp_path / "out" / "accuracy_time.md")}
    assert seeds == {"salf": "2", "drop": "1"}
    assert script("pareto").main([str(copy), "--out", str(tmp_path / "out")]) == 0
    assert {row["group"]: row["seeds"] for row in md_table(tmp_path / "out" / "pareto.md")} == seeds


def test_groups_differing_in_any_setting_are_told_apart(tmp_path):
    """Runs of one policy that differ only in the learning rate are two groups, labelled by what differs."""
    from analysis.groups import load_study

    run(tmp_path / "f", name="a")
    run(tmp_path / "f", "training.lr=0.05", name="b")
    study = load_study(tmp_path / "f")
    assert [(g.label, g.settings) for g in study.groups] == [("lr=0.1", {"training.lr": 0.1}),
                                                             ("lr=0.05", {"training.lr": 0.05})]


def test_labels_name_the_few_settings_that_tell_groups_apart():
    """Of every setting that differs (all kept in `settings`), a label shows the policy and then only what
    is needed to tell the groups apart; a setting a group does not have is not in its label."""
    from types import SimpleNamespace

    from analysis.groups import Group, _labels

    def group(number, policy, rounds):
        tree = {"run": {"seed": number, "rounds": rounds}, "policy": policy}
        return Group(number, [SimpleNamespace(tree=tree, policy=policy["name"])])

    groups = [group(1, {"name": "salf", "deadline_s": 0.1}, 30), group(2, {"name": "salf", "deadline_s": 0.2}, 30),
              group(3, {"name": "fedbuff", "deadline_s": 0.1, "buffer_size": 10}, 10**5)]
    _labels(groups)
    assert [g.label for g in groups] == ["salf, deadline_s=0.1", "salf, deadline_s=0.2", "fedbuff, deadline_s=0.1"]
    assert groups[2].settings == {"policy.name": "fedbuff", "run.rounds": 100000, "policy.deadline_s": 0.1,
                                  "policy.buffer_size": 10}
    assert groups[0].settings["policy.buffer_size"] is None
    twins = [group(1, {"name": "wait"}, 3), group(2, {"name": "wait"}, 3)]      # same settings, other groups
    _labels(twins)
    assert [g.label for g in twins] == ["wait [g1]", "wait [g2]"]


def test_runs_written_before_trace_json_group_and_label_alike(sweep, tmp_path):
    from analysis.groups import load_study

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    for path in copy.rglob("trace.json"):
        path.unlink()
    old = load_study(copy)
    new = load_study(sweep)
    assert [(g.label, g.seeds, g.settings) for g in old.groups] == [(g.label, g.seeds, g.settings) for g in new.groups]
    assert [g.label for g in new.groups] == LABELS


# -- the studies' tables against the traces -------------------------------------------------------

def test_every_script_writes_its_outputs(sweep):
    out = sweep / "analysis"
    for name in SCRIPTS:
        assert script(name).main([str(sweep)]) == 0, name
    for name in SCRIPTS:
        assert (out / f"{name}.png").stat().st_size > 1000
        assert md_table(out / f"{name}.md")
        assert (out / f"{name}.csv").read_text().count("\n") >= 2


def test_accuracy_time_table(sweep):
    assert script("accuracy_time").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "accuracy_time.md")
    expected = groups(runs_of(sweep))
    assert [row["group"] for row in table] == LABELS
    for row in table:
        members = expected[row["group"]]
        last = [finals(r)[-1] for r in members]
        ends = [max(r["rounds_t"]["end_s"]) for r in members]
        energy = [sum(r["rounds_t"]["energy_j"]) for r in members]
        assert int(row["seeds"]) == len(members) == 2
        assert close(row["final_accuracy_mean"], mean(last))
        assert close(row["final_accuracy_std"], sample_std(last))
        assert close(row["sim_time_s_mean"], mean(ends))
        assert close(row["energy_j_mean"], mean(energy)) and close(row["energy_j_std"], sample_std(energy))
        assert close(row["best_accuracy_mean"], mean([max(finals(r)) for r in members]))
    with open(sweep / "analysis" / "accuracy_time_curves.csv") as fh:
        points = list(csv.DictReader(fh))
    assert len(points) == 4 * 4                   # 4 groups x 4 evaluated rounds
    for p in points:
        accs = [r["rounds_t"]["test_accuracy"][int(p["round"])] for r in expected[p["group"]]]
        assert float(p["accuracy_mean"]) == pytest.approx(mean(accs))
        assert float(p["accuracy_std"]) == pytest.approx(sample_std(accs))


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
    expected = groups(rows)
    assert [(row["group"], row["deadline_s"]) for row in table] == [(label, label.split("=")[1]) for label in LABELS]
    for row in table:
        members = expected[row["group"]]
        last = [finals(r)[-1] for r in members]
        hits = []
        for r in members:
            t = r["rounds_t"]
            i = next((i for i, a in enumerate(t["test_accuracy"]) if a is not None and a >= target), None)
            if i is not None:
                hits.append((t["end_s"][i], sum(t["energy_j"][: i + 1])))
        assert int(row["seeds"]) == 2
        assert close(row["final_accuracy_mean"], mean(last))
        assert close(row["final_accuracy_std"], statistics.stdev(last))
        assert row["reached"] == f"{len(hits)}/2"
        assert close(row["time_to_target_s_mean"], mean([h[0] for h in hits]) if hits else None)
        assert close(row["time_to_target_s_std"], sample_std([h[0] for h in hits]))
        assert close(row["energy_to_target_j_mean"], mean([h[1] for h in hits]) if hits else None)


def test_deadline_study_needs_two_deadlines(folder, capsys):
    assert script("deadline").main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "policy.deadline_s takes 1 value(s)" in err and "needs two" in err


@pytest.mark.parametrize("by", ["group", "run"])
def test_pareto_table(sweep, tmp_path, by):
    assert script("pareto").main([str(sweep), "--by", by, "--out", str(tmp_path)]) == 0
    rows = runs_of(sweep)
    key = (lambda r: r["label"]) if by == "group" else (lambda r: f"{r['label']}, seed {r['seed']}")
    points = {}
    for name, members in groups(rows, key).items():
        points[name] = (mean([max(r["rounds_t"]["end_s"]) for r in members]),
                        mean([sum(r["rounds_t"]["energy_j"]) for r in members]),
                        mean([finals(r)[-1] for r in members]))

    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q[2] >= p[2] and q != p for q in points.values())

    table = md_table(tmp_path / "pareto.md")
    assert {row["group"] for row in table} == set(points)
    assert {row["group"] for row in table if row["pareto_optimal"] == "yes"} == {
        name for name, p in points.items() if not dominated(p)}
    for row in table:
        t, e, a = points[row["group"]]
        assert close(row["sim_time_s_mean"], t) and close(row["energy_j_mean"], e)
        assert close(row["final_accuracy_mean"], a)
        assert row["seeds"] == ("2" if by == "group" else "1")


def test_layer_updates_table(sweep):
    assert script("layer_updates").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "layer_updates.md")
    expected = groups(runs_of(sweep))
    assert len(table) == len(expected) * 3                  # the MLP has 3 layers
    for row in table:
        members = expected[row["group"]]
        layer = int(row["layer"])
        per_seed = [[c[layer] for c in r["rounds_t"]["contributors"]] for r in members]
        fractions = [mean([c > 0 for c in counts]) for counts in per_seed]
        contributors = [mean(counts) for counts in per_seed]
        shares = [mean([c[layer] / p for c, p in zip(r["rounds_t"]["contributors"], r["rounds_t"]["participants"])])
                  for r in members]
        assert close(row["update_fraction_mean"], mean(fractions))
        assert close(row["mean_contributors_mean"], mean(contributors))
        assert close(row["mean_contributors_std"], sample_std(contributors))
        assert close(row["mean_share_mean"], mean(shares))
    # SALF at the tight deadline: the last layer has at least as many contributors as the first
    salf = {int(r["layer"]): num(r["mean_contributors_mean"]) for r in table if r["group"] == LABELS[0]}
    assert salf[2] >= salf[1] >= salf[0] and salf[2] > salf[0]


def test_depths_table(sweep):
    assert script("depths").main([str(sweep)]) == 0
    table = md_table(sweep / "analysis" / "depths.md")
    for label, members in groups(runs_of(sweep)).items():
        per_seed = [[d for s, d in zip(r["devices_t"]["status"], r["devices_t"]["depth"]) if s != "complete"]
                    for r in members]
        mine = {int(row["depth"]): row for row in table if row["group"] == label}
        assert sorted(mine) == [0, 1, 2]
        for depth, row in mine.items():
            assert int(row["count"]) == sum(d.count(depth) for d in per_seed)
            shares = [d.count(depth) / len(d) for d in per_seed if d]
            assert close(row["share_mean"], mean(shares) if shares else None)
            assert close(row["share_std"], sample_std(shares))
    assert sum(int(row["count"]) for row in table) > 0


def check_gantt(run_dir, out, round_, name="gantt"):
    """The bars of NAME.csv against the round's events and against devices.parquet's phase durations."""
    with open(out / f"{name}.csv") as fh:
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
    classes = {d["device"]: d["class"] for d in devices}
    assert all(b["class"] == classes[int(b["device"])] for b in bars)
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
    run_id = "policy.name=salf/policy.deadline_s=0.05/seed=3"
    out = sweep / "analysis"
    devices = ",".join(str(d) for d in range(8))
    assert script("gantt").main([str(sweep), "--run", run_id, "--round", "1", "--devices", devices]) == 0
    bars = check_gantt(sweep / "runs" / run_id, out, 1)
    assert {b["phase"] for b in bars} >= {"download", "forward", "backward", "cut"}
    assert f"run {run_id}, round 1" in (out / "gantt.md").read_text()
    md = md_table(out / "gantt.md")
    assert len(md) == len(bars)
    for row, bar in zip(md, bars):
        assert row["device"] == bar["device"] and row["phase"] == bar["phase"] and row["class"] == bar["class"]
        assert close(row["start_s"], float(bar["start_s"])) and close(row["end_s"], float(bar["end_s"]))


def test_gantt_shows_every_way_a_device_ended_the_round(sweep):
    """By default: one device of each (class, status, depth) in turn, stragglers first, in the round whose
    devices ended in the most ways; --max-devices caps it."""
    from analysis import gantt

    run_dir = sweep / "runs" / "policy.name=salf/policy.deadline_s=0.05/seed=3"
    devices = pq.read_table(run_dir / "devices.parquet").to_pylist()
    kinds = {}
    for d in devices:
        kinds.setdefault(d["round"], set()).add((d["class"], d["status"], d["depth"]))
    best = min(kinds, key=lambda r: (-len(kinds[r]), r))
    out = sweep / "analysis"
    assert script("gantt").main([str(sweep), "--run", str(run_dir.relative_to(sweep / "runs"))]) == 0
    assert f"round {best}" in (out / "gantt.md").read_text()
    shown = {int(row["device"]) for row in md_table(out / "gantt.md")}
    mine = {d["device"]: d for d in devices if d["round"] == best}
    assert {(mine[d]["class"], mine[d]["status"], mine[d]["depth"]) for d in shown} == kinds[best]
    assert script("gantt").main([str(sweep), "--run", str(run_dir.relative_to(sweep / "runs")), "--max-devices",
                                 "2"]) == 0
    two = {int(row["device"]) for row in md_table(out / "gantt.md")}
    assert len(two) == 2 and all(mine[d]["status"] != "complete" for d in two)      # stragglers first
    participants = [{"device": i, "class": c, "status": s, "depth": d} for i, (c, s, d) in
                    enumerate([("a", "complete", 3)] * 5 + [("a", "partial", 1)] * 3 + [("b", "nothing", 0)])]
    assert gantt.pick_devices(participants, 4) == [8, 5, 0, 6]


@pytest.mark.parametrize("mode,deadline,phases", [
    ("streaming", "0.004", {"download", "forward", "backward", "upload", "cut"}),   # cuts in compute and upload
    ("streaming", "0.01", {"download", "forward", "backward", "upload", "cut"}),    # upload queued, then cut
    ("after_compute", "0.01", {"download", "forward", "backward", "upload", "cut"}),
    ("ideal", "0.0005", {"cut"}),                                                   # cut during the download
])
def test_gantt_interrupted_phases(tmp_path, mode, deadline, phases):
    run_dir = run(tmp_path, f'network.upload_mode="{mode}"', f"policy.deadline_s={deadline}", name=mode)
    out = tmp_path / "an"
    assert script("gantt").main([str(run_dir), "--round", "0", "--max-devices", "100", "--out", str(out)]) == 0
    bars = check_gantt(run_dir, out, 0)
    assert {b["phase"] for b in bars} == phases


# -- what is read, what is written ----------------------------------------------------------------

def test_skips_runs_that_did_not_complete(sweep, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    broken = "policy.name=drop/policy.deadline_s=0.1/seed=4"
    (copy / "runs" / broken / "status.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    assert script("accuracy_time").main([str(copy)]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and broken in err
    seeds = {row["group"]: row["seeds"] for row in md_table(copy / "analysis" / "accuracy_time.md")}
    assert seeds["drop, deadline_s=0.1"] == "1" and seeds["drop, deadline_s=0.05"] == "2"


def test_single_run_directory_and_bad_directory(sweep, tmp_path, capsys):
    run_dir = sweep / "runs" / "policy.name=salf/policy.deadline_s=0.1/seed=3"
    assert script("report").main([str(run_dir), "--out", str(tmp_path / "one")]) == 0
    rows = md_table(tmp_path / "one" / "analysis" / "accuracy_time.md")
    assert [(r["group"], r["seeds"]) for r in rows] == [("salf(mean)", "1")]
    page = (tmp_path / "one" / "report.html").read_text()
    assert "Deadline study not drawn" in page and "g1: salf(mean)" in page
    (tmp_path / "empty").mkdir()
    for argv in ([str(tmp_path / "empty")], [str(tmp_path / "nowhere")], [str(sweep), "--bogus"]):
        assert script("accuracy_time").main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err and "Traceback" not in err
    assert script("gantt").main([str(sweep), "--run", "nosuchrun"]) == 2
    assert "--run nosuchrun" in capsys.readouterr().err


def snapshot(*folders):
    """Every file's mtime, but for analysis/results/ (the studies' outputs, which a study may be writing now)."""
    results = REPO / "analysis" / "results"
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if results not in p.parents}


def test_fedsim_report_writes_one_page_into_the_sweep_and_nothing_elsewhere(sweep, tmp_path):
    """`fedsim report DIR` (and `fedsim plot KIND DIR`) from another working directory: DIR/report.html, with
    the scenario, the version, the commands, a table of contents and one section per group; the analysis
    package folder and the working directory are left as they were."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("analysis", "report.html"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(REPO / "analysis", cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    for argv in (["report", str(copy)], ["plot", "accuracy", str(copy)], ["plot", "gantt", str(copy)]):
        proc = subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], cwd=cwd, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    assert snapshot(REPO / "analysis", cwd) == before
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert (copy / "analysis" / "accuracy_time.png").is_file() and (copy / "analysis" / "gantt.png").is_file()
    assert re.findall(r'src="(?!data:)', page) == []               # self-contained
    assert "0.1.0" in page and "torch version" in page and "s.toml" in page
    assert "fedsim sweep" in page and "--grid policy.name=salf,drop" in page
    assert "<nav><h2>Contents</h2>" in page
    headings = re.findall(r"<h[1-3][^>]*>(.*?)</h[1-3]>", page)
    assert len(headings) == len(set(headings))                      # no heading twice
    for i, label in enumerate(LABELS, start=1):
        assert f"<h3 id='g{i}'>g{i}: {label}</h3>" in page and f"href='#g{i}'" in page
    assert page.count("<h3 id='g") == 4
    for name in ("accuracy_time", "deadline", "pareto", "layer_updates", "depths", "g1_accuracy", "g4_gantt"):
        assert f'alt="{name}"' in page
    assert "sample standard deviation (ddof=1)" in page


def test_fedsim_plot_and_report_errors_are_one_line(sweep, tmp_path, capsys):
    assert fedsim_main(["plot", "nosuchkind", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown kind 'nosuchkind'" in err
    assert fedsim_main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nowhere") in err
    assert fedsim_main(["plot", "gantt", str(sweep), "--round", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--round 99" in err
    assert fedsim_main(["plot", "depths", str(sweep), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "depths.png").is_file()


def test_report_on_a_folder_of_runs(folder, tmp_path):
    assert fedsim_main(["report", str(folder), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h3 id='g1'>g1: drop</h3>" in page and "<h3 id='g2'>g2: salf</h3>" in page
    assert f"fedsim run test.toml --set run.seed=4 --out {folder / 'more' / 'salf-4'}" in page   # how it was made
    assert "3 completed, in 2 group(s)" in page


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
    assert len(table) == 4
    for (policy, deadline), members in groups(runs_of(sweep), key=lambda r: (r["policy.name"], r["policy.deadline_s"])).items():
        row = table[(policy, f"{deadline:g}")]
        assert row["seeds"] == str(len(members)) and row["other settings"] == ""
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
