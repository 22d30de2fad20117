"""Policies against naive float64 oracles on tiny fleets, and the equivalences the literature implies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import BASE_TOML, run, scenario, table

# tiny model (tests.helper_models:tiny): one forward+backward of one sample = 592 + 704 = 1296 FLOPs.
# Download: 0.5 s latency + 20096 bits (float64) at 20096 bit/s = 1.5 s. Speeds 1296, 648, 2592 FLOP/s give
# 1, 2 and 0.5 s per sample.
TINY = """
[run]
name = "tiny"
seed = 0
rounds = 1

[model]
name = "tests.helper_models:tiny"
dtype = "float64"

[data]
name = "synthetic"
samples_per_device = 16
test_samples_per_device = 4

[training]
batch_size = 4
lr = 0.25
local_steps = 1
""" + "".join(f"""
[[fleet.classes]]
name = "c{i}"
count = 1
speed_flops = {speed}
downlink_bps = 20096
uplink_bps = 1e9
latency_s = 0.5
""" for i, speed in enumerate((1296, 648, 2592))) + """
[policy]
name = "partial"
deadline_s = 6.0
"""


def _initial_and_batches(text, *overrides):
    from fedsim.sim.build import build_components
    from fedsim.sim.server import round_rng

    scn = scenario(*overrides, text=text)
    comp = build_components(scn)
    rng = round_rng(scn.run.seed, 0)
    steps = scn.training.local_steps
    batches = [[comp.partition.sample_batch(d, scn.training.batch_size, rng) for _ in range(steps)]
                for d in range(comp.fleet.n_devices)]
    return comp, batches


def _local_sgd(model, x, y, batches, lr):
    """Naive device: a model copy, plain SGD steps, float64."""
    m = copy.deepcopy(model).double()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(m(x[torch.from_numpy(idx)].double()), y[torch.from_numpy(idx)]).backward()
        opt.step()
    return {n: p.detach() for n, p in m.named_parameters()}


def _expect_fedavg(comp, batches_per_device, weights):
    """New global model = weighted mean of the local models (server SGD, momentum 0, with lr cancelling)."""
    x, y = comp.dataset.x_train, comp.dataset.y_train
    locals_ = [_local_sgd(comp.model, x, y, b, 0.25) for b in batches_per_device]
    total = sum(weights)
    return {n: sum(w * l[n] for w, l in zip(weights, locals_)) / total for n in locals_[0]}


def _assert_model(out, expect, tol=1e-12):
    final = torch.load(out / "model.pt")
    for n, v in expect.items():
        assert torch.allclose(final[n], v, rtol=0, atol=tol), n


def test_partial_one_step_processes_what_fits(tmp_path):
    out = run(tmp_path, text=TINY)
    dev = table(out, "devices")
    # 4.5 s after the download: 1 s/sample -> 4 (whole batch), 2 s/sample -> 2, 0.5 s/sample -> 4
    assert dev["samples"] == [4, 2, 4]
    assert dev["status"] == ["complete"] * 3
    comp, batches = _initial_and_batches(TINY)
    expect = _expect_fedavg(comp, [[batches[0][0]], [batches[1][0][:2]], [batches[2][0]]], [4, 2, 4])
    _assert_model(out, expect)


def test_partial_several_steps_as_many_as_fit(tmp_path):
    overrides = ["training.local_steps=2"]
    out = run(tmp_path, *overrides, text=TINY)
    dev = table(out, "devices")
    assert dev["samples"] == [4, 2, 4]
    comp, batches = _initial_and_batches(TINY, *overrides)
    # steps that fit in 4.5 s: 4 s/step -> 1, none whole -> 1 step of 2 samples, 2 s/step -> 2
    expect = _expect_fedavg(comp, [batches[0][:1], [batches[1][0][:2]], batches[2]], [4, 2, 8])
    _assert_model(out, expect)
    ends = {d: t for r, d, e, t in zip(*(table(out, "events")[k] for k in ("round", "device", "event", "time_s")))
            if e == "backward_end" and d >= 0 for _ in [0]}
    assert ends[2] == pytest.approx(1.5 + 4.0) and ends[0] == pytest.approx(1.5 + 4.0)


def test_wait_with_local_steps_is_fedavg(tmp_path):
    overrides = ['policy.name="wait"', "training.local_steps=3"]
    out = run(tmp_path, *overrides, text=TINY)
    comp, batches = _initial_and_batches(TINY, *overrides)
    _assert_model(out, _expect_fedavg(comp, batches, [1, 1, 1]))
    # the slowest device: 1.5 s download + 3 steps x 4 samples x 2 s
    assert table(out, "rounds")["end_s"] == [pytest.approx(1.5 + 24.0)]


def test_overselect_keeps_the_first_k(tmp_path):
    overrides = ['policy.name="overselect"', "policy.k=2", "policy.fraction=1.5"]
    out = run(tmp_path, *overrides, text=TINY)
    # 3 selected; finishing times 1.5 + 4 x (1, 2, 0.5) s: device 2 at 3.5, device 0 at 5.5, device 1 stopped
    assert table(out, "rounds")["end_s"] == [5.5]
    dev = table(out, "devices")
    assert dev["status"][1] != "complete"
    events = table(out, "events")
    assert ("stopped" in events["event"]) and max(events["time_s"]) == 5.5
    comp, batches = _initial_and_batches(TINY, *overrides)
    _assert_model(out, _expect_fedavg(comp, [batches[0], batches[2]], [1, 1]))


def test_heterofl_entrywise_average_of_submodels(tmp_path):
    text = BASE_TOML.replace('[policy]\nname = "salf"', '[policy]\nname = "heterofl"\nwidths = { slow = 0.5 }')
    overrides = ["run.rounds=1", 'model.dtype="float64"', "training.momentum=0.0", "policy.deadline_s=1000"]
    out = run(tmp_path, *overrides, text=text)
    from fedsim.sim.build import build_components
    from fedsim.learn.models import build_model
    from fedsim.sim.server import round_rng

    scn = scenario(*overrides, text=text)
    comp = build_components(scn)
    rng = round_rng(scn.run.seed, 0)
    batches = [comp.partition.sample_batch(d, 8, rng) for d in range(8)]
    x, y = comp.dataset.x_train, comp.dataset.y_train
    global_params = {n: p.detach().clone() for n, p in comp.model.named_parameters()}
    sub = build_model("mlp", comp.dataset.input_shape, 10, generator=torch.Generator(), width=0.5, dtype=torch.float64)
    total = {n: torch.zeros_like(p) for n, p in global_params.items()}
    count = {n: torch.zeros_like(p) for n, p in global_params.items()}
    for d in range(8):
        net = copy.deepcopy(sub if d < 4 else comp.model)    # classes: slow (0-3) at width 0.5, fast at 1
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(global_params[n][tuple(slice(0, s) for s in p.shape)])
        net.zero_grad()
        F.cross_entropy(net(x[torch.from_numpy(batches[d])].double()), y[torch.from_numpy(batches[d])]).backward()
        for n, p in net.named_parameters():
            idx = tuple(slice(0, s) for s in p.shape)
            total[n][idx] += p.grad
            count[n][idx] += 1
    expect = {n: global_params[n] - 0.1 * total[n] / count[n] for n in total}
    _assert_model(out, expect)
    assert table(out, "devices")["depth"] == [3] * 8
    # a slow device moves fewer bytes: the half-width MLP
    ev = table(out, "events")
    sizes = {d: b for d, e, b in zip(ev["device"], ev["event"], ev["bytes"]) if e == "download_end"}
    assert sizes[0] < sizes[4]


def _models_equal(a, b, tol=0.0):
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return all(torch.allclose(ma[k], mb[k], rtol=0, atol=tol) for k in ma)


@pytest.mark.parametrize("policy,extra", [
    ("heterofl", ["policy.widths={ slow = 1.0, fast = 1.0 }", "policy.deadline_s=1000"]),
    ("overselect", ["policy.fraction=1.0"]),
    ("partial", ["policy.deadline_s=1000"]),
])
def test_degenerate_settings_equal_wait(tmp_path, policy, extra):
    common = ['model.dtype="float64"']
    wait = run(tmp_path, *common, 'policy.name="wait"', name="wait")
    other = run(tmp_path, *common, f'policy.name="{policy}"', *extra, name=policy)
    assert _models_equal(wait, other, tol=1e-12)
    a, b = table(wait, "rounds"), table(other, "rounds")
    assert a["end_s"] == b["end_s"] and a["contributors"] == b["contributors"]


def test_salf_rejects_several_local_steps(tmp_path):
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match="local_steps"):
        scenario("training.local_steps=2")


def test_heterofl_rejects_unknown_class_and_factory_models():
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match="policy.widths.tablet"):
        scenario('policy.name="heterofl"', "policy.widths={ tablet = 0.5 }")
    with pytest.raises(ScenarioError, match="heterofl needs"):
        scenario('policy.name="heterofl"', text=TINY)
