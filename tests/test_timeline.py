"""A round computed at once (fedsim.sim.timeline) against the same round event by event (DeviceRound).

The event path is the oracle: SimPy processes events by time, then in the order they were scheduled, and every
row is written when its event is processed. The random rounds below draw durations from a few dyadic values
(0, 0.25, 0.5, 1) so that phases of different devices end at exactly the same instant, phases end exactly at the
deadline, and some phases take no time at all; others draw arbitrary floats. Rows, outcomes and the round's end
must be identical, value for value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import simpy

from conftest import run
from fedsim.errors import FedsimError
from fedsim.output.trace import TraceWriter
from fedsim.policies.salf import Salf
from fedsim.sim import engine
from fedsim.sim.round_setup import RoundSetup
from fedsim.sim.timeline import computable
from fedsim.spec.scenario import UploadMode
from fedsim.world.timing import RoundPlan
from test_timing import TEXT


class _Server:
    """Just what `run_round` asks of a server, for one given round."""

    def __init__(self, setup: RoundSetup, trace: TraceWriter, start_at: float):
        self.setup, self.trace, self.start_at = setup, trace, start_at
        self.current_round, self.active, self.time_budget_s, self.ended_by = setup.round, {}, None, None
        self.finished = None

    def setup_round(self, round_, env):
        return self.setup

    def offline_at(self, devices, after_at):
        return np.full(len(devices), np.inf)

    def watch(self, env, devices):
        pass

    def unwatch(self):
        pass

    def finish_round(self, setup, start_at, end_at, outcomes):
        self.finished = (start_at, end_at, outcomes)


def _play(setup: RoundSetup, start_at: float, timeline: bool, tmp: Path):
    """Run the round from `start_at`; its rows (as columns), outcomes and end time."""
    tmp.mkdir(parents=True, exist_ok=True)
    trace = TraceWriter(tmp, {})
    server = _Server(setup, trace, start_at)
    env = simpy.Environment(initial_time=start_at)
    env.process(engine.run_round(env, server, timeline))
    env.run()
    trace.end_round()
    trace.close(complete=True)
    rows = pq.read_table(tmp / "events.parquet").to_pydict()
    return rows, server.finished


def _same_outcomes(got, expected, case) -> None:
    """Column by column, bit for bit (a -0.0 for a 0.0 would be another trace)."""
    for name in ("depth", "layers_computed", "download_s", "compute_s", "upload_s", "active_until_at", "done_at",
                 "offline", "stopped", "nonfinite"):
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"case {case}: {name}: {a} != {b}"


def _random_setup(rng: np.random.Generator, dyadic: bool) -> tuple[RoundSetup, float]:
    n, n_layers = int(rng.integers(0, 9)), int(rng.integers(1, 5))

    def durations(shape):
        if dyadic:
            return rng.choice([0.0, 0.25, 0.5, 1.0], size=shape, p=[0.1, 0.3, 0.3, 0.3])
        base = rng.exponential(0.4, size=shape)
        copy = rng.random(shape[0] if isinstance(shape, tuple) else shape) < 0.3   # some devices alike
        if n > 1 and copy.any():
            base[copy] = base[0]
        return base

    mode = UploadMode.AFTER_COMPUTE if rng.random() < 0.4 else UploadMode.IDEAL
    order = tuple(int(x) for x in rng.permutation(n_layers))
    plan = RoundPlan(devices=np.sort(rng.choice(1000, size=n, replace=False)).astype(np.int64),
                     samples=np.full(n, 4, dtype=np.int64), steps=np.ones(n, dtype=np.int64),
                     download_s=durations(n), forward_s=durations(n), backward_s=durations((n, n_layers)),
                     upload_s=durations((n, n_layers)), layer_order=order,
                     upload_bytes=rng.integers(1, 500, size=(n, n_layers)).astype(np.int64),
                     download_bytes=rng.integers(100, 900, size=n).astype(np.int64),
                     target_depth=rng.integers(0, n_layers + 1, size=n).astype(np.int64))
    start_at = float(rng.choice([0.0, 0.75, 3.0, 1e6 / 3]))
    deadline_s = None if rng.random() < 0.15 else float(rng.choice([0.25, 0.5, 1.0, 1.25, 1.75, 2.5, 3.0,
                                                                    rng.exponential(1.5) + 1e-9]))
    powers = [SimpleNamespace(power_rx_w=float(rng.choice([1.0, 0.3])), power_compute_w=float(rng.choice([2.0, 0.7])),
                              power_tx_w=float(rng.choice([0.5, 1.1]))) for _ in range(n)]
    drawn = None
    if rng.random() < 0.3:
        drawn = np.where(rng.random(n) < 0.6, rng.integers(1, n_layers + 1, size=n), -1).astype(np.int64)
        plan = replace(plan, target_depth=np.where(drawn >= 0, np.minimum(plan.target_depth, drawn),
                                                   plan.target_depth).astype(np.int64))
    return RoundSetup(int(rng.integers(0, 5)), plan, deadline_s, mode, powers, straggler_depth=drawn), start_at


@pytest.mark.parametrize("dyadic", [True, False])
def test_random_rounds_match_the_event_path(tmp_path, dyadic):
    rng = np.random.default_rng(17 + dyadic)
    cuts = ties = 0
    for case in range(150):
        setup, start_at = _random_setup(rng, dyadic)
        assert computable(setup)
        event_rows, (s0, e0, out0) = _play(setup, start_at, False, tmp_path / f"e{case}")
        rows, (s1, e1, out1) = _play(setup, start_at, True, tmp_path / f"t{case}")
        assert rows == event_rows, f"case {case}"
        assert (s1, e1) == (s0, e0), f"case {case}"
        _same_outcomes(out1, out0, case)
        cuts += event_rows["event"].count("cut")
        times = [t for t, d in zip(event_rows["time_s"], event_rows["device"]) if d >= 0]
        ties += len(times) - len(set(times))
    assert cuts > 50 and ties > 200          # the cases did exercise cuts and ties


def test_ties_come_in_the_order_their_events_were_scheduled(tmp_path):
    # two devices, one layer, every phase 0.5 s (device 1's download 0 s), deadline 1.0 s after a start at 0:
    #   t = 0   : download_start 0, download_start 1
    #   t = 0   : device 1's download ends (a zero-length phase: scheduled at the start, processed at once)
    #   t = 0.5 : device 0's download ends, device 1's forward ends (its forward was scheduled at t = 0, after
    #             device 0's download, so it comes second)
    #   t = 1.0 : the deadline (scheduled before every device) has nobody waiting; device 0's forward and
    #             device 1's backward end exactly at the deadline: both count; device 0's backward then cannot
    #             start any more: cut at once, with no energy
    plan = RoundPlan(devices=np.array([3, 7]), samples=np.array([1, 1]), steps=np.array([1, 1]),
                     download_s=np.array([0.5, 0.0]), forward_s=np.array([0.5, 0.5]),
                     backward_s=np.array([[0.5], [0.5]]), upload_s=np.array([[0.25], [0.25]]), layer_order=(0,),
                     upload_bytes=np.array([[8], [8]]), download_bytes=np.array([100, 100]),
                     target_depth=np.array([1, 1]))
    powers = [SimpleNamespace(power_rx_w=1.0, power_compute_w=2.0, power_tx_w=0.5)] * 2
    setup = RoundSetup(0, plan, 1.0, UploadMode.IDEAL, powers)
    rows, (start_at, end_at, outcomes) = _play(setup, 0.0, True, tmp_path)
    got = list(zip(rows["time_s"], rows["device"], rows["event"], rows["layer"], rows["bytes"], rows["energy_j"]))
    assert got == [
        (0.0, -1, "round_start", -1, 0, 0.0),
        (0.0, 3, "download_start", -1, 0, 0.0),
        (0.0, 7, "download_start", -1, 0, 0.0),
        (0.0, 7, "download_end", -1, 100, 0.0),
        (0.5, 3, "download_end", -1, 100, 0.5),
        (0.5, 7, "forward_end", -1, 0, 1.0),
        (1.0, 3, "forward_end", -1, 0, 1.0),
        (1.0, 3, "cut", 0, 0, 0.0),
        (1.0, 7, "backward_end", 0, 0, 1.0),
        (1.0, -1, "deadline", -1, 0, 0.0),
        (1.0, -1, "round_end", -1, 0, 0.0),
    ]
    assert (start_at, end_at) == (0.0, 1.0)
    assert outcomes.depth.tolist() == [0, 1]
    assert np.array_equal(outcomes.done_at, [np.nan, 1.0], equal_nan=True)
    assert outcomes.compute_s.tolist() == [0.5, 1.0]
    assert _play(setup, 0.0, False, tmp_path / "events")[0] == rows


def test_only_rounds_whose_devices_cannot_affect_one_another_are_computed():
    base = RoundSetup(0, RoundPlan(*(np.zeros(0) for _ in range(7)), (), np.zeros((0, 0), dtype=np.int64),
                                   np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)),
                      None, UploadMode.IDEAL, [])
    assert computable(base)
    assert computable(replace(base, upload_mode=UploadMode.AFTER_COMPUTE))
    assert not computable(replace(base, upload_mode=UploadMode.STREAMING))
    assert not computable(replace(base, quorum=3))
    assert not computable(replace(base, network=object()))


def _tables(out: Path) -> dict:
    return {name: pq.read_table(out / f"{name}.parquet").to_pydict() for name in ("events", "devices", "rounds")}


@pytest.mark.parametrize("overrides", [
    ("policy.deadline_s=30", "run.rounds=3"),
    ("policy.deadline_s=30", "run.rounds=3", 'network.upload_mode="after_compute"'),
    # churn: device 0 leaves at 40 and comes back at 140; rounds it would leave during go event by event
    ("policy.deadline_s=45", "run.rounds=4",
     'fleet.classes[0].availability={ on_s = 40, off_s = 100, initial = "online" }'),
])
def test_whole_runs_match_the_event_path(tmp_path, monkeypatch, overrides):
    computed = run(tmp_path, *overrides, name="computed", text=TEXT)
    would = []          # what `_timeline` gives each round (the event path runs instead)
    original = engine._timeline
    monkeypatch.setattr(engine, "_timeline", lambda *a: would.append(original(*a)))
    events = run(tmp_path, *overrides, name="events", text=TEXT)
    assert _tables(computed) == _tables(events)
    assert any(t is not None for t in would)        # rounds of the first run were computed at once


@dataclass(frozen=True)
class Everyone(Salf):
    """SALF with every device of the fleet, online or not (a plugin may select offline devices)."""
    name: ClassVar[str] = "everyone"

    def select(self, candidates, k, rng):
        return np.arange(3)


@dataclass(frozen=True)
class NegativeDownload(Salf):
    """SALF whose plan has a download of -0.25 s for its first participant."""
    name: ClassVar[str] = "negative_download"

    def plan(self, ctx, deadline_s):
        plan = super().plan(ctx, deadline_s)
        return replace(plan, download_s=np.where(np.arange(plan.n) == 0, -0.25, plan.download_s))


def test_a_device_selected_while_offline_is_left_to_the_event_path(tmp_path, monkeypatch):
    # device 0 is offline on [0, 1), online on [1, 2), offline again...: the event path's watcher interrupts it
    overrides = ('policy.name="test_timeline:Everyone"', "policy.deadline_s=30", "run.rounds=1",
                 'fleet.classes[0].availability={ on_s = 1, off_s = 1, initial = "offline" }')
    computed = run(tmp_path, *overrides, name="computed", text=TEXT)
    monkeypatch.setattr(engine, "_timeline", lambda *a: None)
    events = run(tmp_path, *overrides, name="events", text=TEXT)
    assert _tables(computed) == _tables(events)
    assert _tables(events)["devices"]["status"][0] == "offline"


def test_a_plan_with_a_negative_duration_is_refused_naming_the_policy(tmp_path):
    with pytest.raises(FedsimError, match=r"test.toml: policy.name: salf\(mean\) planned round 0 wrongly: "
                                          r"RoundPlan.download_s holds -0.25 s; durations are finite and >= 0"):
        run(tmp_path, 'policy.name="test_timeline:NegativeDownload"', "policy.deadline_s=30", "run.rounds=1",
            text=TEXT)
