"""Fleet fields added for realism: DVFS energy, measured calibration and availability errors, and one
comparison set that runs every policy on the same fleet and seed."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import BASE_TOML, TRACES_DIR, run, scenario, table
from fedsim.errors import ScenarioError


def test_dvfs_energy_is_kappa_cycles_f_squared(tmp_path):
    # kappa 1e-27, f = 1 GHz, 2 cycles/FLOP: speed 5e8 FLOP/s, compute power kappa f^3 = 1 W
    dvfs = "fleet.classes[1].dvfs={ kappa = 1e-27, freq_hz = 1e9, cycles_per_flop = 2 }"
    scn = scenario(dvfs, "fleet.classes[1].speed_flops={ dist = \"fixed\", value = 5e8 }")
    spec = scn.fleet.classes[1]
    assert spec.power_compute_w == pytest.approx(1.0)
    out = run(tmp_path, dvfs, "fleet.classes[1].speed_flops=5e8")
    dev = table(out, "devices")
    for cls, comp, energy, samples in zip(dev["class"], dev["compute_s"], dev["energy_compute_j"], dev["samples"]):
        if cls == "fast":
            cycles = 2 * 5e8 * comp                     # FLOPs done x cycles per FLOP
            assert energy == pytest.approx(1e-27 * cycles * (1e9) ** 2, rel=1e-12)


def test_dvfs_gives_the_speed_when_none_is_given():
    text = BASE_TOML.replace("speed_flops = 2.0e7\n", "dvfs = { kappa = 1e-28, freq_hz = 2e9 }\n")
    scn = scenario(text=text)
    assert scn.fleet.classes[1].speed_flops.a == 2e9
    with pytest.raises(ScenarioError, match=r"fleet.classes\[1\].power_compute_w"):
        scenario("fleet.classes[1].power_compute_w=3", text=text)


@pytest.mark.parametrize("overrides,field", [
    (['fleet.classes[0].measured={ time_table = "x.csv" }'], "fleet.classes[0].measured.time_table"),
    (["fleet.classes[0].flash_bandwidth=true"], "fleet.classes[0].flash_bandwidth"),
    (['fleet.availability_file="/nonexistent.csv"'], "fleet.availability_file"),
    (['fleet.traces_dir="/nonexistent"'], "fleet.traces_dir"),
    (['fleet.classes[0].availability={ on_s = -1, off_s = 5 }'], "fleet.classes[0].availability.on_s"),
    (['network.preset="shared_ap"'], "network.ap_bandwidth_bps"),
    (['network.classes.nope={ access = "wireless" }'], "network.classes.nope"),
])
def test_new_fields_are_validated(overrides, field):
    with pytest.raises(ScenarioError) as err:
        scenario(*overrides)
    assert field in str(err.value)


def test_measured_needs_speed_or_measurement():
    if not TRACES_DIR.is_dir():
        pytest.skip("no traces")
    text = BASE_TOML.replace("speed_flops = 2.0e7\n", "")
    with pytest.raises(ScenarioError, match=r"fleet.classes\[1\].speed_flops"):
        scenario(text=text)
    both = [f"fleet.traces_dir={str(TRACES_DIR)!r}",
            'fleet.classes[1].measured={ time_table = "ondevice_training/XIAOMI/time_table_Lenet.csv" }']
    with pytest.raises(ScenarioError, match="either speed_flops or measured"):
        scenario(*both)


ASYNC = ["policy.duration_s=0.5", "policy.eval_every_s=0.25", "run.rounds=100000"]
COMPARISON = {
    "salf": [], "drop": [], "wait": [], "partial": [], "heterofl": [], "overselect": ["policy.k=6"],
    "fedasync": ASYNC, "fedbuff": ASYNC + ["policy.buffer_size=4"],
    "flower": ['policy.strategy="flwr.serverapp.strategy:FedAvg"', "training.momentum=0"],
}
HAS_FLOWER = importlib.util.find_spec("flwr") is not None       # the flower policy needs fedsim[flower]


def test_every_policy_runs_on_the_same_fleet_and_seed(tmp_path):
    """Every policy runs on the fleet BASE_TOML describes: devices 0-3 of class slow, 4-7 of class fast (classes
    fill device ids in class order), the fast ones at their fixed 2e7 FLOP/s (no slowdown), each slow one at its
    own base speed divided by a slowdown in [1, 2], the base speeds being those of the fleet built from the seed."""
    from fedsim.sim.build import build_components
    from fedsim.policies import POLICY_PATHS as POLICIES

    assert set(COMPARISON) == set(POLICIES), "a new policy joins the comparison set"
    expected_class = {d: "slow" if d < 4 else "fast" for d in range(8)}
    base = build_components(scenario()).fleet.speed_flops
    assert base[4:].tolist() == [2e7] * 4
    for name, extra in COMPARISON.items():
        if name == "flower" and not HAS_FLOWER:
            continue
        out = run(tmp_path, f'policy.name="{name}"', *extra, name=name)
        rounds = table(out, "rounds")
        assert any(a is not None for a in rounds["test_accuracy"]), name
        dev = table(out, "devices")
        assert set(dev["device"]) == set(expected_class), name          # every device took part
        for d, cls, speed in zip(dev["device"], dev["class"], dev["speed_flops"]):
            assert cls == expected_class[d], (name, d, cls)
            if cls == "fast":
                assert speed == 2e7, (name, d, speed)
            else:
                assert base[d] / 2 <= speed <= base[d], (name, d, speed, base[d])
