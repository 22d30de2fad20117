"""`training.lr_schedule`: the rate of each round (hand-computed), its validation, the rate the server and the
devices' local steps use in each round, trace.json, ADEL-FL's bound reading it, and resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import BASE_TOML, run, scenario
from fedsim.errors import ScenarioError
from test_resume_variants import _assert_identical, _straight_and_resumed


def test_rates_by_hand():
    t = scenario('training.lr_schedule={ kind = "inverse", a = 2, b = 4 }').training
    assert [t.lr_at(r, 3) for r in range(3)] == [0.1 * 2 / 4, 0.1 * 2 / 5, 0.1 * 2 / 6]
    t = scenario('training.lr_schedule={ kind = "inverse" }').training
    assert [t.lr_at(r, 3) for r in range(3)] == [0.1, 0.1 / 2, 0.1 / 3]
    t = scenario('training.lr_schedule={ kind = "step", every = 2, factor = 0.5 }').training
    assert [t.lr_at(r, 5) for r in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    t = scenario('training.lr_schedule={ kind = "cosine", min_lr = 0.02 }').training
    assert [t.lr_at(r, 4) for r in range(4)] == pytest.approx(
        [0.1, 0.02 + 0.08 * (1 + math.sqrt(0.5)) / 2, 0.06, 0.02 + 0.08 * (1 - math.sqrt(0.5)) / 2], abs=1e-15)
    assert scenario().training.lr_schedule is None
    assert scenario().training.lr_at(7, 10) == 0.1


@pytest.mark.parametrize("value, field, message", [
    ('{ kind = "linear" }', "training.lr_schedule.kind", "must be one of inverse, step, cosine"),
    ('{ kind = "inverse", b = 0 }', "training.lr_schedule.b", "must be > 0, got 0"),
    ('{ kind = "inverse", a = -1 }', "training.lr_schedule.a", "must be > 0, got -1"),
    ('{ kind = "step", factor = 0.5 }', "training.lr_schedule.every", "missing required field"),
    ('{ kind = "step", every = 0, factor = 0.5 }', "training.lr_schedule.every", "must be a positive integer"),
    ('{ kind = "step", every = 2, factor = 1.5 }', "training.lr_schedule.factor", "must be <= 1, got 1.5"),
    ('{ kind = "cosine", min_lr = 0.2 }', "training.lr_schedule.min_lr", "must be <= 0.1, got 0.2"),
    ('{ kind = "inverse", every = 2 }', "training.lr_schedule.every", "unknown field"),
    ('"inverse"', "training.lr_schedule", "must be a table"),
])
def test_bad_schedules_name_field_and_value(value, field, message):
    with pytest.raises(ScenarioError) as err:
        scenario(f"training.lr_schedule={value}")
    assert err.value.field == field and message in err.value.message


def test_asynchronous_policies_refuse_a_schedule():
    with pytest.raises(ScenarioError) as err:
        scenario('training.lr_schedule={ kind = "inverse" }', 'policy.name="fedasync"', "policy.duration_s=1",
                 "policy.deadline_s=0.1")
    assert err.value.field == "training.lr_schedule" and "asynchronous" in err.value.message


def _record_rates(monkeypatch):
    """The optimizer's rate at every server step, and the local trainer's at every device's training."""
    from fedsim.learn.local import LocalTrainer

    steps, local = [], []
    original_step, original_train = torch.optim.SGD.step, LocalTrainer.train

    def step(self, *args, **kwargs):
        steps.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    def train(self, *args, **kwargs):
        local.append(self.lr)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(LocalTrainer, "train", train)
    return steps, local


def test_the_server_step_uses_each_rounds_rate(tmp_path, monkeypatch):
    steps, _ = _record_rates(monkeypatch)
    out = run(tmp_path, "run.rounds=4", 'training.lr_schedule={ kind = "inverse", a = 1, b = 2 }',
              "policy.deadline_s=10")
    assert steps == [0.1 / 2, 0.1 / 3, 0.1 / 4, 0.1 / 5]
    description = json.loads((out / "trace.json").read_text())
    assert description["lr_by_round"] == [0.1 / 2, 0.1 / 3, 0.1 / 4, 0.1 / 5]
    meta = pq.read_schema(out / "rounds.parquet").metadata
    assert json.loads(meta[b"training.lr_by_round"]) == description["lr_by_round"]


def test_local_steps_use_the_rounds_rate_too(tmp_path, monkeypatch):
    steps, local = _record_rates(monkeypatch)
    run(tmp_path, "run.rounds=3", 'policy.name="wait"', "training.local_steps=2",
        'training.lr_schedule={ kind = "step", every = 1, factor = 0.5 }')
    assert steps == [0.1, 0.05, 0.025]
    assert local == [0.1] * 8 + [0.05] * 8 + [0.025] * 8       # 8 devices, every round


def test_no_schedule_writes_no_rates_and_a_flat_schedule_changes_nothing(tmp_path):
    plain = run(tmp_path, name="plain")
    flat = run(tmp_path, 'training.lr_schedule={ kind = "step", every = 1, factor = 1 }', name="flat")
    assert "lr_by_round" not in json.loads((plain / "trace.json").read_text())
    for name in ("events", "rounds", "devices"):         # the metadata differ (the scenario's text)
        assert pq.read_table(plain / f"{name}.parquet").equals(pq.read_table(flat / f"{name}.parquet")), name
    a, b = torch.load(plain / "model.pt"), torch.load(flat / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_schedule(tmp_path):
    straight, resumed, _ = _straight_and_resumed(tmp_path, 'training.lr_schedule={ kind = "inverse", b = 1 }',
                                                 "policy.deadline_s=10")
    _assert_identical(straight, resumed)
    plain = run(tmp_path, "run.rounds=6", "policy.deadline_s=10", name="plain")
    a, b = torch.load(straight / "model.pt"), torch.load(plain / "model.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)          # the schedule changed the model


def test_adel_bound_steps_follow_the_schedule():
    from fedsim.policies.adel_bound import step_weights

    kappa = 1.0 / 0.3
    gamma = max(8 * kappa, 1) - 1
    rounds = 6
    inverse = np.array([1.0 / (r + 1 + gamma) for r in range(rounds)]) * (1 + gamma)   # b = 1 + gamma: eta_t / eta_1
    np.testing.assert_allclose(step_weights(rounds, kappa, inverse), step_weights(rounds, kappa), rtol=1e-14)
    shape = np.array([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    a = shape / (1 + gamma)
    later = [np.prod(1 - a[t + 1:]) for t in range(rounds)]
    np.testing.assert_allclose(step_weights(rounds, kappa, shape), a * a * np.array(later), rtol=1e-14)


def test_adel_deadlines_read_the_schedule():
    from fedsim.policies.adel import AdelSchedule
    from fedsim.policies.sync import RunContext
    from fedsim.sim.build import build_components

    adel = 'policy.deadline_s={ optimize = "adel", total_s = 0.6, min_s = 0.02, samples = 256 }'
    constant = scenario("run.rounds=6", "fleet.participants=2", adel)
    stepped = scenario("run.rounds=6", "fleet.participants=2", adel,
                       'training.lr_schedule={ kind = "step", every = 3, factor = 0.1 }')

    def deadlines(scn):
        comp = build_components(scn)
        assert isinstance(scn.policy.deadline_s, AdelSchedule)
        return scn.policy.schedule(RunContext(scn, comp.fleet, comp.profile, None))

    a, b = deadlines(constant), deadlines(stepped)
    assert sum(b) <= 0.6 and min(b) >= 0.02
    assert a != b
    assert max(b[3:]) < min(b[:3])      # the last rounds weigh less when their steps are a tenth
