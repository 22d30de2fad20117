"""Deadlines that change over the run (`policy.deadline_s` lists and ramps) and the time budget
(`run.time_budget_s`), with simulated timestamps computed by hand on the 3-device fleet of test_timing.

Round durations there (batch 1, from a round's start): device a finishes fc3 at 25, fc2 at 27, fc1 at 42;
device b at 13.25, 14.25, 21.75 (whole model); device c's forward ends at 38.5, fc3 at 48.5, fc2 at 52.5 and
fc1 at 82.5. A `wait` round lasts 82.5 s.
"""

from __future__ import annotations

import math

import pytest

from conftest import BASE_TOML, run, scenario, table
from fedsim.cli import main
from fedsim.errors import ScenarioError
from test_timing import TEXT


def rounds_of(run_dir):
    t = table(run_dir, "rounds")
    return list(zip(t["start_s"], t["end_s"], t["deadline_s"]))


def test_a_list_gives_each_round_its_deadline_and_repeats_the_last(tmp_path):
    out = run(tmp_path, "run.rounds=4", "policy.deadline_s=[30, 22]", text=TEXT)
    assert rounds_of(out) == [(0.0, 30.0, 30.0), (30.0, 52.0, 22.0), (52.0, 74.0, 22.0), (74.0, 96.0, 22.0)]
    dev = table(out, "devices")
    # round 1 (deadline 22, from 30): b delivers everything at 51.75; a's forward ends at 50, its first
    # backward would end at 55 > 52: nothing; c is cut in its forward pass
    got = {(r, d): depth for r, d, depth in zip(dev["round"], dev["device"], dev["depth"]) if r == 1}
    assert got == {(1, 0): 0, (1, 1): 3, (1, 2): 0}
    ev = table(out, "events")
    deadline_events = [(r, t) for r, e, t in zip(ev["round"], ev["event"], ev["time_s"]) if e == "deadline"]
    assert deadline_events == [(0, 30.0), (1, 52.0), (2, 74.0), (3, 96.0)]


@pytest.mark.parametrize("kind, expected", [("linear", [40.0, 25.0, 10.0]), ("geometric", [40.0, 20.0, 10.0])])
def test_ramps_from_start_to_end(tmp_path, kind, expected):
    out = run(tmp_path, "run.rounds=3", f'policy.deadline_s={{ schedule = "{kind}", start = 40, end = 10 }}',
              text=TEXT)
    got = rounds_of(out)
    assert [d for *_, d in got] == expected
    assert [e for _, e, _ in got] == [sum(expected[:i + 1]) for i in range(3)]


def test_every_deadline_policy_reads_a_schedule(tmp_path):
    out = run(tmp_path / "d", "run.rounds=3", 'policy.name="drop"', "policy.deadline_s=[30, 22]", text=TEXT)
    assert rounds_of(out) == [(0.0, 30.0, 30.0), (30.0, 52.0, 22.0), (52.0, 74.0, 22.0)]
    # partial: a and c cannot fit one sample (batch 1) and do nothing; b's whole work ends at 21.75, and so
    # does the round, under either deadline
    out = run(tmp_path / "p", "run.rounds=3", 'policy.name="partial"', "policy.deadline_s=[30, 22]", text=TEXT)
    assert rounds_of(out) == [(0.0, 21.75, 30.0), (21.75, 43.5, 22.0), (43.5, 65.25, 22.0)]
    out = run(tmp_path / "h", "run.rounds=3", 'policy.name="heterofl"', "policy.deadline_s=[0.3, 0.2]")
    assert [d for *_, d in rounds_of(out)] == [0.3, 0.2, 0.2]


def test_wait_rounds_have_no_deadline(tmp_path):
    out = run(tmp_path, "run.rounds=2", 'policy.name="wait"', text=TEXT)
    assert rounds_of(out) == [(0.0, 82.5, None), (82.5, 165.0, None)]


@pytest.mark.parametrize("value, words", [
    ("[30, 22, 20]", ["policy.deadline_s", "3 deadlines", "run.rounds = 2"]),
    ("[30, -1]", ["policy.deadline_s[1]", "-1"]),
    ("[30, nan]", ["policy.deadline_s[1]", "nan"]),
    ("[]", ["policy.deadline_s", "empty"]),
    ('{ schedule = "cubic", start = 1, end = 2 }', ["policy.deadline_s.schedule", "cubic"]),
    ('{ schedule = "linear", start = 0, end = 2 }', ["policy.deadline_s.start", "0"]),
    ('{ start = 1, end = 2 }', ["policy.deadline_s", "schedule"]),
    ('{ schedule = "linear", start = 1, end = 2, stop = 3 }', ["policy.deadline_s.stop", "unknown field"]),
])
def test_bad_schedules_are_exit_2_naming_field_and_value(tmp_path, capsys, value, words):
    path = tmp_path / "s.toml"
    path.write_text(TEXT)
    assert main(["validate", str(path), "--set", f"policy.deadline_s={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_a_fixed_deadline_is_still_a_number_in_the_metadata(tmp_path):
    import json

    out = run(tmp_path, "run.rounds=1", text=TEXT)
    assert json.loads((out / "trace.json").read_text())["deadline_s"] == 30.0
    out = run(tmp_path / "s", "run.rounds=1", "policy.deadline_s=[30]", text=TEXT)
    assert json.loads((out / "trace.json").read_text())["deadline_s"] is None


# -- run.time_budget_s ----------------------------------------------------------------------------


def test_time_budget_ends_before_the_first_round_that_would_end_after_it(tmp_path):
    out = run(tmp_path, "run.rounds=10", "run.time_budget_s=100", "run.eval_every=5", text=TEXT)
    rows = table(out, "rounds")
    assert list(zip(rows["start_s"], rows["end_s"])) == [(0.0, 30.0), (30.0, 60.0), (60.0, 90.0)]
    assert rows["ended_by"] == [None, None, "time_budget_s"]
    # round 2 was not due for evaluation (every 5): the run's end evaluates it, in its row
    assert rows["test_accuracy"][:2] == [None, None] and rows["test_accuracy"][2] is not None
    ev = table(out, "events")
    assert max(ev["time_s"]) == 90.0 and max(ev["round"]) == 2        # round 3's events are forgotten
    assert set(table(out, "devices")["round"]) == {0, 1, 2}
    status = __import__("json").loads((out / "status.json").read_text())
    assert status["rounds_done"] == 3 and status["sim_time_s"] == 90.0


def test_a_round_ending_exactly_at_the_budget_counts(tmp_path):
    out = run(tmp_path, "run.rounds=10", 'policy.name="wait"', "run.time_budget_s=165", text=TEXT)
    rows = table(out, "rounds")
    assert rows["end_s"] == [82.5, 165.0] and rows["ended_by"] == [None, "time_budget_s"]
    out = run(tmp_path / "b", "run.rounds=10", 'policy.name="wait"', "run.time_budget_s=164.9", text=TEXT)
    assert table(out, "rounds")["end_s"] == [82.5]


def test_a_budget_holds_deadlines_that_add_up_to_it_up_to_rounding(tmp_path):
    """0.1 + 0.1 + 0.1 = 0.30000000000000004 in floating point: a budget of 0.3 s holds those three rounds."""
    assert 0.1 + 0.1 + 0.1 > 0.3
    out = run(tmp_path, "run.rounds=10", "policy.deadline_s=0.1", "run.time_budget_s=0.3", text=TEXT)
    rows = table(out, "rounds")
    assert rows["end_s"] == [0.1, 0.2, 0.1 + 0.1 + 0.1] and rows["ended_by"][-1] == "time_budget_s"
    out = run(tmp_path / "b", "run.rounds=10", "policy.deadline_s=0.1", "run.time_budget_s=0.2999", text=TEXT)
    assert table(out, "rounds")["end_s"] == [0.1, 0.2]


def test_rounds_limit_is_named_when_it_comes_first(tmp_path):
    out = run(tmp_path, "run.rounds=2", "run.time_budget_s=1000", text=TEXT)
    assert table(out, "rounds")["ended_by"] == [None, "rounds"]


def test_a_budget_no_round_fits_is_an_error(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(TEXT)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet", "--set", "run.time_budget_s=10"]) == 2
    err = capsys.readouterr().err
    assert "run.time_budget_s" in err and "round 0 would end at 30 s" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", '"x"'])
def test_bad_budget_is_exit_2(tmp_path, capsys, value):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    assert main(["validate", str(path), "--set", f"run.time_budget_s={value}"]) == 2
    assert "run.time_budget_s" in capsys.readouterr().err


def test_asynchronous_runs_stop_at_the_budget(tmp_path):
    out = run(tmp_path, 'policy.name="fedbuff"', "policy.duration_s=5", "policy.eval_every_s=0.5",
              "policy.buffer_size=2", "run.rounds=10000", "run.time_budget_s=1.25")
    rows = table(out, "rounds")
    assert rows["end_s"][-1] == 1.25 and rows["ended_by"][-1] == "time_budget_s"
    assert all(v is None for v in rows["ended_by"][:-1])
    assert max(table(out, "events")["time_s"]) <= 1.25
    out = run(tmp_path / "d", 'policy.name="fedbuff"', "policy.duration_s=1", "policy.eval_every_s=0.5",
              "policy.buffer_size=2", "run.rounds=10000", "run.time_budget_s=2")
    assert table(out, "rounds")["ended_by"][-1] == "duration_s"


def test_scenario_reads_the_budget():
    assert scenario("run.time_budget_s=2.5").run.time_budget_s == 2.5
    assert scenario().run.time_budget_s is None
    with pytest.raises(ScenarioError, match="run.time_budget_s"):
        scenario("run.time_budget_s=inf")
    assert math.isfinite(scenario("run.time_budget_s=1e9").run.time_budget_s)
