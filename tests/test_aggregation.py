"""The aggregated update of one round against the naive float64 per-device oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from conftest import run, scenario, table


def _setup(granularity: str, dtype: str):
    from fedsim.sim.build import build_components
    from fedsim.learn.grads import GradientEngine

    comp = build_components(scenario(f'model.granularity="{granularity}"', f'model.dtype="{dtype}"',
                                     "fleet.classes[0].count=6"))
    rng = np.random.default_rng(5)
    n = comp.fleet.n_devices
    batches = [comp.partition.sample_batch(d, 8, rng) for d in range(n)]
    engine = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train)
    return comp, batches, engine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("granularity", ["module", "tensor"])
@pytest.mark.parametrize("aggregation", ["mean", "all", "unbiased"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_salf_update_matches_oracle(granularity, aggregation, dtype, tol):
    from fedsim.policies import Aggregation
    from fedsim.policies.salf import Salf

    comp, batches, engine = _setup(granularity, dtype)
    L = comp.profile.n_layers
    n = len(batches)
    depths = np.array([(i * 3) % (L + 1) for i in range(n)])   # every depth from 0 to L occurs
    assert set(depths.tolist()) == set(range(L + 1))
    # earlier rounds too, mostly shallow ones: every layer's unbiased factor differs from 1 by more than `tol`
    history = np.bincount(depths, minlength=L + 1) + 4 * 2 ** np.arange(L + 1)[::-1]
    inputs = oracle.round_inputs(comp.profile, depths, batches, history)
    upd = Salf(deadline_s=1.0, aggregation=Aggregation(aggregation)).aggregate(inputs, engine)

    scales = oracle.unbiased_scales(history, n) if aggregation == "unbiased" else None
    if scales is not None:
        assert min(scales) - 1.0 > 10 * tol
    expect = oracle.layerwise_update(comp.model, comp.profile, engine.x, engine.y, batches, depths,
                                     divisor="participants" if aggregation == "all" else "count", scales=scales)
    assert upd.contributors.tolist() == [int((depths >= L - l).sum()) for l in range(L)]
    for name, ref in expect.items():
        if ref is None:
            assert upd.grads[name] is None
        else:
            assert _rel(upd.grads[name], ref) < tol, name


def test_drop_counts_only_complete_devices():
    from fedsim.policies.drop import Drop

    comp, batches, engine = _setup("module", "float64")
    L = comp.profile.n_layers
    depths = np.array([L, 1, L, 0, 2, L, 1, L, 0, L][: len(batches)])
    inputs = oracle.round_inputs(comp.profile, depths, batches)
    upd = Drop(deadline_s=1.0).aggregate(inputs, engine)
    full = np.where(depths == L, L, 0)
    expect = oracle.layerwise_update(comp.model, comp.profile, engine.x, engine.y, batches, full)
    for name, ref in expect.items():
        assert _rel(upd.grads[name], ref) < 1e-12


def test_unbiased_scale_formula():
    from fedsim.learn.aggregate import miss_probabilities, unbiased_scales

    # 3 layers; depths seen: 0 once, 1 twice, 3 once -> P(miss layer 2) = 1/4, layer 1 = 3/4, layer 0 = 3/4
    p = miss_probabilities(np.array([1, 2, 0, 1]))
    assert p.tolist() == [0.75, 0.75, 0.25]
    assert unbiased_scales(p, 2).tolist() == pytest.approx([1 / (1 - 0.75**2), 1 / (1 - 0.75**2), 1 / (1 - 0.0625)])


def test_end_to_end_round_equals_oracle(tmp_path):
    """One simulated round in float64: the model written to model.pt is w - lr * oracle update."""
    from fedsim.sim.build import build_components
    from fedsim.sim.server import round_rng

    overrides = ['model.dtype="float64"', "run.rounds=1", "training.momentum=0.0", "policy.deadline_s=0.05"]
    out = run(tmp_path, *overrides)
    dev = table(out, "devices")
    depths = np.array(dev["depth"])
    assert 0 < depths.sum() < 3 * len(depths), "the round must mix stragglers and finishers"
    comp = build_components(scenario(*overrides))
    rng = round_rng(3, 0)
    batches = [comp.partition.sample_batch(d, 8, rng) for d in range(comp.fleet.n_devices)]
    expect = oracle.layerwise_update(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train,
                                     batches, depths)
    final = torch.load(out / "model.pt")
    for name, p in comp.model.named_parameters():
        want = p.detach() if expect[name] is None else p.detach() - 0.1 * expect[name]
        assert torch.allclose(final[name], want, rtol=0, atol=1e-12), name


def _model(out):
    return torch.load(out / "model.pt")


def test_long_deadline_salf_drop_wait_identical(tmp_path):
    runs = {p: run(tmp_path, f'policy.name="{p}"', "policy.deadline_s=1000", name=p) for p in ("salf", "drop", "wait")}
    models = {p: _model(o) for p, o in runs.items()}
    for p in ("drop", "wait"):
        for k in models["salf"]:
            assert torch.equal(models["salf"][k], models[p][k])
    tables = {p: table(o, "rounds") for p, o in runs.items()}
    for p in ("drop", "wait"):
        a, b = dict(tables["salf"]), dict(tables[p])
        assert a.pop("policy") != b.pop("policy")
        assert a.pop("deadline_s") == [1000.0] * len(a["round"])
        assert b.pop("deadline_s") == ([None] * len(a["round"]) if p == "wait" else [1000.0] * len(a["round"]))
        assert a == b


def test_deadline_shorter_than_every_forward_leaves_model_unchanged(tmp_path):
    from fedsim.sim.build import build_components

    initial = {k: v.detach().clone() for k, v in build_components(scenario()).model.state_dict().items()}
    for p in ("salf", "drop"):
        out = run(tmp_path, f'policy.name="{p}"', "policy.deadline_s=1e-6", name=p)
        final = _model(out)
        assert all(torch.equal(final[k], initial[k]) for k in initial)
        assert table(out, "rounds")["contributors"][0] == [0, 0, 0]
