"""Every gradient path against the naive float64 per-device oracle, under stragglers of every depth."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import oracle

PATHS = ["auto", "grouped", "vmap", "loop"]
TOL = {"float64": 1e-10, "float32": 1e-5}


class BNNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear: samples interact through the batch statistics in training mode."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def _model(name: str, dtype: torch.dtype):
    from fedsim.learn.models import build_model

    if name == "bn":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return BNNet().to(dtype)
    return build_model(name, (1, 28, 28), 10, generator=torch.Generator().manual_seed(1), dtype=dtype)


@functools.lru_cache(maxsize=None)
def _data(name: str, granularity: str, dtype_name: str, n_devices: int):
    """Profile, data, batches and depths of a case (shared by the tests: treat as read-only)."""
    from fedsim.learn.profile import Granularity, build_profile

    dtype = getattr(torch, dtype_name)
    profile = build_profile(_model(name, dtype), (1, 28, 28), Granularity(granularity))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 1, 28, 28, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (300,), generator=gen)
    rng = np.random.default_rng(3)
    sizes = [8] * n_devices
    sizes[1], sizes[4] = 5, 3                      # unequal batch sizes: per-sample weights differ
    batches = [rng.choice(300, s, replace=False) for s in sizes]
    L = profile.n_layers
    # every depth from 0 (delivered nothing) to L (delivered all), in a mixed order
    depths = rng.permutation(np.resize(np.arange(L + 1), n_devices))
    assert set(depths.tolist()) == set(range(L + 1))
    return profile, x, y, batches, depths


def _setup(name: str, granularity: str, dtype_name: str, n_devices: int = 9):
    """A fresh model (tests may change it) and the case's shared data."""
    return (_model(name, getattr(torch, dtype_name)), *_data(name, granularity, dtype_name, n_devices))


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """Relative error in norm; `floor` stands in for a reference that is zero up to rounding."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor))


_ORACLE: dict = {}


def _oracle_grads(model, x, y, batches):
    """oracle.per_device_grads, remembered per (model weights, data): the oracle is the slow part."""
    state = tuple(float(t.detach().double().sum()) for t in model.state_dict().values())   # weights and buffers
    key = (state, model.training, id(x), id(batches))
    if key not in _ORACLE:
        _ORACLE[key] = oracle.per_device_grads(model, x, y, batches)
    return _ORACLE[key]


def _oracle_losses(model, x, y, batches):
    """Each device's mini-batch mean loss, float64, on a copy of the model."""
    import torch.nn.functional as F

    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return [float(F.cross_entropy(m(x[torch.from_numpy(b)].double()), y[torch.from_numpy(b)])) for b in batches]


def _expected_sums(model, profile, x, y, batches, depths):
    L = profile.n_layers
    per_device = _oracle_grads(model, x, y, batches)
    sums = {}
    for name, layer in profile.layer_of_param().items():
        members = [i for i, d in enumerate(depths) if d >= L - layer]
        if members:
            sums[name] = sum(per_device[i][name] for i in members)
    return sums, per_device


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("granularity", ["module", "tensor"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_layer_sums_match_oracle(name, granularity, dtype, path):
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup(name, granularity, dtype)
    engine = GradientEngine(model, profile, x, y, path=path)
    got = engine.layer_sums(batches, depths)
    expect, _ = _expected_sums(model, profile, x, y, batches, depths)
    L = profile.n_layers
    assert got.counts.tolist() == [int((depths >= L - l).sum()) for l in range(L)]
    assert set(got.sums) == set(expect)
    for key, ref in expect.items():
        assert got.sums[key].dtype == getattr(torch, dtype)
        assert _rel(got.sums[key], ref) < TOL[dtype], key
    losses = _oracle_losses(model, x, y, batches)
    live = np.flatnonzero(depths)
    assert got.n_devices == len(live)
    assert got.mean_loss == pytest.approx(sum(losses[i] for i in live) / len(live), rel=TOL[dtype])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("path", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_per_device_grads_match_oracle(name, path):
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup(name, "module", "float64")
    engine = GradientEngine(model, profile, x, y, path=path)
    got = engine.per_device(batches, depths)
    _, per_device = _expected_sums(model, profile, x, y, batches, depths)
    losses = _oracle_losses(model, x, y, batches)
    L = profile.n_layers
    layer_of = profile.layer_of_param()
    for key, stacked in got.grads.items():
        assert stacked.shape == (len(batches), *dict(model.named_parameters())[key].shape)
        for i, d in enumerate(depths):
            if d >= L - layer_of[key]:
                assert _rel(stacked[i], per_device[i][key]) < 1e-10, (key, i)
            else:
                assert torch.count_nonzero(stacked[i]) == 0, (key, i)
    for i, d in enumerate(depths):
        if d == 0:
            assert math.isnan(got.losses[i])
        else:
            assert got.losses[i] == pytest.approx(losses[i], rel=1e-12)
    assert set(engine.per_device_grads(batches, depths)) == set(got.grads)


def test_auto_policy():
    from fedsim.learn.grads import GradPath, batch_coupled_modules, resolve_paths

    assert resolve_paths(_model("mlp", torch.float32)) == (GradPath.GROUPED, GradPath.VMAP)
    assert resolve_paths(_model("cnn", torch.float32)) == (GradPath.GROUPED, GradPath.VMAP)
    bn = _model("bn", torch.float32)
    assert batch_coupled_modules(bn) == ["bn"]
    assert resolve_paths(bn) == (GradPath.LOOP, GradPath.LOOP)
    bn.eval()                                       # running statistics: each sample on its own again
    assert batch_coupled_modules(bn) == []
    assert resolve_paths(bn) == (GradPath.GROUPED, GradPath.VMAP)
    assert resolve_paths(_model("mlp", torch.float32), "loop") == (GradPath.LOOP, GradPath.LOOP)
    assert resolve_paths(_model("mlp", torch.float32), "vmap") == (GradPath.VMAP, GradPath.VMAP)


def test_running_stats_module_in_training_mode_is_coupled():
    from fedsim.learn.grads import batch_coupled_modules

    class Tracker(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))

        def forward(self, x):
            return x

    net = nn.Sequential(nn.Linear(3, 3), Tracker())
    assert batch_coupled_modules(net) == ["1"]
    net.eval()
    assert batch_coupled_modules(net) == []
    assert batch_coupled_modules(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)).eval()) == ["0"]


@pytest.mark.parametrize("path", ["auto", "loop", "vmap"])
def test_batchnorm_exact_and_buffers_untouched(path):
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup("bn", "module", "float64")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = GradientEngine(model, profile, x, y, path=path)
    got = engine.layer_sums(batches, depths)
    expect, per_device = _expected_sums(model, profile, x, y, batches, depths)
    # fc1.bias feeds BatchNorm, which removes the mean: its true gradient is 0, computed as rounding noise
    floor = 1e-3
    for key, ref in expect.items():
        assert _rel(got.sums[key], ref, floor) < 1e-10, key
    pd = engine.per_device_grads(batches, depths)
    for i, d in enumerate(depths):
        if d == profile.n_layers:
            for key in pd:
                assert _rel(pd[key][i], per_device[i][key], floor) < 1e-10, (key, i)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_grouped_refuses_batch_coupled_model():
    from fedsim.errors import FedsimError
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, _, _ = _setup("bn", "module", "float64")
    with pytest.raises(FedsimError, match="grouped.*bn"):
        GradientEngine(model, profile, x, y, path="grouped")


def test_grouped_ignores_batchnorm_in_eval_mode():
    """BatchNorm with running statistics in eval mode is per-sample: grouped is exact."""
    from fedsim.learn.grads import GradientEngine, GradPath

    model, profile, x, y, batches, depths = _setup("bn", "module", "float64")
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    engine = GradientEngine(model, profile, x, y)
    assert engine.path is GradPath.GROUPED
    got = engine.layer_sums(batches, depths)
    expect, _ = _expected_sums(model, profile, x, y, batches, depths)
    for key, ref in expect.items():
        assert _rel(got.sums[key], ref, 1e-3) < 1e-10, key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("poison", ["input", "weight"])
def test_non_finite_loss_raises(path, poison):
    from fedsim.errors import NumericalError
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup("mlp", "module", "float32")
    x = x.clone()
    if poison == "input":
        live = int(np.flatnonzero(depths)[0])
        x[batches[live][0]] = float("inf")
    else:
        with torch.no_grad():
            model.fc3.bias[0] = float("nan")
    engine = GradientEngine(model, profile, x, y, path=path)
    with pytest.raises(NumericalError, match="non-finite loss"):
        engine.layer_sums(batches, depths)
    with pytest.raises(NumericalError, match="non-finite loss"):
        engine.per_device_grads(batches, depths)


@pytest.mark.parametrize("path", PATHS)
def test_nobody_delivered(path):
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, _ = _setup("mlp", "module", "float32")
    engine = GradientEngine(model, profile, x, y, path=path)
    sums = engine.layer_sums(batches, np.zeros(len(batches), dtype=np.int64))
    assert sums.sums == {} and sums.counts.tolist() == [0] * profile.n_layers
    assert sums.n_devices == 0 and sums.mean_loss is None
    pd = engine.per_device_grads(batches, np.zeros(len(batches), dtype=np.int64))
    assert all(torch.count_nonzero(v) == 0 for v in pd.values())


def test_chunked_passes_stay_exact(monkeypatch):
    """Big rounds are split into chunks (cache and memory); the sums must not change."""
    import fedsim.learn.grads as grads

    model, profile, x, y, batches, depths = _setup("mlp", "tensor", "float64")
    expect, _ = _expected_sums(model, profile, x, y, batches, depths)
    monkeypatch.setattr(grads, "_CHUNK_FWD_FLOPS", profile.fwd_flops_per_sample * 7)     # 7 rows a chunk
    monkeypatch.setattr(grads, "_VMAP_CHUNK_ELEMENTS", 1)                                 # 1 device a chunk
    for path in ("grouped", "vmap"):
        got = grads.GradientEngine(model, profile, x, y, path=path).layer_sums(batches, depths)
        for key, ref in expect.items():
            assert _rel(got.sums[key], ref) < 1e-10, (path, key)


def test_bad_depths_rejected():
    from fedsim.errors import FedsimError
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup("mlp", "module", "float32")
    engine = GradientEngine(model, profile, x, y)
    with pytest.raises(ValueError, match="one depth per"):
        engine.layer_sums(batches, depths[:-1])
    with pytest.raises(ValueError, match="depths must lie"):
        engine.layer_sums(batches, np.full(len(batches), profile.n_layers + 1))
    empty = list(batches)
    empty[2] = np.zeros(0, dtype=np.int64)
    with pytest.raises(FedsimError, match="empty mini-batch"):
        engine.layer_sums(empty, np.full(len(batches), 1))


def test_paths_agree_with_each_other_in_float32():
    """The paths differ only by rounding: a policy's results do not hinge on the path."""
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup("cnn", "module", "float32", n_devices=12)
    results = {p: GradientEngine(model, profile, x, y, path=p).layer_sums(batches, depths) for p in PATHS}
    for p in ("grouped", "vmap", "loop"):
        for key, ref in results["auto"].sums.items():
            assert _rel(results[p].sums[key], ref) < 1e-5, (p, key)


def test_works_under_no_grad():
    """A caller inside torch.no_grad (an evaluation loop, say) still gets gradients."""
    from fedsim.learn.grads import GradientEngine

    model, profile, x, y, batches, depths = _setup("mlp", "module", "float64")
    expect, _ = _expected_sums(model, profile, x, y, batches, depths)
    for path in PATHS:
        with torch.no_grad():
            got = GradientEngine(model, profile, x, y, path=path).layer_sums(batches, depths)
        for key, ref in expect.items():
            assert _rel(got.sums[key], ref) < 1e-10, (path, key)


def test_cross_entropy_rows_equals_torch():
    import torch.nn.functional as F

    from fedsim.learn.grads import cross_entropy_rows

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=gen, dtype=torch.float64) * 30
    logits[0, 3] = 1e4                            # large logits: the max shift keeps it finite
    logits[1] = -1e4
    y = torch.randint(0, 10, (50,), generator=gen)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    mine, ref = cross_entropy_rows(a, y), F.cross_entropy(b, y, reduction="none")
    assert torch.allclose(mine, ref, rtol=1e-12, atol=1e-12)
    (ga,), (gb,) = torch.autograd.grad(mine.sum(), a), torch.autograd.grad(ref.sum(), b)
    assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-14)
    spatial = torch.randn(4, 10, 3, generator=gen)          # other shapes go to F.cross_entropy
    target = torch.randint(0, 10, (4, 3), generator=gen)
    assert torch.equal(cross_entropy_rows(spatial, target), F.cross_entropy(spatial, target, reduction="none"))


def test_path_follows_train_eval_switches():
    """A model built in eval mode and switched to training mode must leave the grouped path."""
    from fedsim.learn.grads import GradientEngine, GradPath

    model, profile, x, y, batches, depths = _setup("bn", "module", "float64")
    model.eval()
    engine = GradientEngine(model, profile, x, y)
    assert engine.path is GradPath.GROUPED
    model.train()
    got = engine.layer_sums(batches, depths)
    assert engine.path is GradPath.LOOP
    expect, _ = _expected_sums(model, profile, x, y, batches, depths)
    for key, ref in expect.items():
        assert _rel(got.sums[key], ref, 1e-3) < 1e-10, key
