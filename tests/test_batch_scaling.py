"""Per-device batch sizes: ADEL-FL's batch scaling computed by hand (batches and simulated timestamps), the
mini-batches following the plan, batch-weighted layer-wise aggregation against the float64 oracle, and the
fields' validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from conftest import run, scenario, table
from fedsim.errors import ScenarioError
from test_timing import TEXT, events_of

# test_timing's fleet: per sample 592 forward + 704 backward FLOPs; devices a, b, c at 32, 64, 16 FLOP/s, so one
# sample's forward and backward take s = 40.5, 20.25, 81 s; the download B = 1.5 s. Each device holds 8 samples.
SCALED = ["data.samples_per_device=8", "policy.deadline_s=300", "policy.batch_scaling=true"]


def _samples(out, round_=0):
    dev = table(out, "devices")
    rows = zip(dev["device"], dev["samples"], dev["round"])
    return [s for _, s in sorted((d, s) for d, s, r in rows if r == round_)]


def test_batches_by_hand_and_the_timing_follows_them(tmp_path):
    # m = 0.5: round(0.5 (300 - 1.5) / s) = round(3.685) = 4, round(7.370) = 7, round(1.843) = 2
    out = run(tmp_path, *SCALED, "policy.batch_fraction=0.5", text=TEXT)
    assert _samples(out, 0) == _samples(out, 1) == [4, 7, 2]
    # a: forward 4 x 592 / 32 = 74 s, backward fc3 4 x 160 / 32 = 20, fc2 8, fc1 60
    # b: 7 x 592 / 64 = 64.75, 17.5, 7, 52.5;  c: 2 x 592 / 16 = 74, 20, 8, 60
    expected = {
        (-1, "round_start", -1, 0.0),
        (0, "download_start", -1, 0.0), (0, "download_end", -1, 1.5), (0, "forward_end", -1, 75.5),
        (0, "backward_end", 2, 95.5), (0, "backward_end", 1, 103.5), (0, "backward_end", 0, 163.5),
        (1, "download_start", -1, 0.0), (1, "download_end", -1, 1.5), (1, "forward_end", -1, 66.25),
        (1, "backward_end", 2, 83.75), (1, "backward_end", 1, 90.75), (1, "backward_end", 0, 143.25),
        (2, "download_start", -1, 0.0), (2, "download_end", -1, 1.5), (2, "forward_end", -1, 75.5),
        (2, "backward_end", 2, 95.5), (2, "backward_end", 1, 103.5), (2, "backward_end", 0, 163.5),
        (-1, "round_end", -1, 163.5),
    }
    assert sorted(events_of(out, 0)) == sorted(expected)
    assert table(out, "rounds")["policy"][0] == "salf(mean, batches x0.5, by samples)"


def test_full_fraction_is_capped_by_the_data_held(tmp_path):
    # m = 1: round(7.370) = 7, round(14.74) = 15 > the 8 samples device b holds, round(3.685) = 4
    out = run(tmp_path, *SCALED, text=TEXT)
    assert _samples(out) == [7, 8, 4]
    got = {(d, e, l): t for d, e, l, t in events_of(out, 0)}
    assert got[(0, "forward_end", -1)] == 1.5 + 7 * 592 / 32 and got[(0, "backward_end", 0)] == 1.5 + 7 * 1296 / 32
    assert got[(1, "backward_end", 0)] == 1.5 + 8 * 1296 / 64


@pytest.mark.parametrize("deadline", [30, 1])
def test_a_device_without_time_still_plans_one_sample(tmp_path, deadline):
    # deadline 30: round(28.5 / 40.5) = 1, round(28.5 / 20.25) = 1, round(28.5 / 81) = 0 -> 1; deadline 1 < B: 0 -> 1
    out = run(tmp_path, *SCALED, f"policy.deadline_s={deadline}", "run.rounds=1", text=TEXT)
    assert _samples(out) == [1, 1, 1]


def test_the_mini_batches_have_the_planned_sizes_and_come_from_the_devices_own_data(tmp_path, monkeypatch):
    from fedsim.learn.grads import GradientEngine

    seen = []
    original = GradientEngine.layer_sums

    def spy(self, batches, depths, *rest):
        seen.append([np.array(b) for b in batches])
        return original(self, batches, depths, *rest)

    monkeypatch.setattr(GradientEngine, "layer_sums", spy)
    scn = scenario(*SCALED, "policy.batch_fraction=0.5", "run.rounds=2", text=TEXT)
    from fedsim.run import run_scenario
    from fedsim.sim.build import build_components

    comp = build_components(scn)
    run_scenario(scn, tmp_path / "r", components=comp)
    assert [[len(b) for b in batches] for batches in seen] == [[4, 7, 2], [4, 7, 2]]
    for batches in seen:
        for device, b in enumerate(batches):
            own = comp.partition.indices[comp.partition.offsets[device]:comp.partition.offsets[device + 1]]
            assert len(set(b.tolist())) == len(b) and set(b.tolist()) <= set(own.tolist())
    assert any(not np.array_equal(a, b) for a, b in zip(seen[0], seen[1]))     # drawn anew each round


def test_a_plan_larger_than_the_data_held_is_an_error():
    from fedsim.errors import FedsimError
    from fedsim.learn.data import Partition
    from fedsim.policies import RoundContext
    from fedsim.sim.round_batches import planned_batches
    from fedsim.spec.scenario import UploadMode

    partition = Partition.blocks(3, 4)
    ctx = RoundContext(0, None, None, np.array([0, 2]), np.ones(2), np.array([2, 2]), np.ones(2, dtype=np.int64),
                       UploadMode.IDEAL, 2, None, None, held=np.array([4, 4]))
    drawn = [[np.array([1, 0])], [np.array([9, 8])]]
    assert planned_batches(partition, 0, 0, np.array([2, 2]), ctx, drawn, "p") is drawn
    smaller = planned_batches(partition, 0, 0, np.array([1, 2]), ctx, drawn, "p")
    assert [b[0].tolist() for b in smaller] == [[1], [9, 8]]
    larger = planned_batches(partition, 0, 0, np.array([2, 4]), ctx, drawn, "p")
    assert larger[0] is drawn[0] and sorted(larger[1][0].tolist()) == [8, 9, 10, 11]
    from fedsim.seeds import keyed_rng

    again = partition.sample_batches(np.array([2]), 4, 1, keyed_rng(0, "batch", 0))[0][0]
    assert larger[1][0].tolist() == again.tolist()          # round 0's `batch` stream
    with pytest.raises(FedsimError, match="planned a batch of 5 samples for device 2 in round 0, which holds 4"):
        planned_batches(partition, 0, 0, np.array([2, 5]), ctx, drawn, "p")


def _weighted_oracle(comp, engine, batches, depths, aggregation, scales=None):
    """Layer l: sum over devices reaching it of b_i g_i / sum of their b_i (all: / the b_i of every device)."""
    grads = oracle.per_device_grads(comp.model, engine.x, engine.y, batches)
    L = comp.profile.n_layers
    sizes = [len(b) for b in batches]
    update = {}
    for name, layer in comp.profile.layer_of_param().items():
        members = [i for i, d in enumerate(depths) if d >= L - layer]
        if not members:
            update[name] = None
            continue
        total = sum(sizes[i] * grads[i][name] for i in members)
        div = sum(sizes) if aggregation == "all" else sum(sizes[i] for i in members)
        update[name] = total / div * (1.0 if scales is None else float(scales[layer]))
    return update


@pytest.mark.parametrize("aggregation", ["mean", "all", "unbiased"])
@pytest.mark.parametrize("path", ["grouped", "vmap", "loop"])
def test_batch_weighted_aggregate_matches_the_oracle(aggregation, path):
    from fedsim.learn.grads import GradientEngine
    from fedsim.policies import Aggregation
    from fedsim.policies.salf import Salf
    from fedsim.sim.build import build_components

    comp = build_components(scenario('model.dtype="float64"', "fleet.classes[0].count=6"))
    rng = np.random.default_rng(7)
    n = comp.fleet.n_devices
    batches = [comp.partition.sample_batch(d, 1 + (3 * d) % 11, rng) for d in range(n)]
    assert len({len(b) for b in batches}) > 4
    engine = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train, path=path)
    L = comp.profile.n_layers
    depths = np.array([(i * 3) % (L + 1) for i in range(n)])
    history = np.bincount(depths, minlength=L + 1) + 4 * 2 ** np.arange(L + 1)[::-1]
    inputs = oracle.round_inputs(comp.profile, depths, batches, history)
    upd = Salf(deadline_s=1.0, aggregation=Aggregation(aggregation), weighting="samples").aggregate(inputs, engine)
    scales = oracle.unbiased_scales(history, n) if aggregation == "unbiased" else None
    expect = _weighted_oracle(comp, engine, batches, depths, aggregation, scales)
    unweighted = Salf(deadline_s=1.0, aggregation=Aggregation(aggregation)).aggregate(inputs, engine)
    assert upd.contributors.tolist() == [int((depths >= L - l).sum()) for l in range(L)]
    assert upd.train_loss == pytest.approx(unweighted.train_loss, rel=1e-12)    # the devices' mean loss
    for name, ref in expect.items():
        if ref is None:
            assert upd.grads[name] is None
            continue
        assert float((upd.grads[name] - ref).norm() / ref.norm()) < 1e-12, name
        assert float((unweighted.grads[name] - ref).norm() / ref.norm()) > 1e-6, name     # the weights matter


@pytest.mark.parametrize("aggregation", ["mean", "all", "unbiased"])
def test_equal_batches_weighted_is_the_unweighted_rule_bit_for_bit(aggregation):
    from fedsim.learn.grads import GradientEngine
    from fedsim.policies import Aggregation
    from fedsim.policies.salf import Salf
    from fedsim.sim.build import build_components

    comp = build_components(scenario("fleet.classes[0].count=6"))
    rng = np.random.default_rng(3)
    batches = [comp.partition.sample_batch(d, 8, rng) for d in range(comp.fleet.n_devices)]
    engine = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train)
    L = comp.profile.n_layers
    depths = np.array([(i * 3) % (L + 1) for i in range(len(batches))])
    inputs = oracle.round_inputs(comp.profile, depths, batches, np.bincount(depths, minlength=L + 1) + 3)
    a = Salf(deadline_s=1.0, aggregation=Aggregation(aggregation), weighting="samples").aggregate(inputs, engine)
    b = Salf(deadline_s=1.0, aggregation=Aggregation(aggregation)).aggregate(inputs, engine)
    for name in a.grads:
        assert (a.grads[name] is None and b.grads[name] is None) or torch.equal(a.grads[name], b.grads[name])


def test_salf_by_samples_with_equal_batches_writes_the_same_trace(tmp_path):
    import pyarrow.parquet as pq

    plain = run(tmp_path, name="plain")
    weighted = run(tmp_path, 'policy.weighting="samples"', name="weighted")
    for name in ("events", "devices"):
        assert pq.read_table(plain / f"{name}.parquet").equals(pq.read_table(weighted / f"{name}.parquet")), name
    a, b = torch.load(plain / "model.pt"), torch.load(weighted / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, field, message", [
    (["policy.batch_scaling=1"], "policy.batch_scaling", "must be true or false, got 1"),
    (["policy.batch_scaling=true", "policy.batch_fraction=0"], "policy.batch_fraction", "must be > 0, got 0"),
    (["policy.batch_scaling=true", "policy.batch_fraction=1.5"], "policy.batch_fraction", "must be <= 1, got 1.5"),
    (["policy.batch_fraction=0.5"], "policy.batch_fraction", "batch_scaling = false"),
    (['policy.weighting="batch"'], "policy.weighting", "must be one of devices, samples"),
])
def test_bad_fields_name_field_and_value(overrides, field, message):
    with pytest.raises(ScenarioError) as err:
        scenario(*overrides)
    assert err.value.field == field and message in err.value.message


def test_other_policies_name_batch_scaling_in_a_notice():
    scn = scenario('policy.name="drop"', "policy.batch_scaling=true")
    assert "policy.batch_scaling" in scn.ignored


def test_batch_scaling_with_an_adel_schedule_runs(tmp_path):
    out = run(tmp_path, "run.rounds=4", "fleet.participants=4", "policy.batch_scaling=true",
              'policy.deadline_s={ optimize = "adel", total_s = 0.6, min_s = 0.02, samples = 256 }')
    rounds = table(out, "rounds")
    assert sum(rounds["deadline_s"]) <= 0.6
    dev = table(out, "devices")
    assert len(set(dev["samples"])) > 1 and max(dev["samples"]) <= 40


def test_a_batch_scaled_run_resumes_identically(tmp_path):
    from test_resume_variants import _assert_identical, _straight_and_resumed

    straight, resumed, _ = _straight_and_resumed(tmp_path, "policy.batch_scaling=true", "policy.batch_fraction=0.9")
    assert len(set(table(straight, "devices")["samples"])) > 2
    _assert_identical(straight, resumed)
