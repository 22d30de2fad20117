"""States of one device's round (fedsim.sim.device_round.DeviceRound) with hand-computed simulated timestamps.

The fleet is tests/test_timing.py's TEXT (3 devices, 3 layers, private links, batch 1). Recap of its numbers:

* layers in forward order: fc1 (index 0, 244 params = 976 B), fc2 (1, 20 params = 80 B),
  fc3 (2, 50 params = 200 B); the backward order is fc3, fc2, fc1.
* download: 0.5 s latency + 10048 bits at 10048 bit/s = 1.5 s, for every device.
* forward 592 FLOPs; backward fc3 160, fc2 64, fc1 480 FLOPs.
    device 0 (class a,  32 FLOP/s): forward 18.5 s -> ends 20.0; fc3 5 s -> 25.0; fc2 2 s -> 27.0; fc1 15 s -> 42.0
    device 1 (class b,  64 FLOP/s): forward 9.25 s -> 10.75;    fc3 2.5 s -> 13.25; fc2 1 s -> 14.25; fc1 7.5 s -> 21.75
    device 2 (class c,  16 FLOP/s): forward 37 s -> 38.5;       fc3 10 s -> 48.5;  fc2 4 s -> 52.5;  fc1 30 s -> 82.5
* upload of a layer = 0.5 s latency + bits / uplink_bps:
    128 bit/s (TEXT):  fc3 1600/128 = 12.5 -> 13 s;     fc2 640/128 = 5 -> 5.5 s;    fc1 7808/128 = 61 -> 61.5 s
    256 bit/s:         fc3 6.25 -> 6.75 s;              fc2 2.5 -> 3 s;              fc1 30.5 -> 31 s
    512 bit/s:         fc3 3.125 -> 3.625 s;            fc2 1.25 -> 1.75 s;          fc1 15.25 -> 15.75 s
    1024 bit/s:        fc3 1.5625 -> 2.0625 s;          fc2 0.625 -> 1.125 s;        fc1 7.625 -> 8.125 s
* power: power_rx_w = 1, power_compute_w = 2, power_tx_w = 0.5, power_idle_w = 0.25 (W); a phase's energy is
  its power times its seconds.

Every number above is exact in binary floating point, so the tests compare with ==.
"""

from __future__ import annotations

import pytest
import simpy

from conftest import run, scenario, table
from test_timing import TEXT

STREAMING = 'network.upload_mode="streaming"'
AFTER_COMPUTE = 'network.upload_mode="after_compute"'


def _dev(out, round_=0):
    """devices.parquet rows of one round as {device: {column: value}}."""
    dev = table(out, "devices")
    return {dev["device"][i]: {k: v[i] for k, v in dev.items()}
            for i in range(len(dev["device"])) if dev["round"][i] == round_}


def _rows(out, device, round_=0):
    """(event, layer, time_s, bytes, energy_j) of one device in one round, in trace order."""
    ev = table(out, "events")
    return [(e, l, t, b, j) for r, d, e, l, t, b, j in
            zip(ev["round"], ev["device"], ev["event"], ev["layer"], ev["time_s"], ev["bytes"], ev["energy_j"])
            if r == round_ and d == device]


# -- 1. streaming: churn while the uplink is busy and the backward pass is still running --------------------

def test_streaming_churn_accounts_both_unfinished_lanes(tmp_path):
    # deadline 100 (no cut before the churn), device 0 online on [0, 40).
    # device 0, streaming, uplink 128 bit/s:
    #   compute lane: download 0 -> 1.5 (energy 1 W x 1.5 = 1.5), forward -> 20 (2 x 18.5 = 37),
    #                 fc3 backward -> 25 (2 x 5 = 10), fc2 -> 27 (2 x 2 = 4), fc1 27 -> 42 (would end at 42)
    #   uplink lane:  fc3 25 -> 38 (arrives: depth 1, 0.5 x 13 = 6.5, 200 B), fc2 38 -> 43.5 (would arrive at 43.5)
    # at 40 the device leaves: compute lane was in fc1 (layer 0) for 40 - 27 = 13 s -> offline row, 2 x 13 = 26 J;
    # uplink lane was sending fc2 (layer 1) for 40 - 38 = 2 s -> offline row, 0.5 x 2 = 1 J.
    churn = 'fleet.classes[0].availability={ on_s = 40, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, STREAMING, "policy.deadline_s=100", "run.rounds=1", text=TEXT)
    assert _rows(out, 0) == [
        ("download_start", -1, 0.0, 0, 0.0),
        ("download_end", -1, 1.5, 1256, 1.5),
        ("forward_end", -1, 20.0, 0, 37.0),
        ("backward_end", 2, 25.0, 0, 10.0),
        ("upload_start", 2, 25.0, 0, 0.0),
        ("backward_end", 1, 27.0, 0, 4.0),
        ("upload_end", 2, 38.0, 200, 6.5),
        ("upload_start", 1, 38.0, 0, 0.0),
        ("offline", 0, 40.0, 0, 26.0),          # the compute lane first, then the uplink
        ("offline", 1, 40.0, 0, 1.0),
    ]
    d = _dev(out)[0]
    assert d["status"] == "offline"
    assert d["depth"] == 1                      # fc3 arrived; fc2 was still on the way
    assert d["layers_computed"] == 2            # fc3 and fc2; fc1 was unfinished
    assert d["download_s"] == 1.5
    assert d["compute_s"] == 18.5 + 5.0 + 2.0 + 13.0      # 38.5
    assert d["upload_s"] == 13.0 + 2.0                     # 15
    # the others: device 1 (uplink 128) uploads fc3 13.25 -> 26.25, fc2 -> 31.75, fc1 -> 93.25 (complete);
    # device 2 uploads fc3 48.5 -> 61.5, fc2 -> 67; fc1 (backward ends 82.5) would arrive at 144: cut at 100
    rounds = table(out, "rounds")
    assert rounds["end_s"] == [100.0]
    # idle: 100 - 40 = 60 s at 0.25 W; energy 1 x 1.5 + 2 x 38.5 + 0.5 x 15 + 0.25 x 60 = 101
    assert d["idle_s"] == 60.0
    assert d["energy_j"] == 1.5 + 77.0 + 7.5 + 15.0
    # the event energies of device 0 add up to its phase energies
    assert sum(j for *_, j in _rows(out, 0)) == d["energy_download_j"] + d["energy_compute_j"] + d["energy_upload_j"]
    # device 0's delivered fc3 still counts: contributors per layer (forward order) fc1 [1], fc2 [1, 2], fc3 [0, 1, 2]
    assert [_dev(out)[i]["depth"] for i in range(3)] == [1, 3, 2]
    assert rounds["contributors"] == [[1, 2, 3]]


# -- 2. streaming: the compute lane ends first, the round ends with the last upload -------------------------

def test_streaming_round_of_a_device_ends_with_its_last_upload(tmp_path):
    # deadline 60; device 1 (class b) has a 256 bit/s uplink: fc3 6.75 s, fc2 3 s, fc1 31 s.
    #   backward: fc3 ends 13.25, fc2 14.25, fc1 21.75 (the compute lane ends at 21.75)
    #   uplink:   fc3 13.25 -> 20.0; fc2 (queued at 14.25) 20.0 -> 23.0; fc1 (queued at 21.75) 23.0 -> 54.0
    # at 21.75 the uplink is busy with fc2: the device's round goes on until fc1 arrives at 54.
    out = run(tmp_path, STREAMING, "policy.deadline_s=60", "run.rounds=1", "fleet.classes[1].uplink_bps=256",
              text=TEXT)
    assert [(e, l, t) for e, l, t, _, _ in _rows(out, 1)] == [
        ("download_start", -1, 0.0), ("download_end", -1, 1.5), ("forward_end", -1, 10.75),
        ("backward_end", 2, 13.25), ("upload_start", 2, 13.25),
        ("backward_end", 1, 14.25),
        ("upload_end", 2, 20.0), ("upload_start", 1, 20.0),
        ("backward_end", 0, 21.75),
        ("upload_end", 1, 23.0), ("upload_start", 0, 23.0),
        ("upload_end", 0, 54.0),
    ]
    # upload energies 0.5 W x 6.75, 3, 31 and bytes 200, 80, 976
    assert [(b, j) for e, _, _, b, j in _rows(out, 1) if e == "upload_end"] == [(200, 3.375), (80, 1.5), (976, 15.5)]
    # the others are cut at 60: device 0 (uplink 128) fc3 25 -> 38, fc2 38 -> 43.5, fc1 from 43.5 (due 105):
    # cut after 16.5 s (0.5 x 16.5 = 8.25 J); device 2: uplink fc3 48.5 -> 61.5 cut after 11.5 s (5.75 J),
    # compute fc1 52.5 -> 82.5 cut after 7.5 s (15 J)
    assert _rows(out, 0)[-1] == ("cut", 0, 60.0, 0, 8.25)
    assert sorted(r for r in _rows(out, 2) if r[0] == "cut") == [("cut", 0, 60.0, 0, 15.0), ("cut", 2, 60.0, 0, 5.75)]
    dev = _dev(out)
    assert [dev[i]["status"] for i in range(3)] == ["partial", "complete", "nothing"]
    assert [dev[i]["depth"] for i in range(3)] == [2, 3, 0]
    assert [dev[i]["layers_computed"] for i in range(3)] == [3, 3, 2]
    assert table(out, "rounds")["end_s"] == [60.0]
    d = dev[1]
    assert d["compute_s"] == 9.25 + 2.5 + 1.0 + 7.5           # 20.25: busy computing until 21.75 only
    assert d["upload_s"] == 6.75 + 3.0 + 31.0                  # 40.75
    assert d["idle_s"] == 60.0 - 54.0                          # idle from its last upload's arrival, not 21.75
    assert d["energy_j"] == 1.5 + 2 * 20.25 + 0.5 * 40.75 + 0.25 * 6.0      # 63.875
    assert [dev[i]["upload_s"] for i in (0, 2)] == [13.0 + 5.5 + 16.5, 11.5]
    assert [dev[i]["compute_s"] for i in (0, 2)] == [18.5 + 5.0 + 2.0 + 15.0, 37.0 + 10.0 + 4.0 + 7.5]


def test_streaming_without_deadline_waits_for_the_last_upload_not_the_last_backward(tmp_path):
    # policy wait (no deadline); uplinks: a 1024, b 128 (TEXT), c 1024 bit/s.
    #   device 0: uplink fc3 25 -> 27.0625, fc2 27.0625 -> 28.1875, fc1 42 -> 50.125
    #   device 1: uplink fc3 13.25 -> 26.25, fc2 26.25 -> 31.75, fc1 31.75 -> 93.25 (its compute ended at 21.75)
    #   device 2: uplink fc3 48.5 -> 50.5625, fc2 52.5 -> 53.625, fc1 82.5 -> 90.625
    # the round ends with device 1's last arrival, 93.25, 71.5 s after its backward pass ended
    out = run(tmp_path, STREAMING, 'policy.name="wait"', "run.rounds=1", "fleet.classes[0].uplink_bps=1024",
              "fleet.classes[2].uplink_bps=1024", text=TEXT)
    assert table(out, "rounds")["end_s"] == [93.25]
    ends = {d: max(t for _, _, t, _, _ in _rows(out, d)) for d in range(3)}
    assert ends == {0: 50.125, 1: 93.25, 2: 90.625}
    dev = _dev(out)
    assert [dev[i]["status"] for i in range(3)] == ["complete"] * 3
    assert [dev[i]["idle_s"] for i in range(3)] == [93.25 - 50.125, 0.0, 93.25 - 90.625]
    assert [dev[i]["upload_s"] for i in range(3)] == [2.0625 + 1.125 + 8.125, 13.0 + 5.5 + 61.5, 2.0625 + 1.125 + 8.125]
    # (the idle uplink of device 2 picks up each layer at the instant its backward phase ends)
    assert [r[:3] for r in _rows(out, 2) if r[0] in ("upload_start", "upload_end")] == [
        ("upload_start", 2, 48.5), ("upload_end", 2, 50.5625), ("upload_start", 1, 52.5), ("upload_end", 1, 53.625),
        ("upload_start", 0, 82.5), ("upload_end", 0, 90.625)]


# -- 3. after_compute: churn during an upload ---------------------------------------------------------------

def test_after_compute_churn_during_an_upload(tmp_path):
    # deadline 60. after_compute plans the deepest k whose backward + sequential uploads fit:
    #   device 1: compute ends 13.25, 14.25, 21.75; uploads cumulate 13, 18.5, 80
    #             -> 26.25 <= 60, 32.75 <= 60, 101.75 > 60: target 2
    #   device 0: 25 + 13 = 38, 27 + 18.5 = 45.5, 42 + 80 = 122: target 2
    #   device 2: 48.5 + 13 = 61.5 > 60: target 0 (nothing to compute after its forward pass)
    # device 1 computes fc3 (-> 13.25) and fc2 (-> 14.25) only, then uploads fc3 14.25 -> 27.25 (arrives),
    # fc2 27.25 -> 32.75; it leaves at 30, 2.75 s into fc2's upload (0.5 x 2.75 = 1.375 J).
    churn = 'fleet.classes[1].availability={ on_s = 30, off_s = 100, initial = "online" }'
    out = run(tmp_path, churn, AFTER_COMPUTE, "policy.deadline_s=60", "run.rounds=1", text=TEXT)
    assert _rows(out, 1) == [
        ("download_start", -1, 0.0, 0, 0.0),
        ("download_end", -1, 1.5, 1256, 1.5),
        ("forward_end", -1, 10.75, 0, 18.5),
        ("backward_end", 2, 13.25, 0, 5.0),
        ("backward_end", 1, 14.25, 0, 2.0),
        ("upload_start", 2, 14.25, 0, 0.0),
        ("upload_end", 2, 27.25, 200, 6.5),
        ("upload_start", 1, 27.25, 0, 0.0),
        ("offline", 1, 30.0, 0, 1.375),
    ]
    d = _dev(out)[1]
    assert d["status"] == "offline"
    assert d["depth"] == 1                         # only fc3 arrived
    assert d["layers_computed"] == 2
    assert d["compute_s"] == 9.25 + 2.5 + 1.0      # 12.75
    assert d["upload_s"] == 13.0 + 2.75            # 15.75: up to the leave time
    # device 0 uploads fc3 27 -> 40 and fc2 40 -> 45.5 and is done; device 2 has target 0 and ends after its
    # forward pass at 38.5; nobody is left at 45.5, so the round ends then, before the deadline
    assert table(out, "rounds")["end_s"] == [45.5]
    assert d["idle_s"] == 45.5 - 30.0
    assert d["energy_j"] == 1.5 + 2 * 12.75 + 0.5 * 15.75 + 0.25 * 15.5       # 38.75
    dev = _dev(out)
    assert [dev[i]["depth"] for i in range(3)] == [2, 1, 0]
    assert [dev[i]["status"] for i in range(3)] == ["partial", "offline", "nothing"]


# -- 4. quorum (overselect) in streaming mode ---------------------------------------------------------------

def test_overselect_quorum_stops_a_streaming_device_in_both_lanes(tmp_path):
    # overselect k = 2, fraction 1.5: ceil(1.5 x 2) = 3 devices selected, the round ends when 2 are done.
    # No deadline. Uplinks: a 512, b 256, c 128 (TEXT) bit/s.
    #   device 0: uplink fc3 25 -> 28.625, fc2 28.625 -> 30.375, fc1 (backward ends 42) 42 -> 57.75: done at 57.75
    #   device 1: uplink fc3 13.25 -> 20, fc2 20 -> 23, fc1 23 -> 54: done at 54
    #   device 2: uplink fc3 48.5 -> 61.5 (would arrive); compute fc2 48.5 -> 52.5, fc1 52.5 -> 82.5
    # at 57.75 the quorum is reached: device 2 is stopped in both lanes:
    #   compute lane, fc1 (layer 0): 57.75 - 52.5 = 5.25 s, 2 x 5.25 = 10.5 J
    #   uplink lane, fc3 (layer 2):  57.75 - 48.5 = 9.25 s, 0.5 x 9.25 = 4.625 J
    overrides = ['policy.name="overselect"', "policy.k=2", "policy.fraction=1.5", STREAMING, "run.rounds=1",
                 "fleet.classes[0].uplink_bps=512", "fleet.classes[1].uplink_bps=256"]
    out = run(tmp_path, *overrides, text=TEXT)
    assert table(out, "rounds")["end_s"] == [57.75]
    assert table(out, "rounds")["completed"] == [2]
    assert _rows(out, 2) == [
        ("download_start", -1, 0.0, 0, 0.0),
        ("download_end", -1, 1.5, 1256, 1.5),
        ("forward_end", -1, 38.5, 0, 74.0),
        ("backward_end", 2, 48.5, 0, 20.0),
        ("upload_start", 2, 48.5, 0, 0.0),
        ("backward_end", 1, 52.5, 0, 8.0),
        ("stopped", 0, 57.75, 0, 10.5),
        ("stopped", 2, 57.75, 0, 4.625),
    ]
    assert _rows(out, 0)[-1] == ("upload_end", 0, 57.75, 976, 0.5 * 15.75)
    assert _rows(out, 1)[-1] == ("upload_end", 0, 54.0, 976, 0.5 * 31.0)
    ev = table(out, "events")
    assert [(d, l, t) for d, e, l, t in zip(ev["device"], ev["event"], ev["layer"], ev["time_s"]) if e == "stopped"] \
        == [(2, 0, 57.75), (2, 2, 57.75)]
    assert max(ev["time_s"]) == 57.75 and "deadline" not in ev["event"]
    dev = _dev(out)
    assert [dev[i]["status"] for i in range(3)] == ["complete", "complete", "nothing"]
    assert [dev[i]["depth"] for i in range(3)] == [3, 3, 0]
    d = dev[2]
    assert d["layers_computed"] == 2
    assert d["compute_s"] == 37.0 + 10.0 + 4.0 + 5.25          # 56.25
    assert d["upload_s"] == 9.25
    assert d["idle_s"] == 0.0
    assert d["energy_j"] == 1.5 + 2 * 56.25 + 0.5 * 9.25       # 118.625
    assert [dev[i]["idle_s"] for i in (0, 1)] == [0.0, 57.75 - 54.0]


# -- 5. DeviceRound driven directly ------------------------------------------------------------------------

@pytest.fixture
def direct(tmp_path):
    """(env, setup, trace) of round 0 of TEXT (salf, deadline 30, ideal uploads), built by the server."""
    from fedsim.sim.build import build_components
    from fedsim.sim.server import Server
    from fedsim.output.trace import TraceWriter

    scn = scenario("run.rounds=1", text=TEXT)
    comp = build_components(scn)
    trace = TraceWriter(tmp_path, {})
    server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
    env = simpy.Environment()
    setup = server.setup_round(0, env)
    yield env, setup, trace
    trace.close(complete=False)


def _trace_rows(trace):
    c = trace.events.columns
    return list(zip(c["device"], c["event"], c["layer"], c["time_s"], c["energy_j"]))


def test_interrupting_an_ended_device_round_raises(direct):
    from fedsim.sim.engine import DeviceRound, StopCause

    env, setup, trace = direct
    assert setup.plan.devices.tolist() == [0, 1, 2]
    ended = []
    # device 1 completes at 21.75 (see test_timing); device 2 is cut at the deadline 30, in its forward pass
    done = DeviceRound(env, setup, 1, trace, ended.append, deadline_at=30.0)
    cut = DeviceRound(env, setup, 2, trace, ended.append, deadline_at=30.0)
    done.start()
    cut.start()
    env.run()
    assert ended == [done, cut]
    assert (done.out.done_at, done.out.depth, done.out.compute_s) == (21.75, 3, 20.25)
    assert (cut.out.done_at, cut.out.depth, cut.out.compute_s, cut.out.active_until_at) == (None, 0, 28.5, 30.0)
    n_events = len(trace.events.columns["event"])
    for device_round in (done, cut):
        for cause in (StopCause.OFFLINE, StopCause.QUORUM):
            with pytest.raises(RuntimeError, match=f"device {device_round.device}'s round has ended"):
                device_round.interrupt(cause)
        assert device_round.out.stopped is None
    assert ended == [done, cut]                         # on_end ran once each
    assert len(trace.events.columns["event"]) == n_events
    assert done.out.status(3).value == "complete" and cut.out.status(3).value == "nothing"


def test_interrupting_twice_raises(direct):
    from fedsim.sim.engine import DeviceRound, StopCause

    env, setup, trace = direct
    ended = []
    dr = DeviceRound(env, setup, 0, trace, ended.append, deadline_at=30.0)
    dr.start()
    env.run(until=10.0)                        # device 0 is in its forward pass (1.5 -> 20)
    dr.interrupt(StopCause.OFFLINE)
    with pytest.raises(RuntimeError):
        dr.interrupt(StopCause.QUORUM)
    assert dr.out.stopped is StopCause.OFFLINE
    assert ended == [dr]
    # forward pass for 10 - 1.5 = 8.5 s at 2 W
    assert _trace_rows(trace)[-1] == (0, "offline", -1, 10.0, 17.0)
    assert (dr.out.download_s, dr.out.compute_s, dr.out.active_until_at) == (1.5, 8.5, 10.0)


def test_interrupt_before_the_first_event_accounts_nothing(direct):
    from fedsim.sim.engine import DeviceRound, StopCause

    env, setup, trace = direct
    ended = []
    env.run(until=7.0)
    # never started: no phase under way, no event, zero seconds; active until the interrupt's instant
    idle = DeviceRound(env, setup, 0, trace, ended.append, deadline_at=37.0)
    idle.interrupt(StopCause.QUORUM)
    assert ended == [idle] and not idle.is_alive
    assert _trace_rows(trace) == []
    out = idle.out
    assert (out.download_s, out.compute_s, out.upload_s, out.depth, out.layers_computed) == (0.0, 0.0, 0.0, 0, 0)
    assert (out.active_until_at, out.done_at, out.stopped) == (7.0, None, StopCause.QUORUM)
    assert out.status(3).value == "nothing"

    # started and interrupted at the same instant, before its download event fires: a zero-second download
    # accounted as an `offline` row with no energy, and nothing more happens when the clock runs on
    dr = DeviceRound(env, setup, 1, trace, ended.append, deadline_at=37.0)
    dr.start()
    dr.interrupt(StopCause.OFFLINE)
    assert _trace_rows(trace) == [(1, "download_start", -1, 7.0, 0.0), (1, "offline", -1, 7.0, 0.0)]
    assert (dr.out.download_s, dr.out.compute_s, dr.out.active_until_at) == (0.0, 0.0, 7.0)
    assert dr.out.status(3).value == "offline"
    env.run()
    assert env.now == 7.0 + 1.5                 # the orphaned download timeout fired, calling nobody back
    assert len(_trace_rows(trace)) == 2
    assert ended == [idle, dr]


def test_interrupt_while_waiting_for_the_shared_deadline_leaves_no_cut(direct):
    from fedsim.sim.engine import DeviceRound, StopCause

    env, setup, trace = direct
    ended = []
    deadline = env.timeout(30.0)
    # device 2's forward pass (1.5 -> 38.5) overruns the deadline: from 1.5 it waits on the shared event
    dr = DeviceRound(env, setup, 2, trace, ended.append, deadline_at=30.0, deadline=deadline)
    other = DeviceRound(env, setup, 0, trace, ended.append, deadline_at=30.0, deadline=deadline)
    dr.start()
    other.start()
    env.timeout(10.0).callbacks.append(lambda _e: dr.interrupt(StopCause.OFFLINE))
    env.run()
    rows = [r for r in _trace_rows(trace) if r[0] == 2]
    # the forward phase for 10 - 1.5 = 8.5 s at 2 W; no `cut` when the deadline fires at 30
    assert rows == [(2, "download_start", -1, 0.0, 0.0), (2, "download_end", -1, 1.5, 1.5),
                    (2, "offline", -1, 10.0, 17.0)]
    assert (dr.out.compute_s, dr.out.active_until_at) == (8.5, 10.0)
    assert dr.was_cut is False                 # the deadline firing later does not cut an ended lane
    # device 0, waiting on the same event for fc1 (27 -> 42), is still cut at 30: 3 s at 2 W
    assert [r for r in _trace_rows(trace) if r[0] == 0][-1] == (0, "cut", 0, 30.0, 6.0)
    assert ended == [dr, other]


# -- a tie: a phase ends at the very instant the device leaves -------------------------------------------------

def test_a_phase_ending_exactly_when_the_device_leaves_counts(tmp_path):
    # device 0 (deadline 100) leaves exactly when one of its phases ends. The churn watcher reports a switch after
    # every other event due at that instant, so the phase is complete (as one ending exactly at the deadline is),
    # whichever phase it is; the next phase starts at that instant and is stopped at once (a 0 s, 0 J row).
    #   on_s = 1.5: the download ends at 1.5 -> download_end, then `offline` for the forward pass (layer -1)
    #   on_s = 25:  fc3's backward ends at 25 -> backward_end (ideal mode: depth 1), then `offline` for fc2 (layer 1)
    #   on_s = 38, streaming: the fc3 upload (25 -> 38) arrives at 38 -> depth 1; the uplink then starts fc2 at 38,
    #               the compute lane is 11 s into fc1 (27 -> 38: 2 x 11 = 22 J)
    cases = [(1.5, [], [("download_end", -1, 1.5, 10048 // 8, 1.5), ("offline", -1, 1.5, 0, 0.0)], 0),
             (25, [], [("backward_end", 2, 25.0, 0, 10.0), ("offline", 1, 25.0, 0, 0.0)], 1),
             (38, [STREAMING], [("upload_end", 2, 38.0, 200, 6.5), ("upload_start", 1, 38.0, 0, 0.0),
                                ("offline", 0, 38.0, 0, 22.0), ("offline", 1, 38.0, 0, 0.0)], 1)]
    for on_s, extra, last_rows, depth in cases:
        churn = f'fleet.classes[0].availability={{ on_s = {on_s}, off_s = 100, initial = "online" }}'
        out = run(tmp_path, churn, "policy.deadline_s=100", "run.rounds=1", *extra, name=f"leave_{on_s}", text=TEXT)
        rows = _rows(out, 0)
        assert rows[-len(last_rows):] == last_rows, on_s
        assert _dev(out)[0]["depth"] == depth and _dev(out)[0]["status"] == "offline"
