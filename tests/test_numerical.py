"""NaN or Inf in a loss or gradient: stop naming the round and the device, or drop that device's update."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BASE_TOML, scenario, table
from fedsim.cli import main
from fedsim.errors import NumericalError


def _poisoned(*overrides):
    from fedsim.sim.build import build_components

    scn = scenario(*overrides)
    comp = build_components(scn)
    idx = torch.tensor(comp.partition.device_indices(3))
    comp.dataset.x_train[idx] = float("nan")         # device 3's data is corrupt
    return scn, comp


def test_nan_stops_the_run_naming_round_and_device(tmp_path):
    from fedsim.run import run_scenario

    scn, comp = _poisoned("policy.deadline_s=1000")
    with pytest.raises(NumericalError, match=r"round 0: .*device 3\b"):
        run_scenario(scn, tmp_path / "r", components=comp)
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "failed"


def test_nan_device_dropped_and_recorded(tmp_path):
    from fedsim.run import run_scenario

    scn, comp = _poisoned("policy.deadline_s=1000", 'training.on_nonfinite="drop"')
    run_scenario(scn, tmp_path / "r", components=comp)
    dev = table(tmp_path / "r", "devices")
    assert {s for d, s in zip(dev["device"], dev["status"]) if d == 3} == {"nonfinite"}
    assert "nonfinite" not in {s for d, s in zip(dev["device"], dev["status"]) if d != 3}
    model = torch.load(tmp_path / "r" / "model.pt")
    assert all(bool(torch.isfinite(v).all()) for v in model.values())
    # the update is the other devices' mean: contributors exclude device 3
    assert table(tmp_path / "r", "rounds")["contributors"][0] == [7, 7, 7]


def test_diverging_learning_rate_stops_with_the_nan_message(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    code = main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet", "--set", "training.lr=1e9",
                 "--set", "run.rounds=10"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "non-finite" in err and "round" in err and "device" in err and "training.lr" in err


def test_nan_is_located_without_the_gradient_engine_holding_data(tmp_path, monkeypatch):
    """A sharded (Dask) gradient engine keeps no training data in the driver: locating the device must
    not rely on it."""
    import fedsim.sim.server
    from fedsim.learn.grads import GradientEngine
    from fedsim.run import run_scenario

    class NoLocalData:
        def __init__(self, *args, **kwargs):
            self._engine = GradientEngine(*args, **kwargs)
            self.layer_of_param = self._engine.layer_of_param

        def layer_sums(self, batches, depths):
            return self._engine.layer_sums(batches, depths)

    monkeypatch.setattr(fedsim.sim.server, "GradientEngine", NoLocalData)
    scn, comp = _poisoned("policy.deadline_s=1000")
    with pytest.raises(NumericalError, match=r"round 0: .*device 3\b"):
        run_scenario(scn, tmp_path / "r", components=comp)
