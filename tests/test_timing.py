"""Simulated timestamps of a 3-device, 3-layer fleet, computed by hand.

Model tests.helper_models:tiny on 60 synthetic features: forward FLOPs per sample 480 + 32 + 80 = 592;
backward fc3 160, fc2 64, fc1 480. 314 float32 parameters = 1256 bytes = 10048 bits.
Batch 1. Downlink 10048 bit/s and latency 0.5 s: download ends at 1.5 s.
Device 0: 32 FLOP/s, device 1: 64, device 2: 16. All numbers are exact in binary floating point.
"""

from __future__ import annotations



from conftest import run, table

TEXT = """
[run]
name = "timing"
seed = 0
rounds = 2

[model]
name = "tests.helper_models:tiny"

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
downlink_bps = 10048
uplink_bps = 128
latency_s = 0.5
power_compute_w = 2
power_rx_w = 1
power_tx_w = 0.5
power_idle_w = 0.25
""" for name, speed in (("a", 32), ("b", 64), ("c", 16))) + """
[policy]
name = "salf"
deadline_s = 30
"""


def events_of(run_dir, round_):
    ev = table(run_dir, "events")
    return [(d, e, l, t) for r, d, e, l, t in zip(ev["round"], ev["device"], ev["event"], ev["layer"], ev["time_s"])
            if r == round_]


def test_profile_flops_are_the_hand_values(tmp_path):
    from conftest import scenario
    from fedsim.sim.build import build_components

    prof = build_components(scenario(text=TEXT)).profile
    assert [(l.fwd_flops_per_sample, l.bwd_flops_per_sample) for l in prof.layers] == [(480, 480), (32, 64), (80, 160)]
    assert prof.total_bytes == 1256


def test_ideal_mode_timestamps(tmp_path):
    out = run(tmp_path, text=TEXT)
    expected = {
        (-1, "round_start", -1, 0.0),
        (0, "download_start", -1, 0.0), (0, "download_end", -1, 1.5), (0, "forward_end", -1, 20.0),
        (0, "backward_end", 2, 25.0), (0, "backward_end", 1, 27.0), (0, "cut", 0, 30.0),
        (1, "download_start", -1, 0.0), (1, "download_end", -1, 1.5), (1, "forward_end", -1, 10.75),
        (1, "backward_end", 2, 13.25), (1, "backward_end", 1, 14.25), (1, "backward_end", 0, 21.75),
        (2, "download_start", -1, 0.0), (2, "download_end", -1, 1.5), (2, "cut", -1, 30.0),
        (-1, "deadline", -1, 30.0), (-1, "round_end", -1, 30.0),
    }
    got = events_of(out, 0)
    assert sorted(got) == sorted(expected)
    assert [t for *_, t in got] == sorted(t for *_, t in got), "events are written in time order"
    # round 1 starts at the deadline of round 0 and repeats the same offsets
    assert sorted(events_of(out, 1)) == sorted((d, e, l, t + 30.0) for d, e, l, t in expected)

    dev = table(out, "devices")
    r0 = {d: i for i, (d, r) in enumerate(zip(dev["device"], dev["round"])) if r == 0}
    assert [dev["depth"][r0[d]] for d in range(3)] == [2, 3, 0]
    assert [dev["status"][r0[d]] for d in range(3)] == ["partial", "complete", "nothing"]
    assert [dev["compute_s"][r0[d]] for d in range(3)] == [28.5, 20.25, 28.5]
    assert [dev["idle_s"][r0[d]] for d in range(3)] == [0.0, 8.25, 0.0]
    assert [dev["energy_j"][r0[d]] for d in range(3)] == [1.5 + 57.0, 1.5 + 40.5 + 2.0625, 1.5 + 57.0]
    rounds = table(out, "rounds")
    assert rounds["start_s"] == [0.0, 30.0] and rounds["end_s"] == [30.0, 60.0]
    assert rounds["contributors"][0] == [1, 2, 2]


def test_streaming_uploads_queue_on_the_uplink(tmp_path):
    # uplink 128 bit/s + 0.5 s latency: fc3 (200 B) 13 s, fc2 (80 B) 5.5 s, fc1 (976 B) 61.5 s
    out = run(tmp_path, "network.upload_mode=\"streaming\"", text=TEXT)
    got = set(events_of(out, 0))
    assert {(1, "upload_start", 2, 13.25), (1, "upload_end", 2, 26.25), (1, "upload_start", 1, 26.25),
            (1, "cut", 1, 30.0), (0, "upload_start", 2, 25.0), (0, "cut", 2, 30.0)} <= got
    assert (1, "backward_end", 0, 21.75) in got       # computing goes on while the uplink is busy
    dev = table(out, "devices")
    assert dev["depth"][:3] == [0, 1, 0]
    assert dev["upload_s"][:3] == [5.0, 16.75, 0.0]


def test_after_compute_stops_backward_to_upload_in_time(tmp_path):
    out = run(tmp_path, "network.upload_mode=\"after_compute\"", text=TEXT)
    got = events_of(out, 0)
    dev1 = [(e, l, t) for d, e, l, t in got if d == 1]
    assert dev1 == [("download_start", -1, 0.0), ("download_end", -1, 1.5), ("forward_end", -1, 10.75),
                    ("backward_end", 2, 13.25), ("upload_start", 2, 13.25), ("upload_end", 2, 26.25)]
    dev = table(out, "devices")
    assert dev["depth"][:3] == [0, 1, 0]


def test_upload_modes_deliver_in_order_ideal_streaming_after_compute(tmp_path):
    depth = {}
    for mode in ("ideal", "streaming", "after_compute"):
        out = run(tmp_path, f'network.upload_mode="{mode}"', "run.rounds=4", "policy.deadline_s=0.15",
                  "fleet.classes[1].uplink_bps=3e5", name=mode)
        depth[mode] = sum(table(out, "devices")["depth"])
    assert depth["ideal"] >= depth["streaming"] >= depth["after_compute"]
    assert depth["ideal"] > depth["after_compute"]


def test_wait_has_no_deadline(tmp_path):
    out = run(tmp_path, "policy.name=\"wait\"", text=TEXT)
    rounds = table(out, "rounds")
    # device 2 is the slowest: 1.5 + 37 + 10 + 4 + 30 = 82.5
    assert rounds["end_s"] == [82.5, 165.0]
    assert "deadline" not in table(out, "events")["event"]


def test_a_phase_ending_exactly_at_the_deadline_counts(tmp_path):
    # deadline 27 s: device 0's fc2 backward ends at 27 exactly and counts; fc1 cannot start (a cut with
    # nothing spent); device 2 is still in its forward pass (due at 38.5)
    out = run(tmp_path, "policy.deadline_s=27", "run.rounds=1", text=TEXT)
    got = events_of(out, 0)
    assert [(e, l, t) for d, e, l, t in got if d == 0][-2:] == [("backward_end", 1, 27.0), ("cut", 0, 27.0)]
    assert (2, "cut", -1, 27.0) in got and (-1, "deadline", -1, 27.0) in got
    ev = table(out, "events")
    assert [j for d, e, j in zip(ev["device"], ev["event"], ev["energy_j"]) if d == 0 and e == "cut"] == [0.0]
    dev = table(out, "devices")
    assert dev["depth"] == [2, 3, 0] and dev["compute_s"][0] == 18.5 + 5.0 + 2.0
