"""`fedsim plot equal-time`: runs that share a simulated-time budget, each family of a policy (constant
deadlines, ADEL-FL's schedule over R rounds, no deadline) at its best member; every number recomputed here
from the Parquet traces."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML
from fedsim.cli import main as fedsim_main
from test_analysis import md_table

BUDGET_S = 0.5
SETS = ["--seeds", "2", "--jobs", "2", "--quiet", "--set", f"run.time_budget_s={BUDGET_S}"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("equal_time")
    scenario = base / "s.toml"
    scenario.write_text(BASE_TOML)
    out = base / "study"
    assert fedsim_main(["sweep", str(scenario), *SETS, "--set", "run.rounds=1000", "--out", str(out / "constant"),
                        "--grid", "policy.name=salf,drop", "--grid", "policy.deadline_s=0.05,0.1"]) == 0
    assert fedsim_main(["sweep", str(scenario), *SETS, "--set", "run.rounds=1000", "--out", str(out / "wait"),
                        "--grid", "policy.name=wait"]) == 0
    assert fedsim_main(["sweep", str(scenario), *SETS, "--out", str(out / "adel"), "--set",
                        f'policy.deadline_s={{ optimize = "adel", total_s = {BUDGET_S}, min_s = 0.01 }}',
                        "--grid", "run.rounds=5,10"]) == 0
    return out


def accuracy_at(run_dir, budget_s):
    t = pq.read_table(run_dir / "rounds.parquet").sort_by("round").to_pydict()
    held = [a for a, end in zip(t["test_accuracy"], t["end_s"]) if a is not None and end <= budget_s + 1e-9]
    return held[-1]


def by_config(study):
    """(policy, label) -> accuracy at the budget of each seed, from the traces."""
    out = {}
    for sweep in ("constant", "wait", "adel"):
        for row in pq.read_table(study / sweep / "index.parquet").to_pylist():
            if sweep == "constant":
                key = (row["policy.name"], f"{row['policy.deadline_s']:g}")
            elif sweep == "wait":
                key = ("wait", "-")
            else:
                key = ("salf", f"adel R {row['run.rounds']} (total {BUDGET_S:g} s)")
            out.setdefault(key, []).append(accuracy_at(study / sweep / row["run_dir"], BUDGET_S))
    return out


def test_every_run_stops_at_the_budget(study):
    for sweep in ("constant", "wait", "adel"):
        for row in pq.read_table(study / sweep / "index.parquet").to_pylist():
            end = pq.read_table(study / sweep / row["run_dir"] / "rounds.parquet").column("end_s").to_pylist()
            assert max(end) <= BUDGET_S + 1e-9


def test_each_family_at_its_best_member(study, tmp_path):
    from analysis import equal_time

    out = tmp_path / "eq"
    assert equal_time.main([str(study), "--out", str(out), "--budget-s", str(BUDGET_S), "--target", "0.3"]) == 0
    assert {p.name for p in out.iterdir()} >= {"equal_time.md", "equal_time_all.md", "equal_time.png",
                                                 "equal_time_deadline.png"}
    truth = by_config(study)
    every = md_table(out / "equal_time_all.md")
    assert {(r["policy"], r["deadline_s"]) for r in every} == set(truth)
    for r in every:
        accs = truth[(r["policy"], r["deadline_s"])]
        m, s = (float(x) for x in r[f"accuracy at {BUDGET_S:g} s"].split(" ± "))
        assert r["seeds"] == "2"
        assert m == pytest.approx(sum(accs) / 2, abs=6e-4)
        assert s == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5, abs=6e-4)
    best = md_table(out / "equal_time.md")
    families = {"salf constant": [k for k in truth if k[0] == "salf" and not k[1].startswith("adel")],
                "salf adel": [k for k in truth if k[1].startswith("adel")],
                "drop constant": [k for k in truth if k[0] == "drop"], "wait": [("wait", "-")]}
    assert len(best) == len(families)
    chosen = {(r["policy"], r["deadline_s"]) for r in best}
    for members in families.values():
        winner = max(members, key=lambda k: sum(truth[k]))
        assert winner in chosen
    means = [float(r[f"accuracy at {BUDGET_S:g} s"].split(" ± ")[0]) for r in best]
    assert means == sorted(means, reverse=True)


def test_budget_is_required(study, capsys):
    from analysis import equal_time

    assert equal_time.main([str(study)]) == 2
    err = capsys.readouterr().err
    assert "--budget-s" in err and "Traceback" not in err
