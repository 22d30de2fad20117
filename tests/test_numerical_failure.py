"""Numerical failure is never "completed": divergence, no update applied, and non-finite updates in every policy.

The divergence rule (README, `training.divergence_factor`): a run fails when the mean training loss of the
updates applied stays above factor x max(first loss, ln(classes)) for 3 rounds (asynchronous: server
updates) in a row, when an update makes a weight non-finite, or when the final model's test loss is above
that bound. A run in which every delivered update was non-finite and dropped has applied no update: it fails.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import simpy
import torch

from conftest import BASE_TOML, run, scenario, table
from fedsim.errors import NumericalError, ScenarioError

NAN_MODEL = 'model.name="tests.helper_models:always_nan"'
DROP = 'training.on_nonfinite="drop"'
# BASE_TOML made asynchronous: 8 devices, the paper MLP on synthetic data
ASYNC = ("policy.duration_s=1.0", "policy.eval_every_s=0.25", "run.rounds=100000")
FEDBUFF = ('policy.name="fedbuff"', "policy.buffer_size=3") + ASYNC
FEDASYNC = ('policy.name="fedasync"',) + ASYNC


def _status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _poisoned(*overrides, device: int = 3):
    """The scenario and its components, device `device`'s training data replaced by NaN."""
    from fedsim.sim.build import build_components

    scn = scenario(*overrides)
    comp = build_components(scn)
    idx = torch.tensor(comp.partition.device_indices(device))
    comp.dataset.x_train[idx] = float("nan")
    return scn, comp


def _serve(tmp_path, scn, comp=None):
    """Run the engine by hand, to look at the server afterwards: (server, the error that ended it or None)."""
    from fedsim.sim.async_engine import AsyncServer, serve_async
    from fedsim.sim.build import build_components
    from fedsim.sim.engine import serve_rounds
    from fedsim.sim.server import Server
    from fedsim.policies import is_asynchronous
    from fedsim.output.trace import TraceWriter

    comp = comp if comp is not None else build_components(scn)
    trace = TraceWriter(tmp_path, {})
    parts = (scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
    asynchronous = is_asynchronous(scn.policy)
    server = AsyncServer(*parts) if asynchronous else Server(*parts)
    env = simpy.Environment()
    env.process(serve_async(env, server) if asynchronous else serve_rounds(env, server, scn.run.rounds))
    try:
        env.run()
    except NumericalError as exc:
        trace.close(complete=False)
        return server, exc
    trace.close()
    return server, None


# -- divergence -------------------------------------------------------------------------------------

def test_huge_learning_rate_fails_naming_the_rounds(tmp_path):
    """lr = 1e6 in float64: losses stay finite (1e13 and more) but far above the first round's."""
    with pytest.raises(NumericalError, match=r"^rounds 1-3: training diverged: the mean training loss stayed above "
                                             r"\S+ \(training.divergence_factor 10 x") as err:
        run(tmp_path, "training.lr=1e6", 'model.dtype="float64"', "run.rounds=10")
    assert _status(tmp_path / "run")["status"] == "failed"
    assert "rounds 1-3" in _status(tmp_path / "run")["error"]
    assert "lower training.lr" in str(err.value)


def test_huge_learning_rate_with_drop_fails_too(tmp_path):
    """float32: round 1's loss is huge, then every device's loss is NaN; dropping them cannot save the run."""
    with pytest.raises(NumericalError, match=r"^rounds 1-3: training diverged: .* in rounds 2, 3 every update was "
                                             r"non-finite and dropped \(devices 0, 1, 2"):
        run(tmp_path, "training.lr=1e7", DROP, "run.rounds=10")
    assert _status(tmp_path / "run")["status"] == "failed"


def test_a_run_that_ends_diverged_fails_on_its_final_test_loss(tmp_path):
    """Two rounds are too few for the streak: the final model's test loss decides."""
    with pytest.raises(NumericalError, match=r"^round 1: training diverged: the final model's test loss is \S+, "
                                             r"above \S+ \(training.divergence_factor 10 x"):
        run(tmp_path, "training.lr=1e6", 'model.dtype="float64"', "run.rounds=2")
    assert _status(tmp_path / "run")["status"] == "failed"


LOUD = ('model.name="tests.helper_models:loud"', "training.lr=1e20", "policy.deadline_s=1000")


def test_an_update_that_makes_the_weights_non_finite_fails_at_once(tmp_path):
    """Gradients of about 1e19, all finite, times lr 1e20: the float32 weights overflow in round 0."""
    with pytest.raises(NumericalError, match=r"^round 0: training diverged: the update of devices 0, 1, 2, 3, 4, 5, "
                                             r"6, 7 made the weights non-finite \((fc\d.(weight|bias)(, )?)+\); "
                                             r"lower training.lr"):
        run(tmp_path, *LOUD)
    assert _status(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("policy", [FEDBUFF, FEDASYNC])
def test_an_asynchronous_update_that_makes_the_weights_non_finite_fails_at_once(tmp_path, policy):
    with pytest.raises(NumericalError, match=r"^update 0: training diverged: the update of devices? [\d, ]+ made the "
                                             r"weights non-finite \((fc\d.(weight|bias)(, )?)+\); lower training.lr"):
        run(tmp_path, *LOUD, *policy)
    assert _status(tmp_path / "run")["status"] == "failed"


def test_the_failing_round_is_in_the_trace(tmp_path):
    from fedsim.output.trace import read_journal

    with pytest.raises(NumericalError, match=r"^round 0: "):
        run(tmp_path, *LOUD)
    rounds = read_journal(tmp_path / "run" / "rounds.arrows").to_pydict()
    assert rounds["round"] == [0]


@pytest.mark.parametrize("policy", ["salf", "drop", "wait", "partial", "heterofl", "overselect"])
def test_normal_runs_do_not_trip_the_rule(tmp_path, policy):
    server, error = _serve(tmp_path, scenario(f'policy.name="{policy}"', "run.rounds=8", "policy.deadline_s=0.2"))
    assert error is None
    assert server.warnings() == {}
    assert server.health.applied == 8 and server.health.streak == []


def test_a_lower_factor_makes_the_same_run_fail(tmp_path):
    """The bound is the field: at factor 1.0001 any rise of the loss above its start counts."""
    server, error = _serve(tmp_path, scenario("training.lr=3", "run.rounds=30", "training.divergence_factor=1.0001"))
    assert error is not None and "training diverged" in str(error)
    (tmp_path / "b").mkdir()
    server, error = _serve(tmp_path / "b", scenario("training.lr=3", "run.rounds=30"))
    assert error is None


@pytest.mark.parametrize("value", [1, 0.5, -2, "inf", '"big"'])
def test_divergence_factor_is_validated(value):
    with pytest.raises(ScenarioError, match=r"training.divergence_factor: must be"):
        scenario(f"training.divergence_factor={value}")


# -- no update applied ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["salf", "wait", "partial", "overselect"])
def test_a_model_that_always_gives_nan_fails_with_drop(tmp_path, policy):
    with pytest.raises(NumericalError, match=r"^rounds 0-2: no update applied: every delivered update was "
                                             r"non-finite and dropped, 3 times in a row \(24 device-updates, from "
                                             r"devices 0, 1, 2, 3, 4, 5, 6, 7\)"):
        run(tmp_path, NAN_MODEL, DROP, f'policy.name="{policy}"', "policy.deadline_s=1000", "run.rounds=10")
    status = _status(tmp_path / "run")
    assert status["status"] == "failed" and "no update applied" in status["error"]


def test_a_short_run_that_applied_no_update_fails(tmp_path):
    with pytest.raises(NumericalError, match=r"^round 1: no update applied in the whole run: every delivered update "
                                             r"was non-finite and dropped \(16 device-updates"):
        run(tmp_path, NAN_MODEL, DROP, "policy.deadline_s=1000", "run.rounds=2")
    assert _status(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("policy", [FEDBUFF, FEDASYNC])
def test_a_nan_model_fails_asynchronous_runs_too(tmp_path, policy):
    with pytest.raises(NumericalError, match=r"^update 0: no update applied: every delivered update was non-finite"):
        run(tmp_path, NAN_MODEL, DROP, *policy)
    assert _status(tmp_path / "run")["status"] == "failed"


def test_an_asynchronous_run_too_short_for_the_streak_fails_at_its_end(tmp_path):
    """Jobs of about 10 s, a 15 s run, buffers of 4: one server step was due, and its 4 updates were NaN."""
    with pytest.raises(NumericalError, match=r"^update 0: no update applied in the whole run: every delivered update "
                                             r"was non-finite and dropped \(4 device-updates, from devices 4, 5, 6, 7\)"):
        run(tmp_path, NAN_MODEL, DROP, 'policy.name="fedbuff"', "policy.buffer_size=4", "policy.duration_s=15",
            "fleet.classes[0].speed_flops=1e3", "fleet.classes[1].speed_flops=1e3", "run.rounds=100")
    assert _status(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize("policy", [FEDBUFF, FEDASYNC])
def test_an_asynchronous_run_that_ends_diverged_fails(tmp_path, policy):
    """run.rounds = 2 server updates at lr 1e6: too few for the streak; the final test loss decides."""
    with pytest.raises(NumericalError, match=r"^update 1: training diverged: the final model's test loss is \S+, "
                                             r"above \S+ \(training.divergence_factor 10 x \S+, the first update's"):
        run(tmp_path, *policy, "run.rounds=2", "training.lr=1e6", 'model.dtype="float64"')
    assert _status(tmp_path / "run")["status"] == "failed"


def test_a_nan_model_stops_naming_the_round_and_every_device(tmp_path):
    with pytest.raises(NumericalError, match=r"^round 0: non-finite loss or gradient in devices 0, 1, 2, 3, 4, 5, 6, "
                                             r"7 \(.*\); lower training.lr, or set training.on_nonfinite"):
        run(tmp_path, NAN_MODEL, "policy.deadline_s=1000")


# -- dropped devices: the run goes on and says so -----------------------------------------------------

def test_synchronous_drop_completes_with_warnings(tmp_path):
    scn, comp = _poisoned(DROP, "policy.deadline_s=1000")
    server, error = _serve(tmp_path, scn, comp)
    assert error is None
    assert server.warnings() == {
        "nonfinite_dropped": 3, "nonfinite_rounds": 3, "nonfinite_first_round": 0, "nonfinite_last_round": 2,
        "nonfinite_devices": [3], "nonfinite_device_count": 1, "updates_applied": 3,
        "messages": ['3 device-update(s) with NaN/Inf dropped (training.on_nonfinite = "drop") in 3 round(s) '
                     '(rounds 0-2), from device 3'],
    }
    json.dumps(server.warnings())               # status.json takes it as is


@pytest.mark.parametrize("policy", [FEDBUFF, FEDASYNC])
def test_asynchronous_drop_records_the_devices_and_goes_on(tmp_path, policy):
    """Device 5 (a fast one) has NaN data: each of its updates is dropped, the others applied."""
    scn, comp = _poisoned(DROP, *policy, device=5)
    server, error = _serve(tmp_path, scn, comp)
    assert error is None
    dev = table(tmp_path, "devices")
    statuses = {(d, s) for d, s in zip(dev["device"], dev["status"])}
    assert "nonfinite" in {s for d, s in statuses if d == 5}
    assert "complete" not in {s for d, s in statuses if d == 5}     # its last job may be stopped: "nothing"
    assert "nonfinite" not in {s for d, s in statuses if d != 5}
    dropped = sum(1 for d, s in zip(dev["device"], dev["status"]) if s == "nonfinite")
    rounds = table(tmp_path, "rounds")
    updates = [p for p in rounds["participants"] if p > 0]
    assert dropped >= 2 and len(updates) >= 5 and server.current_round == len(updates)
    assert all(math.isfinite(x) for x in rounds["train_loss"] if x is not None)
    assert all(bool(torch.isfinite(p).all()) for p in server.model.parameters())
    warnings = server.warnings()
    assert warnings["nonfinite_dropped"] == dropped and warnings["nonfinite_devices"] == [5]
    assert warnings["updates_applied"] == len(updates)
    assert warnings["messages"][0].startswith(f"{dropped} device-update(s) with NaN/Inf dropped")
    assert " update(s) (update" in warnings["messages"][0]


def test_fedbuff_applies_the_mean_of_the_finite_updates(tmp_path):
    """A buffer of 3 holding one update of device 5 (NaN data) applies the other 2."""
    scn, comp = _poisoned(DROP, *FEDBUFF, device=5)
    server, error = _serve(tmp_path, scn, comp)
    assert error is None
    rounds = table(tmp_path, "rounds")
    dev = table(tmp_path, "devices")
    steps = [(r, p) for r, p in zip(rounds["round"], rounds["participants"]) if p > 0]
    hit = {r for r, s, d in zip(dev["round"], dev["status"], dev["device"]) if s == "nonfinite"}
    assert hit and all(p == 2 for r, p in steps if r in hit)      # K = 3 minus the dropped one
    assert all(p == 3 for r, p in steps if r not in hit)


@pytest.mark.parametrize("policy", [FEDBUFF, FEDASYNC])
def test_asynchronous_stop_names_the_update_and_the_device(tmp_path, policy):
    from fedsim.run import run_scenario

    scn, comp = _poisoned(*policy, device=5)
    with pytest.raises(NumericalError, match=r"^update \d+: non-finite loss or gradient in device 5 \(1 update\(s\) "
                                             r"of the buffer, computed at model version \d+\).*training.on_nonfinite"):
        run_scenario(scn, tmp_path / "r", components=comp)
    assert _status(tmp_path / "r")["status"] == "failed"


def test_an_aggregate_that_overflows_stops_even_with_drop(tmp_path, monkeypatch):
    """Every device finite alone, their aggregate not: nobody to drop, the run stops and names them."""
    import fedsim.policies.salf as salf

    real = salf.layerwise_fedsgd

    def overflow(inputs, grads, depths, aggregation, depth_counts=None, weights=None):
        update = real(inputs, grads, depths, aggregation, depth_counts, weights)
        if int((depths > 0).sum()) > 1:                  # only the aggregate of several devices overflows
            update.grads["fc1.weight"][0, 0] = float("inf")
        return update

    monkeypatch.setattr(salf, "layerwise_fedsgd", overflow)
    _, error = _serve(tmp_path, scenario(DROP, "policy.deadline_s=1000", "run.rounds=1"))
    assert error is not None
    assert str(error).startswith("round 0: non-finite aggregate of devices 0, 1, 2, 3, 4, 5, 6, 7, although each "
                                 "one's update is finite alone")
    assert "the largest loss" in str(error) and "is device " in str(error)


def test_health_state_round_trips():
    from fedsim.sim.health import NumericalHealth

    health = NumericalHealth(10.0, 10)
    health.record(0, 2.0, [])
    health.record(1, 50.0, [4])
    other = NumericalHealth(10.0, 10)
    other.restore(json.loads(json.dumps(health.state())))
    assert other.state() == health.state() and other.warnings() == health.warnings()
    with pytest.raises(NumericalError, match=r"^rounds 1-3: training diverged"):
        for r in (2, 3):
            other.record(r, 60.0, [])
    assert np.isclose(other.bound, 10 * math.log(10))


def test_checkpoint_carries_the_divergence_rule_state(tmp_path):
    """A resumed run keeps counting its streak and its dropped updates from where the checkpoint was."""
    from fedsim.sim.build import build_components
    from fedsim.output.checkpoint import load_checkpoint, restore_server, save_checkpoint
    from fedsim.sim.server import Server
    from fedsim.output.trace import TraceWriter

    scn = scenario()
    comp = build_components(scn)
    parts = (scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset)
    server = Server(*parts, TraceWriter(tmp_path, {}))
    server.health.record(0, 2.0, [])
    server.health.record(1, 50.0, [4, 6])
    save_checkpoint(tmp_path, server, server.trace, scn, None)
    fresh = Server(*parts, TraceWriter(tmp_path / "x", {}) if (tmp_path / "x").mkdir() is None else None)
    assert fresh.health.state() != server.health.state()
    restore_server(fresh, load_checkpoint(tmp_path))
    assert fresh.health.state() == server.health.state()
    assert fresh.health.warnings() == server.health.warnings() and fresh.health.warnings()["nonfinite_dropped"] == 2
