"""`fedsim validate`'s dry run (fedsim.sim.preview) against what the run then does."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run, scenario, table


@pytest.mark.parametrize("mode", ["ideal", "after_compute"])
def test_preview_of_round_0_is_what_the_run_does(tmp_path, mode):
    """Round 0 starts at t = 0 in both: the preview's finish times are the run's download + compute (+ upload)
    of each device, and its straggler share is the run's share of devices that did not complete."""
    from fedsim.sim.build import build_components
    from fedsim.sim.preview import preview

    overrides = ("run.rounds=1", "policy.deadline_s=0.06", f'network.upload_mode="{mode}"')
    scn = scenario(*overrides)
    p = preview(scn, build_components(scn))
    dev = table(run(tmp_path, *overrides, 'policy.name="wait"'), "devices")
    finish = np.array(dev["download_s"]) + np.array(dev["compute_s"])
    if mode != "ideal":
        finish += np.array(dev["upload_s"])
    assert p.rounds == 1 and p.participants == 8 and p.devices_per_class == {"slow": 4, "fast": 4}
    assert p.finish_s[100] == pytest.approx(finish.max(), rel=1e-12)
    assert p.finish_s[50] == pytest.approx(np.percentile(finish, 50), rel=1e-12)
    cut = table(run(tmp_path, *overrides, name="salf"), "devices")["status"]
    late = float(np.mean(finish > 0.06))
    assert 0 < late < 1
    assert p.straggler_share == pytest.approx(late)
    assert p.straggler_share == pytest.approx(np.mean([s != "complete" for s in cut]))
    assert p.deadlines_s == (0.06,)


def test_preview_without_deadline_and_for_asynchronous_policies():
    from fedsim.sim.build import build_components
    from fedsim.sim.preview import preview

    scn = scenario('policy.name="wait"', "run.rounds=5")
    p = preview(scn, build_components(scn))
    assert p.rounds == 5 and p.straggler_share is None and p.deadlines_s == (None,) * 5
    assert any("deadline  none" in line for line in p.lines())
    scn = scenario('policy.name="fedasync"', "policy.duration_s=1")
    assert preview(scn, build_components(scn)) is None


def test_validate_runs_every_check_a_run_makes(tmp_path, capsys):
    """An empty data directory or a model factory that does not import: exit 2 from validate, as from run."""
    from fedsim.cli import main
    from conftest import BASE_TOML

    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "devices   4 slow, 4 fast" in out and "expected to be cut (stragglers)" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate", str(path), "--set", 'data.name="mnist"', "--set", f'data.dir="{empty}"']) == 2
    assert "data.dir" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", 'model.name="nosuch.module:f"']) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "nosuch" in err


def test_validate_without_model_checks_the_scenario_and_fleet_only(tmp_path, capsys):
    """`--no-model`: the scenario, its policy and its fleet are checked (a bad field is still exit 2), the data
    files are not read (an empty data folder passes, as it does not without the flag) and no dry run is printed."""
    from fedsim.cli import main
    from conftest import BASE_TOML

    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    empty = tmp_path / "empty"
    empty.mkdir()
    mnist = ["--set", 'data.name="mnist"', "--set", f'data.dir="{empty}"']
    assert main(["validate", str(path), "--no-model", *mnist]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out and "not built (--no-model)" in out and "not loaded (--no-model)" in out
    assert "expected to be cut" not in out and "fleet     8 devices in 2 classes" in out
    assert main(["validate", str(path), *mnist]) == 2
    assert "data.dir" in capsys.readouterr().err
    assert main(["validate", str(path), "--no-model", "--set", "policy.deadline_s=-1"]) == 2
    assert "policy.deadline_s" in capsys.readouterr().err
    assert main(["validate", str(path), "--no-model", "--set", 'data.dir="/no/such/folder"', *mnist[:2]]) == 2
    assert "data.dir" in capsys.readouterr().err
