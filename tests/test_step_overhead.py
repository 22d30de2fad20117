"""fleet.classes[i].step_overhead_s (a fixed cost per local step) and its calibration from the phone time tables.

Timing tests use tests/test_timing.py's fleet: forward 592 FLOPs per sample, backward fc3 160, fc2 64, fc1 480
(1,296 per step of one sample); download ends at 1.5 s; devices of 32, 64 and 16 FLOP/s. Numbers are exact in
binary floating point.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TRACES_DIR, run, scenario, table
from fedsim.errors import DataError, ScenarioError
from test_timing import TEXT, events_of

LENET = TRACES_DIR / "ondevice_training" / "XIAOMI" / "time_table_Lenet.csv"
needs_traces = pytest.mark.skipif(not TRACES_DIR.is_dir(), reason=f"measurement traces not found at {TRACES_DIR}")


def test_plan_round_charges_every_step_s_overhead_to_the_forward_phase():
    from fedsim.learn.profile import Granularity, build_profile
    from fedsim.sim.build import build_components
    from fedsim.world.timing import plan_round

    profile = build_profile(build_components(scenario(text=TEXT)).model, (60,), Granularity.MODULE)
    one = np.ones(2)
    plan = plan_round(profile, np.array([0, 1]), np.array([32.0, 64.0]), np.array([1.0, 2.0]), np.array([1, 1]),
                      np.array([2, 3]), one, one, np.zeros(2), step_overhead_s=np.array([0.5, 0.125]))
    # device 0: 592/32 + 1 * 1296/32 + 2 steps * 0.5; device 1 (slowdown 2: 32 FLOP/s): 18.5 + 2 * 40.5 + 3 * 0.25
    assert plan.forward_s.tolist() == [18.5 + 40.5 + 1.0, 18.5 + 81.0 + 0.75]
    assert plan.backward_s.tolist() == [[5.0, 2.0, 15.0], [5.0, 2.0, 15.0]]      # the FLOPs' only
    without = plan_round(profile, np.array([0, 1]), np.array([32.0, 64.0]), np.array([1.0, 2.0]), np.array([1, 1]),
                         np.array([2, 3]), one, one, np.zeros(2))
    assert without.forward_s.tolist() == [59.0, 99.5]


def test_event_timestamps_with_an_overhead_by_hand(tmp_path):
    """wait, two local steps. Device 0: overhead 0.5 s; forward 18.5 + 40.5 + 2 * 0.5 = 60 s, ends at 61.5 s.
    Device 1: overhead 0.125 s and slowdown 2 (so 32 FLOP/s): 18.5 + 40.5 + 2 * 0.25 = 59.5, ends at 61 s.
    Device 2: no overhead: 37 + 81 = 118, ends at 119.5 s. Then fc3, fc2, fc1."""
    out = run(tmp_path, 'policy.name="wait"', "training.local_steps=2", "fleet.classes[0].step_overhead_s=0.5",
              "fleet.classes[1].step_overhead_s=0.125", "fleet.classes[1].slowdown=2", text=TEXT)
    got = events_of(out, 0)
    computed = [(d, e, l, t) for d, e, l, t in got if e in ("forward_end", "backward_end")]
    assert sorted(computed) == sorted([
        (0, "forward_end", -1, 61.5), (0, "backward_end", 2, 66.5), (0, "backward_end", 1, 68.5),
        (0, "backward_end", 0, 83.5),
        (1, "forward_end", -1, 61.0), (1, "backward_end", 2, 66.0), (1, "backward_end", 1, 68.0),
        (1, "backward_end", 0, 83.0),
        (2, "forward_end", -1, 119.5), (2, "backward_end", 2, 129.5), (2, "backward_end", 1, 133.5),
        (2, "backward_end", 0, 163.5)])
    assert table(out, "rounds")["end_s"][0] == 163.5
    assert table(out, "devices")["compute_s"][:3] == [82.0, 81.5, 162.0]


def test_a_zero_overhead_changes_nothing(tmp_path):
    from fedsim.sim.build import build_components

    assert build_components(scenario("fleet.classes[0].step_overhead_s=0")).fleet.class_step_overhead_s is None
    plain = run(tmp_path, name="plain")
    zero = run(tmp_path, "fleet.classes[0].step_overhead_s=0.0", "fleet.classes[1].step_overhead_s=0",
               name="zero")
    for name in ("events", "devices", "rounds"):
        assert table(plain, name) == table(zero, name), name


def test_overhead_field_is_checked():
    with pytest.raises(ScenarioError) as err:
        scenario("fleet.classes[1].step_overhead_s=-0.1")
    assert err.value.field == "fleet.classes[1].step_overhead_s" and "must be >= 0, got -0.1" in err.value.message


@pytest.mark.parametrize("overhead,deadline,samples", [
    (None, 4.5, 2), (0.75, 4.5, 2), (1.25, 4.5, 1),     # no whole step fits 3 s: a prefix after the overhead
    (None, 9.5, 4), (1.25, 9.5, 4), (4.5, 9.5, 3),      # 8 s: a whole step of 4 samples, unless its overhead...
])
def test_partial_plans_with_the_overhead_by_hand(tmp_path, overhead, deadline, samples):
    """Device 1 at 1,296 FLOP/s: one second per sample; batch 4. Time after the download: deadline - 1.5 s; a
    step of s samples takes overhead + s seconds."""
    extra = [] if overhead is None else [f"fleet.classes[1].step_overhead_s={overhead}"]
    out = run(tmp_path, 'policy.name="partial"', f"policy.deadline_s={deadline}", "training.batch_size=4",
              "fleet.classes[1].speed_flops=1296", *extra, text=TEXT)
    dev = table(out, "devices")
    assert dev["samples"][1] == samples and dev["status"][1] == "complete"
    ends = [t for d, e, _, t in events_of(out, 0) if d == 1 and e == "backward_end"]
    assert ends[-1] <= deadline


def test_asynchronous_jobs_pay_the_overhead(tmp_path):
    base = ['policy.name="fedasync"', "policy.duration_s=100", "policy.eval_every_s=100"]
    plain = run(tmp_path, *base, text=TEXT, name="plain")
    slow = run(tmp_path, *base, "fleet.classes[1].step_overhead_s=0.5", text=TEXT, name="slow")

    def first_forward_end(out):
        ev = table(out, "events")
        return next(t for d, e, t in zip(ev["device"], ev["event"], ev["time_s"]) if d == 1 and e == "forward_end")

    assert first_forward_end(plain) == 10.75 and first_forward_end(slow) == 11.25


# -- calibration ----------------------------------------------------------------------------------------------
def test_the_affine_fit_is_least_squares():
    from fedsim.world.step_fit import fit_step_time

    fit = fit_step_time({1: 3.0, 2: 5.0, 4: 9.0})          # exactly 1 + 2 * batch
    assert (fit.overhead_ms, fit.slope_ms, fit.r2) == (1.0, 2.0, 1.0) and fit.predict_ms(8) == 17.0
    table_ = {1: 10.0, 2: 11.0, 4: 12.5, 8: 15.0}
    fit = fit_step_time(table_)
    slope, intercept = np.polyfit(list(table_), list(table_.values()), 1)
    assert fit.slope_ms == pytest.approx(slope, rel=1e-12) and fit.overhead_ms == pytest.approx(intercept, rel=1e-12)
    y = np.array(list(table_.values()))
    residual = y - (intercept + slope * np.array(list(table_)))
    assert fit.r2 == pytest.approx(1 - (residual**2).sum() / ((y - y.mean())**2).sum(), rel=1e-12)
    with pytest.raises(DataError, match="at least two batch sizes"):
        fit_step_time({16: 17.0})
    with pytest.raises(DataError, match="negative overhead"):
        fit_step_time({1: 1.0, 2: 5.0})
    with pytest.raises(DataError, match="does not grow"):
        fit_step_time({1: 5.0, 2: 4.0})


# the fits on the phone time tables (ms, ms per sample, R^2), as docs/ARCHITECTURE.md reports them
PHONE_FITS = {
    "XIAOMI": (10.708, 0.5683, 0.9074),
    "MEIZU_Freq_1708800": (9.476, 0.6235, 0.9843),
    "MEIZU_Core_f0": (10.190, 0.4629, 0.9796),
}


@needs_traces
@pytest.mark.parametrize("phone", sorted(PHONE_FITS))
def test_the_fit_on_the_real_lenet_time_tables(phone):
    from fedsim.world.measurements import load_time_table
    from fedsim.world.step_fit import affine_calibration, fit_step_time

    path = TRACES_DIR / "ondevice_training" / phone / "time_table_Lenet.csv"
    rows = load_time_table(path)
    fit = fit_step_time(rows)
    overhead, slope, r2 = PHONE_FITS[phone]
    assert (round(fit.overhead_ms, 3), round(fit.slope_ms, 4), round(fit.r2, 4)) == (overhead, slope, r2)
    ref_slope, ref_intercept = np.polyfit(list(rows), list(rows.values()), 1)
    assert fit.slope_ms == pytest.approx(ref_slope, rel=1e-12)
    assert fit.overhead_ms == pytest.approx(ref_intercept, rel=1e-12)
    # every measured step within 20% of the line; the point calibration (time linear in the batch, through the
    # batch-16 row) puts a step of one sample at a sixteenth of that row, over 5 times too fast
    for batch, ms in rows.items():
        assert abs(fit.predict_ms(batch) - ms) < 0.2 * ms, (phone, batch)
    assert rows[1] > 5 * rows[16] / 16
    speed, overhead_s = affine_calibration(path)
    assert speed == 9_496_000 / (fit.slope_ms / 1000.0) and overhead_s == fit.overhead_ms / 1000.0


PHONE_TOML = """
[run]
name = "p"
seed = 0
rounds = 1

[model]
name = "mlp"

[data]
name = "synthetic"
samples_per_device = 20

[training]
batch_size = 8
lr = 0.1

[fleet]
traces_dir = "TRACES"

[[fleet.classes]]
name = "phone"
count = 3
measured = { time_table = "ondevice_training/XIAOMI/time_table_Lenet.csv", fit = "affine" }
downlink_bps = 1e8
uplink_bps = 1e8

[policy]
name = "salf"
deadline_s = 1.0
"""


@needs_traces
def test_measured_affine_fills_the_overhead_and_the_speed():
    from fedsim.sim.build import build_components
    from fedsim.world.measurements import load_time_table
    from fedsim.world.step_fit import fit_step_time

    text = PHONE_TOML.replace("TRACES", str(TRACES_DIR))
    fit = fit_step_time(load_time_table(LENET))
    fleet = build_components(scenario(text=text)).fleet
    assert fleet.class_step_overhead_s.tolist() == [fit.overhead_ms / 1000.0]
    assert fleet.speed_flops.tolist() == [9_496_000 / (fit.slope_ms / 1000.0)] * 3
    point = build_components(scenario('fleet.classes[0].measured.fit="point"', text=text)).fleet
    assert point.class_step_overhead_s is None
    with pytest.raises(ScenarioError) as err:
        scenario("fleet.classes[0].step_overhead_s=0.01", text=text)
    assert err.value.field == "fleet.classes[0].step_overhead_s" and "measured.fit" in err.value.message
    squeeze = 'fleet.classes[0].measured.time_table="ondevice_training/XIAOMI/time_table_Squeezenet.csv"'
    with pytest.raises(ScenarioError) as err:
        build_components(scenario(squeeze, text=text))
    assert err.value.field == "fleet.classes[0].measured.time_table" and "negative overhead" in err.value.message
    with pytest.raises(ScenarioError) as err:
        scenario('fleet.classes[0].measured.fit="line"', text=text)
    assert err.value.field == "fleet.classes[0].measured.fit"
