"""training.loss: a loss named by import path drives every gradient path, local training and evaluation, equal
to the naive float64 per-device oracle; a loss that cannot work is refused when the run is built (exit 2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import oracle
from conftest import BASE_TOML, scenario
from fedsim.cli import main
from tests import helper_losses

H = "tests.helper_losses"
LOSSES = {"smoothed": helper_losses.smoothed, "squared": helper_losses.squared}


def _case(name: str):
    """A float64 model, data, unequal mini-batches, and every depth from 0 to all layers."""
    from fedsim.learn.models import build_model
    from fedsim.learn.profile import Granularity, build_profile

    model = build_model(name, (1, 28, 28), 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    profile = build_profile(model, (1, 28, 28), Granularity.MODULE)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=gen)
    rng = np.random.default_rng(3)
    sizes = [6, 4, 6, 3, 6, 6, 5]
    batches = [rng.choice(200, s, replace=False) for s in sizes]
    depths = rng.permutation(np.resize(np.arange(profile.n_layers + 1), len(sizes)))
    return model, profile, x, y, batches, depths


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("path", ["grouped", "vmap", "loop"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_custom_loss_gradients_match_the_oracle(loss_name, model_name, path):
    from fedsim.learn.grads import GradientEngine
    from fedsim.learn.loss import load_loss

    rows = LOSSES[loss_name]
    loss = load_loss(f"{H}:{loss_name}")
    assert loss.rows_fn is rows
    model, profile, x, y, batches, depths = _case(model_name)
    engine = GradientEngine(model, profile, x, y, path=path, loss=loss)
    got = engine.layer_sums(batches, depths)
    per_device = oracle.per_device_grads(model, x, y, batches, loss_rows=rows)
    L = profile.n_layers
    for name, layer in profile.layer_of_param().items():
        members = [i for i, d in enumerate(depths) if d >= L - layer]
        assert _rel(got.sums[name], sum(per_device[i][name] for i in members)) < 1e-10, name
    with torch.no_grad():
        means = [float(rows(model(x[torch.from_numpy(b)]), y[torch.from_numpy(b)]).mean()) for b in batches]
    live = np.flatnonzero(depths)
    assert got.mean_loss == pytest.approx(np.mean([means[i] for i in live]), rel=1e-12)
    # and a different loss gives different gradients: the loss is really the one used
    plain = GradientEngine(model, profile, x, y, path=path).layer_sums(batches, depths)
    assert _rel(plain.sums["fc2.weight" if model_name == "cnn" else "fc3.weight"],
                got.sums["fc2.weight" if model_name == "cnn" else "fc3.weight"]) > 1e-3
    if path != "grouped":
        each = engine.per_device(batches, depths)
        for i in live:
            assert each.losses[i] == pytest.approx(means[i], rel=1e-12)
            last = profile.layers[-1].param_names[0]
            assert _rel(each.grads[last][i], per_device[i][last]) < 1e-10


def test_local_training_and_evaluation_use_the_loss():
    from fedsim.learn.evaluate import evaluate
    from fedsim.learn.local import LocalTrainer
    from fedsim.learn.loss import load_loss

    loss = load_loss(f"{H}:squared")
    model, _, x, y, batches, _ = _case("mlp")
    trainer = LocalTrainer(model, x, y, lr=0.5, loss=loss)
    one = trainer.train([batches[0]])
    want = oracle.per_device_grads(model, x, y, [batches[0]], loss_rows=helper_losses.squared)[0]
    for name, delta in one.delta.items():
        assert _rel(delta, 0.5 * want[name]) < 1e-10, name
    # two steps: the second from the weights after the first
    two = trainer.train([batches[0], batches[1]])
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stepped.named_parameters():
            p -= 0.5 * want[name]
    second = oracle.per_device_grads(stepped, x, y, [batches[1]], loss_rows=helper_losses.squared)[0]
    for name, delta in two.delta.items():
        assert _rel(delta, 0.5 * (want[name] + second[name])) < 1e-10, name
    result = evaluate(model, x, y, chunk=64, loss=loss)
    with torch.no_grad():
        assert result.loss == pytest.approx(float(helper_losses.squared(model(x), y).mean()), rel=1e-12)
        assert evaluate(model, x, y).loss != pytest.approx(result.loss, rel=1e-3)


def test_the_default_is_cross_entropy():
    from fedsim.learn.loss import CROSS_ENTROPY, load_loss

    assert scenario().training.loss == "cross_entropy"
    assert load_loss("cross_entropy") is CROSS_ENTROPY
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    assert torch.allclose(CROSS_ENTROPY.rows(logits, y), torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_a_run_builds_with_a_custom_loss_and_cluster_workers_use_it():
    from fedsim.cluster.worker import RunSpec, _RunData, data_digest, portable
    from fedsim.sim.build import build_components

    scn = scenario(f'training.loss="{H}:smoothed"')
    comp = build_components(scn)
    data = _RunData(RunSpec("k", portable(scn), data_digest(comp.dataset, comp.partition)))
    with data.engine() as engine:
        assert engine.loss.rows_fn is helper_losses.smoothed


BAD = [
    # (training.loss, extra overrides, words of the message)
    ("ce", (), ["unknown loss 'ce'", "'cross_entropy' (built in)", "'package.module:function'"]),
    ("cross_entropy:x:y", (), ["import path must read 'package.module:function'"]),
    ("fedsim_no_such_module_xyz:f", (), ["cannot import module 'fedsim_no_such_module_xyz'"]),
    (f"{H}:missing", (), ["has no attribute 'missing'"]),
    (f"{H}:not_callable", (), ["is not callable, got float"]),
    (f"{H}:one_per_batch", (), ["returns shape []", "expected [64], one loss per row"]),
    (f"{H}:per_class", (), ["returns shape [64, 10]"]),
    (f"{H}:integers", (), ["must return floating-point losses, got torch.int64"]),
    (f"{H}:listed", (), ["must return a tensor of per-row losses, got list"]),
    (f"{H}:infinite", (), ["returns a non-finite loss (inf) in row"]),
    (f"{H}:detached", (), ["does not depend differentiably on the logits"]),
    (f"{H}:centred", (), ["is not per row"]),
    (f"{H}:item", (), ["under torch.func.vmap", "training.grad_path", ".item()"]),
    (f"{H}:raises", (), ["raised ValueError: no loss today"]),
    (f"{H}:exits", (), ["called sys.exit(2)"]),
]


@pytest.mark.parametrize("loss, sets, words", BAD, ids=[b[0] for b in BAD])
def test_bad_losses_exit_2_before_any_output(tmp_path, capsys, loss, sets, words):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--quiet", "--set", f'training.loss="{loss}"']
    code = main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedsim: error: {path}: training.loss: ") and repr(loss) in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_a_loss_that_vmap_cannot_run_is_accepted_on_the_loop_path():
    from fedsim.sim.build import build_components

    build_components(scenario(f'training.loss="{H}:item"', 'training.grad_path="loop"'))
