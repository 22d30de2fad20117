"""Realistic fleets end to end: shared links, churn, availability files, energy bookkeeping, real phones."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import REPO, TRACES_DIR, run, scenario, table
from test_timing import TEXT, events_of


SHARED_AP = TEXT.replace("downlink_bps = 10048", "downlink_bps = 1e12", 2) + """
[network]
preset = "custom"
[[network.nodes]]
name = "server"
kind = "server"
[[network.nodes]]
name = "ap"
kind = "ap"
[[network.links]]
a = "ap"
b = "server"
down_bps = 10048
up_bps = 1e12
latency_s = 0.0
[network.classes.a]
attach = "ap"
[network.classes.b]
attach = "ap"
"""


def test_devices_sharing_an_access_point_split_its_bandwidth(tmp_path):
    # classes a and b attach to one access point of 10048 bit/s (the private links are much faster): the two
    # downloads of 10048 bits share it, 5024 bit/s each, so both end at 0.5 + 2.0 s; class c keeps a private
    # link and ends at 0.5 + 1.0 s. Later phases follow as in test_timing, shifted by the extra second.
    out = run(tmp_path, text=SHARED_AP)
    got = set(events_of(out, 0))
    assert {(0, "download_end", -1, 2.5), (1, "download_end", -1, 2.5), (2, "download_end", -1, 1.5),
            (1, "forward_end", -1, 11.75), (1, "backward_end", 0, 22.75)} <= got


def test_leaving_mid_transfer_frees_the_shared_link_at_once(tmp_path):
    # as above, but device 0 leaves at t = 1: by then each download has sent 5024 of its 10048 bits; device 1
    # then has the access point alone (10048 bit/s): its last 5024 bits take 0.5 s, plus 0.5 s of latency
    churn = 'fleet.classes[0].availability={ on_s = 1, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, text=SHARED_AP)
    got = set(events_of(out, 0))
    assert {(0, "offline", -1, 1.0), (1, "download_end", -1, 2.0), (1, "forward_end", -1, 11.25)} <= got
    assert not any(d == 0 and t > 1.0 for d, _, _, t in got)
    dev = table(out, "devices")
    assert dev["status"][:2] == ["offline", "complete"] and dev["download_s"][:2] == [1.0, 2.0]


def test_churn_interrupts_a_device_mid_round(tmp_path):
    # device 0 (class a) is online for 26 s from t = 0: it finished fc3's backward at 25 (ideal mode: that layer
    # counts) and was computing fc2 (due at 27) when it left
    churn = 'fleet.classes[0].availability={ on_s = 26, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, text=TEXT)
    got = set(events_of(out, 0))
    assert (0, "offline", 1, 26.0) in got and (0, "backward_end", 2, 25.0) in got
    assert not any(d == 0 and t > 26.0 for d, _, _, t in got)
    dev = table(out, "devices")
    assert dev["status"][:3] == ["offline", "complete", "nothing"] and dev["depth"][:3] == [1, 3, 0]
    assert dev["compute_s"][0] == 18.5 + 5.0 + 1.0            # the unfinished fc2 phase counts up to t = 26
    # round 1 starts at 30: device 0 is offline (until 126) and is not selected
    assert sorted(set(table(out, "devices")["device"][3:])) == [1, 2]


def test_churn_while_working_towards_the_deadline_keeps_the_finished_layers(tmp_path):
    # device 0 finished fc3 (25) and fc2 (27); fc1 would end at 42, past the deadline (30), so it works on
    # it until the deadline, and leaves at 28: the layers it finished keep their compute seconds
    churn = 'fleet.classes[0].availability={ on_s = 28, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, text=TEXT)
    got = set(events_of(out, 0))
    assert (0, "offline", 0, 28.0) in got and not any(d == 0 and e == "cut" for d, e, _, _ in got)
    dev = table(out, "devices")
    assert dev["status"][0] == "offline" and dev["depth"][0] == 2 and dev["layers_computed"][0] == 2
    assert dev["compute_s"][0] == 18.5 + 5.0 + 2.0 + 1.0
    assert dev["energy_compute_j"][0] == 2 * 26.5


def test_churn_in_streaming_mode_loses_what_had_not_arrived(tmp_path):
    churn = 'fleet.classes[1].availability={ on_s = 20, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, 'network.upload_mode="streaming"', text=TEXT)
    got = set(events_of(out, 0))
    # device 1's fc3 upload started at 13.25 and would arrive at 26.25: at 20 it is lost
    assert (1, "upload_start", 2, 13.25) in got and (1, "offline", 2, 20.0) in got
    assert table(out, "devices")["depth"][1] == 0


def test_availability_file_gives_the_intended_participants(tmp_path):
    path = tmp_path / "avail.csv"
    path.write_text("device,start_s,end_s\n0,0,35\n1,0,1000\n2,31,1000\n")
    out = run(tmp_path, f"fleet.availability_file={str(path)!r}", "run.rounds=3", text=TEXT)
    dev = table(out, "devices")
    by_round = {r: sorted(d for rr, d in zip(dev["round"], dev["device"]) if rr == r) for r in range(3)}
    # round 0 at t=0: {0, 1}; round 1 at t=30: device 2 not yet (31); device 0 leaves at 35 during its
    # forward pass (31.5 to 50), device 1 completes at 51.75 and nobody is left: round 2 starts at 51.75
    # without device 0 (gone) and with device 2 (back since 31)
    assert by_round == {0: [0, 1], 1: [0, 1], 2: [1, 2]}
    assert (0, "offline", -1, 35.0) in set(events_of(out, 1))
    assert table(out, "rounds")["start_s"] == [0.0, 30.0, 51.75]


def test_energy_recomputed_from_events(tmp_path):
    out = run(tmp_path, 'network.upload_mode="streaming"', "run.rounds=4", "policy.deadline_s=0.05")
    ev, dev, rounds = table(out, "events"), table(out, "devices"), table(out, "rounds")
    from conftest import scenario as make

    classes = {c.name: c for c in make().fleet.classes}
    end_of = dict(zip(rounds["round"], rounds["end_s"]))
    energy = {}
    for r, d, e in zip(ev["round"], ev["device"], ev["energy_j"]):
        if d >= 0:
            energy[(r, d)] = energy.get((r, d), 0.0) + e
    for i, (r, d) in enumerate(zip(dev["round"], dev["device"])):
        spec = classes[dev["class"][i]]
        active_until = max(t for rr, dd, t in zip(ev["round"], ev["device"], ev["time_s"]) if rr == r and dd == d)
        idle = spec.power_idle_w * (end_of[r] - active_until)
        assert dev["energy_j"][i] == pytest.approx(energy[(r, d)] + idle, rel=1e-9, abs=1e-12)
        # and the phases: power x seconds
        assert dev["energy_compute_j"][i] == pytest.approx(spec.power_compute_w * dev["compute_s"][i], abs=1e-12)
        assert dev["energy_upload_j"][i] == pytest.approx(spec.power_tx_w * dev["upload_s"][i], abs=1e-12)
    assert sum(rounds["energy_j"]) == pytest.approx(sum(dev["energy_j"]))


@pytest.fixture
def phones(mnist_dir):
    if not TRACES_DIR.is_dir():
        pytest.skip(f"measurement traces not found at {TRACES_DIR}")
    return [f"fleet.traces_dir={str(TRACES_DIR)!r}", f"data.dir={str(mnist_dir)!r}"]


def test_phones_scenario_runs_with_salf(tmp_path, phones):
    from fedsim.run import run_scenario
    from fedsim.spec.scenario import load_scenario

    scn = load_scenario(REPO / "scenarios" / "phones.toml", phones + ["run.rounds=6"])
    summary = run_scenario(scn, tmp_path / "phones")
    assert summary.rounds == 6 and summary.test_accuracy is not None
    dev = table(tmp_path / "phones", "devices")
    assert len(set(dev["class"])) >= 3 and max(table(tmp_path / "phones", "rounds")["participants"]) == 20


def test_phones_are_calibrated_to_their_measured_batch_time(phones):
    """One batch of the reference model (the benchmark's LeNet) takes the measured time on each phone."""
    from fedsim.sim.build import build_components
    from fedsim.world.lenet import MnnLeNet
    from fedsim.world.measurements import MNIST_SHAPE
    from fedsim.learn.profile import Granularity, build_profile
    from fedsim.world.timing import plan_round

    comp = build_components(scenario(*phones, text=(REPO / "scenarios" / "phones.toml").read_text()))
    lenet = build_profile(MnnLeNet(), MNIST_SHAPE, Granularity.MODULE)
    for c, spec in enumerate(comp.fleet.classes):
        if spec.measured is None or spec.measured.spread != "none":
            continue
        device = np.flatnonzero(comp.fleet.class_of == c)[:1]
        one = np.ones(1)
        plan = plan_round(lenet, device, comp.fleet.speed_flops[device], one, np.array([16]), np.array([1]),
                          np.full(1, np.inf), np.full(1, np.inf), np.zeros(1))
        simulated_ms = 1000 * float(plan.forward_s[0] + plan.backward_s[0].sum())
        with open(spec.measured.time_table, newline="") as fh:   # the raw file, read here
            measured_ms = next(float(row["expr_train"]) for row in csv.DictReader(fh) if row["batchsize"] == "16")
        # Exact in real numbers: speed = 16 F / (ms / 1000) with F = the LeNet's FLOPs per sample, and the phases
        # take 16 f_i / speed with sum f_i = F. In floats every FLOP count is an integer (exact) and the roundings
        # are: ms / 1000 and the division giving speed (2), 1 / speed (1), one product per phase (forward and 4
        # layers: 5), 4 additions of positive terms and the final * 1000: 13 roundings of at most 2^-53 each,
        # whose relative errors at most add up (to first order): 13 * 2^-53 < 2^-49.
        assert simulated_ms == pytest.approx(measured_ms, rel=2.0**-49, abs=0), spec.name
