"""Behaviours no other test reached: HeteroFL's automatic widths, rounds when nobody is online, the cap of
SALF's unbiased scale, checkpoints refused for asynchronous runs, partial and heterofl under non-ideal
upload modes, and data.partition / training.grad_path read from a scenario file.

Timestamps are computed by hand in the comments; every figure is exact in binary floating point unless
compared with pytest.approx.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BASE_TOML, TRACES_DIR, run, scenario, table


def _events(run_dir, round_=0):
    ev = table(run_dir, "events")
    return [(d, e, l, t) for r, d, e, l, t in zip(ev["round"], ev["device"], ev["event"], ev["layer"], ev["time_s"])
            if r == round_]


def _device_rows(run_dir, round_=0):
    dev = table(run_dir, "devices")
    return {d: {k: dev[k][i] for k in dev} for i, (r, d) in enumerate(zip(dev["round"], dev["device"])) if r == round_}


def _round_batches(scn, comp, round_=0):
    """Each device's mini-batches of round `round_` when every device takes part (as the server draws them)."""
    from fedsim.sim.server import round_rng

    rng = round_rng(scn.run.seed, round_)
    t = scn.training
    return [[comp.partition.sample_batch(d, t.batch_size, rng) for _ in range(t.local_steps)]
            for d in range(comp.fleet.n_devices)]


def _model(run_dir):
    return torch.load(run_dir / "model.pt")


# ==========================================================================================================
# HeteroFL, widths = "auto"
# ==========================================================================================================
# The mlp on 60 synthetic features is 60-h1-h2-10 with h1 = ceil(32 r), h2 = ceil(16 r) at width r.
# Forward FLOPs per sample 2 (60 h1 + h1 h2 + 10 h2); backward 2 * 60 h1 + 4 (h1 h2 + 10 h2) (no input grad).

def _mlp(width: float) -> tuple[int, int]:
    """(float32 bytes, forward + backward FLOPs per sample) of the mlp sub-model at `width`, by hand."""
    h1, h2 = math.ceil(32 * width), math.ceil(16 * width)
    params = 60 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    flops = 2 * (60 * h1 + h1 * h2 + 10 * h2) + 2 * 60 * h1 + 4 * (h1 * h2 + 10 * h2)
    return 4 * params, flops


def test_mlp_submodels_have_the_hand_figures():
    from fedsim.learn.models import build_model
    from fedsim.learn.profile import Granularity, build_profile

    widths = (1, 0.5, 0.25, 0.125, 0.0625)
    assert [_mlp(w) for w in widths] == [(10600, 11712), (4808, 5088), (2296, 2352), (1136, 1128), (580, 552)]
    for w in widths:
        prof = build_profile(build_model("mlp", (60,), 10, generator=torch.Generator(), width=w), (60,),
                             Granularity.MODULE)
        assert (prof.total_bytes, prof.fwd_flops_per_sample + prof.bwd_flops_per_sample) == _mlp(w)


# Every class: fixed speed, slowdown 1, latency 0, both links 84800 bit/s (the full model moves in 1.0 s).
# Expected round time at width r: 8 bytes(r) / 84800 + flops(r) / speed (+ the upload, as long as the
# download, in non-ideal modes); deadline 2 s.
#   edge      11712 FLOP/s: width 1 takes 1 + 1 = 2.0 s, exactly the deadline: it fits (<=). With the upload
#                           counted 3 s; width 1/2 then takes 0.907 + 0.434 = 1.34 s.
#   half       6000: 1 -> 2.95 s; 1/2 -> 0.454 + 0.848 = 1.30 s (non-ideal 1.76 s)
#   quarter    2000: 1/2 -> 0.454 + 2.544 > 2; 1/4 -> 0.217 + 1.176 = 1.39 s (non-ideal 1.61 s)
#   eighth      900: 1/4 -> 0.217 + 2.613 > 2; 1/8 -> 0.107 + 1.253 = 1.36 s (non-ideal 1.47 s)
#   sixteenth   400: 1/8 -> 0.107 + 2.82 > 2; 1/16 -> 0.055 + 1.38 = 1.43 s (non-ideal 1.49 s)
#   hopeless    100: 1/16 -> 5.57 s: nothing fits, the narrowest width is used (and the device is cut)
AUTO_SPEEDS = {"edge": 11712, "half": 6000, "quarter": 2000, "eighth": 900, "sixteenth": 400, "hopeless": 100}
AUTO_TEXT = """
[run]
name = "auto"
seed = 0
rounds = 1

[model]
name = "mlp"

[data]
name = "synthetic"
samples_per_device = 4
test_samples_per_device = 2

[training]
batch_size = 1
lr = 0.1
""" + "".join(f"""
[[fleet.classes]]
name = "{name}"
count = 1
speed_flops = {speed}
downlink_bps = 84800
uplink_bps = 84800
""" for name, speed in AUTO_SPEEDS.items()) + """
[policy]
name = "heterofl"
widths = "auto"
deadline_s = 2.0
"""


@pytest.mark.parametrize("mode,widths", [
    ("ideal", [1, 0.5, 0.25, 0.125, 0.0625, 0.0625]),
    ("after_compute", [0.5, 0.5, 0.25, 0.125, 0.0625, 0.0625]),
    ("streaming", [0.5, 0.5, 0.25, 0.125, 0.0625, 0.0625]),
])
def test_heterofl_auto_widths_fit_the_deadline(tmp_path, mode, widths):
    out = run(tmp_path, f'network.upload_mode="{mode}"', text=AUTO_TEXT)
    downloads = {d: (t, b) for d, e, t, b in zip(*(table(out, "events")[k] for k in ("device", "event", "time_s", "bytes")))
                 if e == "download_end"}
    # each device downloads the sub-model of its width: its bytes, in 8 bytes / 84800 s
    assert [downloads[d][1] for d in range(6)] == [_mlp(w)[0] for w in widths]
    assert [downloads[d][0] for d in range(6)] == pytest.approx([8 * _mlp(w)[0] / 84800 for w in widths], rel=1e-12)
    dev = _device_rows(out)
    # it then computes the sub-model's FLOPs: the compute of every device but the hopeless one is all of it
    for d, speed in enumerate(list(AUTO_SPEEDS.values())[:5]):
        assert dev[d]["compute_s"] == pytest.approx(_mlp(widths[d])[1] / speed, rel=1e-12)
    assert [dev[d]["status"] for d in range(6)] == ["complete"] * 5 + ["nothing"]
    if mode == "ideal":
        # the edge device's width-1 round ends exactly at the deadline, and counts
        assert (0, "backward_end", 0, 2.0) in _events(out)
    assert table(out, "rounds")["contributors"][0] == [5, 5, 5]


# Classes whose rates or speed are not a distribution of their own: a wireless access (no wired rates; the
# network supplies them), a measured phone (speed from a time table). flash_bandwidth classes are alike.
WIRELESS_TEXT = BASE_TOML.replace("speed_flops = 2.0e7\ndownlink_bps = 1.0e8\nuplink_bps = 1.0e7", "speed_flops = 2.0e7") \
    .replace('[policy]\nname = "salf"', """
[network.classes.fast]
access = "wireless"
bandwidth_hz = 1e6
up_tx_power_w = 0.2
down_tx_power_w = 1.0
distance_m = 50.0

[policy]
name = "heterofl"
widths = "auto"
""")
MEASURED_TEXT = BASE_TOML.replace(
    "speed_flops = 2.0e7\n", 'measured = { time_table = "ondevice_training/XIAOMI/time_table_Lenet.csv", batch_size = 16 }\n') \
    .replace("[[fleet.classes]]", f"[fleet]\ntraces_dir = {str(TRACES_DIR)!r}\n\n[[fleet.classes]]", 1) \
    .replace('[policy]\nname = "salf"', '[policy]\nname = "heterofl"\nwidths = "auto"')


# a class with no speed or link distribution in the scenario (measured phones, wireless access) is planned
# from the mean over its devices
@pytest.mark.parametrize("text", ["wireless", "measured"])
def test_heterofl_auto_widths_for_classes_without_a_speed_or_rate_distribution(tmp_path, text):
    from fedsim.errors import ScenarioError
    from fedsim.policies.heterofl import AUTO_WIDTHS

    if text == "measured" and not TRACES_DIR.is_dir():
        pytest.skip(f"measurement traces not found at {TRACES_DIR}")
    text = WIRELESS_TEXT if text == "wireless" else MEASURED_TEXT
    try:
        scenario(text=text)
    except ScenarioError as exc:      # refusing the combination up front would be a fix too
        assert "policy.widths" in str(exc)
        return
    out = run(tmp_path, "run.rounds=1", text=text)
    assert table(out, "rounds")["round"] == [0]
    sizes = {b for e, b in zip(table(out, "events")["event"], table(out, "events")["bytes"]) if e == "download_end"}
    assert sizes and sizes <= {_mlp(w)[0] for w in AUTO_WIDTHS}      # every device got one of the auto widths


# ==========================================================================================================
# Rounds when nobody is online
# ==========================================================================================================
# tests.helper_models:tiny, batch 1, download 1.5 s; per sample forward / fc3 / fc2 / fc1 backward:
#   device 0 (32 FLOP/s) 18.5 / 5 / 2 / 15 s, device 1 (64) 9.25 / 2.5 / 1 / 7.5, device 2 (16) 37 / 10 / 4 / 30.
# A whole wait round takes 1.5 + 40.5 = 42 s on device 0, 21.75 s on device 1, 82.5 s on device 2.
TINY = """
[run]
name = "tiny"
seed = 0
rounds = 3

[model]
name = "tests.helper_models:tiny"
dtype = "float64"

[data]
name = "synthetic"
samples_per_device = 4
test_samples_per_device = 2

[training]
batch_size = 1
lr = 0.1
momentum = 0.5
""" + "".join(f"""
[[fleet.classes]]
name = "{name}"
count = 1
speed_flops = {speed}
downlink_bps = 20096
uplink_bps = 256
latency_s = 0.5
power_compute_w = 2
power_idle_w = 0.25
""" for name, speed in (("a", 32), ("b", 64), ("c", 16))) + """
[policy]
name = "wait"
"""


def _availability(tmp_path, rows):
    path = tmp_path / "avail.csv"
    path.write_text("device,start_s,end_s\n" + "".join(f"{d},{s},{e}\n" for d, s, e in rows))
    return f"fleet.availability_file={str(path)!r}"


def test_wait_idles_until_someone_is_online_and_survives_an_emptied_round(tmp_path):
    # device 0 online [5, 60) and [70, ...); device 1 [12, 55); device 2 [65, ...)
    avail = _availability(tmp_path, [(0, 5, 60), (0, 70, 1000), (1, 12, 55), (2, 65, 1000)])
    out = run(tmp_path, avail, text=TINY)
    rounds = table(out, "rounds")
    # round 0: nobody at 0; device 0 arrives at 5 and is alone: 5 + 42 = 47
    # round 1 at 47: devices 0 and 1; 1 leaves at 55 (forward until 57.75), 0 at 60 (forward until 67): the
    #   round ends at 60 with nothing delivered
    # round 2: nobody at 60; device 2 arrives at 65 (device 0 only at 70): 65 + 82.5 = 147.5
    assert rounds["start_s"] == [5.0, 47.0, 65.0]
    assert rounds["end_s"] == [47.0, 60.0, 147.5]
    assert rounds["participants"] == [1, 2, 1]
    assert rounds["contributors"] == [[1, 1, 1], [0, 0, 0], [1, 1, 1]]
    assert rounds["train_loss"][1] is None and rounds["train_loss"][0] is not None
    assert (-1, "round_start", -1, 5.0) in _events(out, 0)
    assert {(1, "offline", -1, 55.0), (0, "offline", -1, 60.0), (-1, "round_end", -1, 60.0)} <= set(_events(out, 1))
    dev = table(out, "devices")
    assert list(zip(dev["round"], dev["device"], dev["status"])) == [
        (0, 0, "complete"), (1, 0, "offline"), (1, 1, "offline"), (2, 2, "complete")]
    # an emptied round leaves the model exactly as it was (momentum included: nothing is stepped)
    after_round_0 = run(tmp_path, avail, "run.rounds=1", text=TINY, name="one")
    after_round_1 = run(tmp_path, avail, "run.rounds=2", text=TINY, name="two")
    a, b = _model(after_round_0), _model(after_round_1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _model(out)[k]) for k in a)      # round 2 does move it


def test_wait_with_nobody_left_for_good_is_an_error_naming_the_time(tmp_path):
    import signal

    from fedsim.errors import FedsimError

    def hung(*_):
        raise TimeoutError("the run waits forever for devices that never come back")

    avail = _availability(tmp_path, [(0, 0, 10)])
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(FedsimError, match=r"^test.toml: fleet.availability_file: .*: round 1: no device is "
                                              r"online at t = 10 s and none comes back \(every interval ends by 10 s\)$"):
            run(tmp_path, avail, text=TINY)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert '"failed"' in (tmp_path / "run" / "status.json").read_text()


# ==========================================================================================================
# SALF unbiased: the scale 1 / (1 - P_l^U) is capped at 1000
# ==========================================================================================================

def test_salf_unbiased_scale_is_capped_at_1000():
    """Two participants of depths 3 and 1 after 3000 device-rounds that delivered nothing.

    Depth histogram, this round included: [3000, 1, 0, 1] (3002 device-rounds). Layers 0 and 1 (fc1, fc2)
    were missed by 3001: 1 - (3001/3002)^2 = 6.66e-4 < 1/1000, so their scale is capped at 1000. Layer 2
    (fc3) was missed by 3000: 1 - (3000/3002)^2 = 1.332e-3, scale 750.6, under the cap.
    """
    from fedsim.sim.build import build_components
    from fedsim.learn.grads import GradientEngine
    from oracle import layerwise_update, round_inputs

    scn = scenario('policy.name="salf"', "policy.deadline_s=30", 'policy.aggregation="unbiased"', text=TINY)
    comp = build_components(scn)
    x, y = comp.dataset.x_train, comp.dataset.y_train
    engine = GradientEngine(comp.model, comp.profile, x, y)
    batches = [np.array([0, 1]), np.array([5, 6, 7])]
    depths = np.array([3, 1])
    inputs = round_inputs(comp.profile, depths, batches, history=np.array([3000, 1, 0, 1]))
    update = scn.policy.aggregate(inputs, engine)
    scales = [1000.0, 1000.0, 1.0 / (1.0 - (3000 / 3002) ** 2)]
    expect = layerwise_update(comp.model, comp.profile, x, y, batches, list(depths), scales=scales)
    for name, value in expect.items():
        torch.testing.assert_close(update.grads[name], value, rtol=1e-12, atol=0)
    assert update.contributors.tolist() == [1, 1, 2]


# ==========================================================================================================
# Checkpoints of asynchronous runs are refused before anything is written
# ==========================================================================================================

@pytest.mark.parametrize("policy", ["fedasync", "fedbuff"])
def test_checkpoint_every_refused_for_asynchronous_policies(tmp_path, capsys, policy):
    from fedsim.cli import main

    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--quiet", "--checkpoint-every", "2",
            "--set", f'policy.name="{policy}"', "--set", "policy.duration_s=0.25", "--set", "policy.eval_every_s=0.125",
            "--set", "run.rounds=1000"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"fedsim: error: {path}: policy.name: checkpoints are supported for synchronous "
                           f"policies, not {policy}")
    assert not out.exists()
    # the same run without checkpoints is fine
    assert main([a for a in argv if a not in ("--checkpoint-every", "2")]) == 0
    assert '"completed"' in (out / "status.json").read_text()


# ==========================================================================================================
# partial and heterofl under non-ideal upload modes
# ==========================================================================================================
# partial: tiny model, float64, batch 4. Bytes per layer fc1 1952, fc2 160, fc3 400 (2512 in all): download
# 0.5 + 20096 / 20096 = 1.5 s; uplink 256 bit/s + 0.5 s: fc3 13 s, fc2 5.5 s, fc1 61.5 s (80 s in all).
# Per sample, forward / fc3 / fc2 / fc1 backward:
#   device 0 (128 FLOP/s): 4.625 / 1.25 / 0.5 / 3.75  (10.125 s)
#   device 1  (32 FLOP/s): 18.5 / 5 / 2 / 15           (40.5 s)
#   device 2  (16 FLOP/s): 37 / 10 / 4 / 30             (81 s)
# Deadline 211.5. A non-ideal plan budgets the whole upload: 211.5 - 1.5 - 80 = 130 s of compute:
# samples 4 (whole batch, 40.5 s), 3 (121.5 s) and 1 (81 s). Ideal: 210 s: 4, 4 (162 s) and 2 (162 s).
PARTIAL = TINY.replace("batch_size = 1", "batch_size = 4").replace("momentum = 0.5", "momentum = 0.0") \
    .replace("samples_per_device = 4", "samples_per_device = 8").replace('name = "wait"', 'name = "partial"\ndeadline_s = 211.5')
PARTIAL = PARTIAL.replace("speed_flops = 32\n", "speed_flops = 128\n", 1).replace("speed_flops = 64\n", "speed_flops = 32\n", 1)

PARTIAL_CASES = {
    "after_compute": ([4, 3, 1], 203.0, [
        # device 0: backward 20 -> 25 -> 27 -> 42, then the uploads one by one
        (0, "forward_end", -1, 20.0), (0, "backward_end", 0, 42.0),
        (0, "upload_start", 2, 42.0), (0, "upload_end", 2, 55.0), (0, "upload_end", 1, 60.5), (0, "upload_end", 0, 122.0),
        # device 1: 3 samples: forward 1.5 + 55.5, backward 15 / 6 / 45
        (1, "forward_end", -1, 57.0), (1, "backward_end", 2, 72.0), (1, "backward_end", 1, 78.0),
        (1, "backward_end", 0, 123.0), (1, "upload_end", 2, 136.0), (1, "upload_end", 1, 141.5), (1, "upload_end", 0, 203.0),
        # device 2: 1 sample
        (2, "forward_end", -1, 38.5), (2, "backward_end", 0, 82.5), (2, "upload_end", 0, 162.5)]),
    "streaming": ([4, 3, 1], 184.5, [
        # each layer goes on the uplink when its backward ends, or when the uplink frees up
        (0, "upload_start", 2, 25.0), (0, "upload_end", 2, 38.0), (0, "upload_start", 1, 38.0),
        (0, "upload_end", 1, 43.5), (0, "upload_start", 0, 43.5), (0, "upload_end", 0, 105.0),
        (1, "upload_start", 2, 72.0), (1, "upload_end", 2, 85.0), (1, "upload_end", 1, 90.5),
        (1, "upload_start", 0, 123.0), (1, "upload_end", 0, 184.5),
        (2, "upload_end", 2, 61.5), (2, "upload_end", 1, 67.0), (2, "upload_start", 0, 82.5), (2, "upload_end", 0, 144.0)]),
    "ideal": ([4, 4, 2], 163.5, [(1, "forward_end", -1, 75.5), (1, "backward_end", 0, 163.5), (2, "backward_end", 0, 163.5)]),
}


def _local_step(model, x, y, idx, lr, width_model=None):
    """Naive device: a float64 copy of the global model (or of its leading slice), one plain SGD step."""
    net = copy.deepcopy(width_model if width_model is not None else model).double()
    glob = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(glob[n][tuple(slice(0, s) for s in p.shape)])
    net.zero_grad()
    F.cross_entropy(net(x[torch.from_numpy(idx)].double()), y[torch.from_numpy(idx)]).backward()
    return {n: (p - lr * p.grad).detach() for n, p in net.named_parameters()}


def _entrywise_mean(model, locals_, weights):
    """New global model: each entry the weighted mean over the local models holding it, else unchanged."""
    out = {}
    for n, g in model.named_parameters():
        total, wsum = torch.zeros_like(g, dtype=torch.float64), torch.zeros_like(g, dtype=torch.float64)
        for local, w in zip(locals_, weights):
            idx = tuple(slice(0, s) for s in local[n].shape)
            total[idx] += w * local[n]
            wsum[idx] += w
        out[n] = torch.where(wsum > 0, total / torch.where(wsum > 0, wsum, 1.0), g.detach().double())
    return out


def _assert_model(out, expect):
    final = _model(out)
    for n, v in expect.items():
        torch.testing.assert_close(final[n], v, rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode", list(PARTIAL_CASES))
def test_partial_plans_the_upload_in_non_ideal_modes(tmp_path, mode):
    from fedsim.sim.build import build_components

    samples, end_at, events = PARTIAL_CASES[mode]
    overrides = [f'network.upload_mode="{mode}"', "run.rounds=1"]
    out = run(tmp_path, *overrides, text=PARTIAL)
    got = set(_events(out))
    assert set(events) <= got
    assert table(out, "rounds")["end_s"] == [end_at]
    dev = _device_rows(out)
    assert [dev[d]["samples"] for d in range(3)] == samples
    assert [(dev[d]["status"], dev[d]["depth"]) for d in range(3)] == [("complete", 3)] * 3
    if mode != "ideal":
        assert [dev[d]["upload_s"] for d in range(3)] == [80.0] * 3
    # the update: FedAvg of each device's step on the first `samples` of its batch, weighted by samples
    scn = scenario(*overrides, text=PARTIAL)
    comp = build_components(scn)
    batches = _round_batches(scn, comp)
    x, y = comp.dataset.x_train, comp.dataset.y_train
    locals_ = [_local_step(comp.model, x, y, batches[d][0][:samples[d]], 0.1) for d in range(3)]
    _assert_model(out, _entrywise_mean(comp.model, locals_, samples))


# heterofl: mlp, float64, batch 1, widths { slow = 0.5 }, latency 0, uplinks 2048 bit/s.
#   fast (width 1, 1024 FLOP/s, downlink 169600): download 21200 B in 1 s; forward 5184 / 1024 = 5.0625;
#     backward fc3 0.625, fc2 2, fc1 3.75 (ends 6.6875, 8.6875, 12.4375); uploads fc3 10880 bits 5.3125 s,
#     fc2 33792 bits 16.5 s, fc1 124928 bits 61 s.
#   slow (width 1/2, 256 FLOP/s, downlink 76928): download 9616 B in 1 s; forward 2336 / 256 = 9.125;
#     backward 1.25, 2, 7.5 (ends 11.375, 13.375, 20.875); uploads 2.8125, 4.25, 30.5 s.
# Deadline 92.
HETERO = """
[run]
name = "hetero"
seed = 0
rounds = 1

[model]
name = "mlp"
dtype = "float64"

[data]
name = "synthetic"
samples_per_device = 4
test_samples_per_device = 2

[training]
batch_size = 1
lr = 0.1

[[fleet.classes]]
name = "fast"
count = 1
speed_flops = 1024
downlink_bps = 169600
uplink_bps = 2048

[[fleet.classes]]
name = "slow"
count = 1
speed_flops = 256
downlink_bps = 76928
uplink_bps = 2048

[policy]
name = "heterofl"
widths = { slow = 0.5 }
deadline_s = 92.0
"""

HETERO_CASES = {
    # after_compute: fast plans 2 layers (12 and 30.5 s fit, 95.25 does not), stops its backward after fc2 and
    # uploads fc3 (8.6875 -> 14) and fc2 (-> 30.5); heterofl keeps only whole models: slow alone counts
    "after_compute": (58.4375, [2, 3], [1], [
        (0, "backward_end", 1, 8.6875), (0, "upload_start", 2, 8.6875), (0, "upload_end", 2, 14.0),
        (0, "upload_start", 1, 14.0), (0, "upload_end", 1, 30.5),
        (1, "download_end", -1, 1.0), (1, "backward_end", 0, 20.875), (1, "upload_end", 2, 23.6875),
        (1, "upload_end", 1, 27.9375), (1, "upload_end", 0, 58.4375)]),
    # streaming: fast fc3 6.6875 -> 12, fc2 12 -> 28.5, fc1 28.5 -> 89.5 (in time); slow fc3 11.375 -> 14.1875,
    # fc2 -> 18.4375, fc1 20.875 -> 51.375: both whole models count
    "streaming": (89.5, [3, 3], [0, 1], [
        (0, "upload_start", 2, 6.6875), (0, "upload_end", 2, 12.0), (0, "upload_end", 1, 28.5),
        (0, "backward_end", 0, 12.4375), (0, "upload_start", 0, 28.5), (0, "upload_end", 0, 89.5),
        (1, "upload_end", 2, 14.1875), (1, "upload_start", 1, 14.1875), (1, "upload_end", 1, 18.4375),
        (1, "upload_start", 0, 20.875), (1, "upload_end", 0, 51.375)]),
}


@pytest.mark.parametrize("mode", list(HETERO_CASES))
def test_heterofl_under_non_ideal_upload_modes(tmp_path, mode):
    from fedsim.sim.build import build_components
    from fedsim.learn.models import build_model

    end_at, depths, members, events = HETERO_CASES[mode]
    overrides = [f'network.upload_mode="{mode}"']
    out = run(tmp_path, *overrides, text=HETERO)
    got = _events(out)
    assert set(events) <= set(got)
    if mode == "after_compute":       # fast never computes fc1's backward
        assert not any(d == 0 and e == "backward_end" and l == 0 for d, e, l, _ in got)
    assert table(out, "rounds")["end_s"] == [end_at]
    dev = _device_rows(out)
    assert [dev[d]["depth"] for d in range(2)] == depths
    assert dev[1]["download_s"] == 1.0 and dev[0]["download_s"] == 1.0
    scn = scenario(*overrides, text=HETERO)
    comp = build_components(scn)
    batches = _round_batches(scn, comp)
    x, y = comp.dataset.x_train, comp.dataset.y_train
    half = build_model("mlp", comp.dataset.input_shape, 10, generator=torch.Generator(), width=0.5, dtype=torch.float64)
    locals_ = [_local_step(comp.model, x, y, batches[d][0], 0.1, None if d == 0 else half) for d in members]
    expect = _entrywise_mean(comp.model, locals_, [1.0] * len(members))
    _assert_model(out, expect)
    if members == [1]:     # entries only the fast device holds stay exactly as they were
        init = dict(comp.model.named_parameters())
        assert torch.equal(_model(out)["fc1.weight"][16:], init["fc1.weight"][16:].detach())


# ==========================================================================================================
# data.partition and training.grad_path, from a scenario file
# ==========================================================================================================

def _mnist_file(tmp_path, mnist_dir, data_lines: str, name="s.toml"):
    text = BASE_TOML.replace('name = "synthetic"\nsamples_per_device = 40\ntest_samples_per_device = 10',
                             f'name = "mnist"\ndir = {str(mnist_dir)!r}\nsamples_per_device = 200\n{data_lines}')
    path = tmp_path / name
    path.write_text(text)
    return path


def _label_shares(comp):
    labels = comp.dataset.y_train.numpy()
    part = comp.partition
    return np.stack([np.bincount(labels[part.device_indices(k)], minlength=10) / len(part.device_indices(k))
                     for k in range(part.n_devices)])


def test_dirichlet_partition_from_a_scenario_file(tmp_path, mnist_dir, monkeypatch):
    import functools

    import fedsim.learn.data
    from fedsim.sim.build import build_components
    from fedsim.learn.data import partition_dirichlet
    from fedsim.spec.scenario import load_scenario

    monkeypatch.setattr(fedsim.learn.data, "load_mnist", functools.cache(fedsim.learn.data.load_mnist))   # read MNIST once

    skewed = build_components(load_scenario(_mnist_file(tmp_path, mnist_dir, 'partition = "dirichlet"\ndirichlet_alpha = 0.05')))
    iid = build_components(load_scenario(_mnist_file(tmp_path, mnist_dir, 'partition = "iid"', name="iid.toml")))
    # exactly the partition of Dirichlet(0.05) drawn from the partition's own stream (child 1 of the seed)
    rng = np.random.default_rng(np.random.SeedSequence(3).spawn(4)[1])
    labels = skewed.dataset.y_train.numpy()
    want = partition_dirichlet(labels, 8, 200, 0.05, 10, rng)
    for k in range(8):
        np.testing.assert_array_equal(skewed.partition.device_indices(k), want.device_indices(k))
    # alpha 0.05 gives devices nearly one class each; iid gives every device about 10% of each
    top_skewed = _label_shares(skewed).max(axis=1)
    top_iid = _label_shares(iid).max(axis=1)
    assert top_skewed.mean() > 0.7 and top_iid.max() < 0.25
    # a different alpha is a different partition
    other = build_components(load_scenario(_mnist_file(tmp_path, mnist_dir, 'partition = "dirichlet"\ndirichlet_alpha = 100.0', name="a100.toml")))
    assert _label_shares(other).max(axis=1).max() < 0.3


@pytest.mark.parametrize("path,used", [("loop", "_loop_sums"), ("vmap", "_vmap_sums"), ("grouped", "_grouped_sums"),
                                       ("auto", "_grouped_sums")])
def test_grad_path_from_a_scenario_file_is_the_path_used(tmp_path, monkeypatch, path, used):
    from fedsim.cli import main
    from fedsim.learn.grads import GradientEngine

    calls = []
    for name in ("_loop_sums", "_vmap_sums", "_grouped_sums"):
        original = getattr(GradientEngine, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(GradientEngine, name, spy)
    scn_file = tmp_path / "s.toml"
    scn_file.write_text(BASE_TOML.replace("momentum = 0.5", f'momentum = 0.5\ngrad_path = "{path}"'))
    assert main(["run", str(scn_file), "--out", str(tmp_path / "out"), "--quiet", "--set", "run.rounds=2"]) == 0
    assert calls == [used, used]
