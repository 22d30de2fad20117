"""Asynchronous FL (fedasync, fedbuff): exact timestamps, staleness, naive float64 oracles, bounds, trace.

The tiny fleet is the one of test_timing.py in float64: model tests.helper_models:tiny on 60 synthetic
features, batch 1, forward 592 FLOPs, backward fc3 160, fc2 64, fc1 480 per sample; 314 parameters = 2512
bytes = 20096 bits, downloaded at 20096 bit/s after 0.5 s latency: 1.5 s. Uploads at 256 bit/s + 0.5 s:
fc3 13 s, fc2 5.5 s, fc1 61.5 s.
Device 0: 32 FLOP/s -> a job lasts 1.5 + 18.5 + 5 + 2 + 15 = 42 s; device 1: 64 -> 21.75 s;
device 2: 16 -> 82.5 s. All exact in binary floating point. With every device always training:

    time    21.75 42   43.5  65.25  82.5  84   87   108.75  126  130.5
    device  1     0    1     1      2     0    1    1       0    1
    version 0     0    1     3      0     2    4    7       6    8     (downloaded)
    server  0     1    2     3      4     5    6    7       8    9     (version at arrival)
    stale   0     1    1     0      4     3    2    0       2    1
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import simpy
import torch
import torch.nn.functional as F

from conftest import BASE_TOML, run, scenario, table

TINY = """
[run]
name = "tiny_async"
seed = 0
rounds = 100000

[model]
name = "tests.helper_models:tiny"
dtype = "float64"

[data]
name = "synthetic"
samples_per_device = 1
test_samples_per_device = 2

[training]
batch_size = 1
lr = 0.25
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
power_rx_w = 1
power_tx_w = 0.5
power_idle_w = 0.25
""" for name, speed in (("a", 32), ("b", 64), ("c", 16))) + """
[policy]
name = "fedasync"
duration_s = 140
eval_every_s = 50
staleness_exponent = 1
"""

ARRIVALS_AT = [21.75, 42.0, 43.5, 65.25, 82.5, 84.0, 87.0, 108.75, 126.0, 130.5]
ARRIVAL_DEVICES = [1, 0, 1, 1, 2, 0, 1, 1, 0, 1]
STALENESS = [0, 1, 1, 0, 4, 3, 2, 0, 2, 1]

# BASE_TOML (8 devices with random speeds and slowdowns, the paper MLP) made asynchronous, float64
ASYNC_BASE = ("policy.name=\"fedbuff\"", "policy.duration_s=0.25", "policy.eval_every_s=0.0625",
              "run.rounds=100000", "model.dtype=\"float64\"")


# -- helpers --------------------------------------------------------------------------------------

def jobs_from_events(run_dir):
    """Each job (in start order = job index) with its device, downloaded version, start and end times.

    A job starts at its download_start; it ends at its last backward_end (ideal mode: the update arrives
    then) or at a `stopped` event (the run ended first). `applied`: arrived and not discarded as too stale.
    """
    ev = table(run_dir, "events")
    jobs, current, ended = [], {}, {}
    for r, t, d, e, layer in zip(ev["round"], ev["time_s"], ev["device"], ev["event"], ev["layer"]):
        if e == "download_start":
            current[d] = len(jobs)
            jobs.append({"device": d, "version": r, "start": t, "end": None, "arrived": False, "applied": False})
        elif (e == "backward_end" and layer == 0) or e == "stopped":
            ended[d] = job = jobs[current.pop(d)]
            job["end"], job["arrived"] = t, e != "stopped"
            job["applied"] = job["arrived"]
        elif e == "update_discarded":
            ended[d]["applied"] = False
    return jobs


def rows_of(run_dir, name):
    t = table(run_dir, name)
    return [dict(zip(t, values)) for values in zip(*t.values())]


def float64_grad(model64, params, x, y):
    with torch.no_grad():
        for name, p in model64.named_parameters():
            p.copy_(params[name])
    model64.zero_grad()
    F.cross_entropy(model64(x.double()), y).backward()
    return {n: p.grad.detach().clone() for n, p in model64.named_parameters()}


def sgd_oracle(comp, updates, lr, momentum):
    """Naive float64 server: for (batch, version, weight) in arrival order, one SGD step on weight * g."""
    model64 = copy.deepcopy(comp.model).double()
    versions = [{n: p.detach().double().clone() for n, p in comp.model.named_parameters()}]
    buf = None
    x, y = comp.dataset.x_train, comp.dataset.y_train
    for batch, version, weight in updates:
        idx = torch.from_numpy(np.array(batch))
        g = {n: weight * v for n, v in float64_grad(model64, versions[version], x[idx], y[idx]).items()}
        buf = g if buf is None else {n: momentum * buf[n] + g[n] for n in g}
        versions.append({n: versions[-1][n] - lr * buf[n] for n in g})
    return versions


def manual_run(tmp_path, *overrides, text=TINY, before=None):
    """run_scenario by hand, to look at the server object afterwards; `before(env, server)` hooks in."""
    from fedsim.sim.async_engine import AsyncServer, serve_async
    from fedsim.sim.build import build_components
    from fedsim.output.trace import TraceWriter

    scn = scenario(*overrides, text=text)
    comp = build_components(scn)
    tmp_path.mkdir(parents=True, exist_ok=True)
    trace = TraceWriter(tmp_path, {})
    server = AsyncServer(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
    env = simpy.Environment()
    if before is not None:
        before(env, server)
    env.process(serve_async(env, server))
    env.run()
    trace.close()
    return server, env


def assert_models_close(run_dir, params):
    final = torch.load(run_dir / "model.pt")
    for name, value in params.items():
        torch.testing.assert_close(final[name], value, rtol=1e-10, atol=1e-12)


# -- tests ----------------------------------------------------------------------------------------

def test_fedasync_arrivals_staleness_and_weights_on_the_tiny_fleet(tmp_path):
    from fedsim.sim.build import build_components

    out = run(tmp_path, text=TINY)
    rounds = rows_of(out, "rounds")
    updates = [r for r in rounds if r["participants"] > 0]
    assert [r["end_s"] for r in updates] == ARRIVALS_AT
    assert [r["start_s"] for r in updates] == [0.0] + ARRIVALS_AT[:-1]
    assert [r["round"] for r in updates] == list(range(10))
    assert all(r["contributors"] == [1, 1, 1] and r["completed"] == 1 for r in updates)

    applied = [d for d in rows_of(out, "devices") if d["status"] == "complete"]
    assert [d["device"] for d in applied] == ARRIVAL_DEVICES
    jobs = sorted((j for j in jobs_from_events(out) if j["arrived"]), key=lambda j: j["end"])
    assert [j["end"] for j in jobs] == ARRIVALS_AT
    # staleness = update index it was applied in - version downloaded (events' round)
    assert [d["round"] - j["version"] for d, j in zip(applied, jobs)] == STALENESS

    # the global model is w <- w - lr * SGD-momentum((1 + tau)^-1 * g(w_v)), in arrival order
    scn = scenario(text=TINY)
    comp = build_components(scn)
    own = [comp.partition.device_indices(d) for d in range(3)]
    oracle = sgd_oracle(comp, [(own[d], j["version"], 1.0 / (1 + tau))
                               for d, j, tau in zip(ARRIVAL_DEVICES, jobs, STALENESS)], lr=0.25, momentum=0.5)
    assert_models_close(out, oracle[-1])

    # evaluations at 50 and 100 s, and at the stop (140 s), each on the model as it was then
    evals = [r for r in rounds if r["test_loss"] is not None]
    assert [(r["start_s"], r["end_s"], r["round"]) for r in evals] == [(50.0, 50.0, 3), (100.0, 100.0, 7),
                                                                        (140.0, 140.0, 10)]
    x_test, y_test = comp.dataset.x_test.double(), comp.dataset.y_test
    model64 = copy.deepcopy(comp.model).double()
    for r in evals:
        with torch.no_grad():
            for name, p in model64.named_parameters():
                p.copy_(oracle[r["round"]][name])
            loss = float(F.cross_entropy(model64(x_test), y_test))
        assert r["test_loss"] == pytest.approx(loss, rel=1e-10)


def test_energy_and_the_jobs_stopped_by_the_end_of_the_run(tmp_path):
    out = run(tmp_path, text=TINY)
    devices = rows_of(out, "devices")
    for d in devices:
        assert d["idle_s"] == 0.0
        assert d["energy_j"] == 1.0 * d["download_s"] + 2.0 * d["compute_s"] + 0.5 * d["upload_s"]
    # device 1 (64 FLOP/s): 1.5 s download at 1 W, 20.25 s compute at 2 W
    assert devices[0]["energy_j"] == 1.5 + 40.5
    stopped = [d for d in devices if d["status"] == "nothing"]
    # at 140 s: device 2 (from 82.5 s: 1.5 + 37 forward + 5 fc3 + 2 fc2, then 12 s into fc1),
    # device 0 (from 126 s: 1.5 + 12.5 s of forward), device 1 (from 130.5 s: 1.5 + 8 s of forward)
    assert sorted((d["device"], d["round"], d["layers_computed"], d["compute_s"]) for d in stopped) == [
        (0, 10, 0, 12.5), (1, 10, 0, 8.0), (2, 10, 2, 56.0)]
    ev = table(out, "events")
    assert sorted((d, t) for d, e, t in zip(ev["device"], ev["event"], ev["time_s"]) if e == "stopped") == [
        (0, 140.0), (1, 140.0), (2, 140.0)]
    rounds = rows_of(out, "rounds")
    assert sum(r["energy_j"] for r in rounds) == pytest.approx(sum(d["energy_j"] for d in devices))
    assert rounds[-1]["energy_j"] == pytest.approx(sum(d["energy_j"] for d in stopped))
    assert ev["time_s"] == sorted(ev["time_s"]), "events are written in time order"
    status = json.loads((out / "status.json").read_text())
    assert status["rounds_done"] == 10 and status["sim_time_s"] == 140.0


def test_history_bound_discards_and_records_stale_updates(tmp_path, monkeypatch):
    from fedsim.learn.grads import GradientEngine

    differentiated = []
    original = GradientEngine.layer_sums

    def counting(self, batches, depths):
        differentiated.extend(len(b) for b in batches)
        return original(self, batches, depths)

    monkeypatch.setattr(GradientEngine, "layer_sums", counting)
    server, _ = manual_run(tmp_path, "policy.max_staleness=1")
    assert server.peak_snapshots == 1 and server.history == {}
    rounds = rows_of(tmp_path, "rounds")
    applied_at = [r["end_s"] for r in rounds if r["participants"] > 0]
    assert applied_at == [21.75, 42.0, 43.5, 65.25, 87.0, 108.75, 130.5]
    # staleness 4, 2 and 2 > 1: discarded where they arrive, never differentiated
    assert len(differentiated) == len(applied_at)
    ev = table(tmp_path, "events")
    assert [(t, d, r) for t, d, e, r in zip(ev["time_s"], ev["device"], ev["event"], ev["round"])
            if e == "update_discarded"] == [(82.5, 2, 4), (84.0, 0, 4), (126.0, 0, 6)]
    discarded = [(d["device"], d["round"], d["depth"], d["layers_computed"]) for d in rows_of(tmp_path, "devices")
                 if d["status"] == "nothing" and d["layers_computed"] == 3]
    assert discarded == [(2, 4, 0, 3), (0, 4, 0, 3), (0, 6, 0, 3)]
    update_4 = next(r for r in rounds if r["round"] == 4 and r["participants"] > 0)
    assert update_4["delivered_any"] == 3 and update_4["participants"] == 1


def test_max_staleness_zero_keeps_no_snapshot(tmp_path):
    server, _ = manual_run(tmp_path, "policy.max_staleness=0")
    assert server.peak_snapshots == 0
    # only fresh updates count: device 1 at 21.75 (v0 at V0) and 43.5 (v1 at V1); device 0 at 42 is stale
    applied = [r["end_s"] for r in rows_of(tmp_path, "rounds") if r["participants"] > 0]
    assert applied[:2] == [21.75, 43.5]


@pytest.mark.parametrize("mode, first_update_at, upload_s", [
    # after_compute: device 1's compute ends at 21.75, then fc3 13 s, fc2 5.5 s, fc1 61.5 s
    ("after_compute", 101.75, 80.0),
    # streaming: fc3 13.25-26.25, fc2 26.25-31.75, fc1 31.75-93.25 while compute ends at 21.75
    ("streaming", 93.25, 80.0),
])
def test_upload_time_counts_outside_ideal_mode(tmp_path, mode, first_update_at, upload_s):
    out = run(tmp_path, f'network.upload_mode="{mode}"', "policy.duration_s=110", text=TINY)
    first = next(r for r in rows_of(out, "rounds") if r["participants"] > 0)
    assert first["end_s"] == first_update_at
    dev = rows_of(out, "devices")[0]
    assert (dev["device"], dev["status"], dev["upload_s"]) == (1, "complete", upload_s)
    assert dev["energy_upload_j"] == 0.5 * upload_s


def test_fedbuff_k1_a0_is_sequential_sgd_in_arrival_order(tmp_path):
    from fedsim.sim.async_engine import job_rng
    from fedsim.sim.build import build_components

    overrides = ASYNC_BASE + ("policy.buffer_size=1", "policy.staleness_exponent=0", "training.momentum=0",
                              "policy.duration_s=0.15")
    out = run(tmp_path, *overrides)
    scn = scenario(*overrides)
    comp = build_components(scn)
    jobs = jobs_from_events(out)
    for j, job in enumerate(jobs):        # job j drew its mini-batch first from its own stream
        job["batch"] = comp.partition.sample_batch(job["device"], scn.training.batch_size, job_rng(scn.run.seed, j))
    arrived = sorted((j for j in jobs if j["applied"]), key=lambda j: j["end"])
    assert len(arrived) > 40 and any(j["arrived"] and not j["applied"] for j in jobs)
    updates = [r for r in rows_of(out, "rounds") if r["participants"] > 0]
    assert [r["end_s"] for r in updates] == [j["end"] for j in arrived]
    assert max(r["round"] - j["version"] for r, j in zip(updates, arrived)) > 0, "some updates were stale"
    oracle = sgd_oracle(comp, [(j["batch"], j["version"], 1.0) for j in arrived], lr=scn.training.lr, momentum=0.0)
    assert_models_close(out, oracle[-1])


def test_fedbuff_buffer_is_the_staleness_weighted_mean_of_k_updates(tmp_path):
    from fedsim.sim.async_engine import job_rng
    from fedsim.sim.build import build_components

    overrides = ASYNC_BASE + ("policy.buffer_size=3", "policy.staleness_exponent=0.5", "policy.duration_s=0.15")
    out = run(tmp_path, *overrides)
    scn = scenario(*overrides)
    comp = build_components(scn)
    jobs = jobs_from_events(out)
    for j, job in enumerate(jobs):
        job["batch"] = comp.partition.sample_batch(job["device"], scn.training.batch_size, job_rng(scn.run.seed, j))
    arrived = sorted((j for j in jobs if j["applied"]), key=lambda j: j["end"])
    updates = [r for r in rows_of(out, "rounds") if r["participants"] > 0]
    assert all(r["participants"] == 3 and r["contributors"] == [3, 3, 3] for r in updates)
    assert [r["end_s"] for r in updates] == [j["end"] for j in arrived[2::3]][:len(updates)]
    # naive server: the K updates of step u (staleness u - v each), weighted mean, one SGD-momentum step
    model64 = copy.deepcopy(comp.model).double()
    versions = [{n: p.detach().double().clone() for n, p in comp.model.named_parameters()}]
    buf = None
    x, y = comp.dataset.x_train, comp.dataset.y_train
    for u in range(len(updates)):
        step = {}
        for job in arrived[3 * u:3 * u + 3]:
            idx = torch.from_numpy(np.array(job["batch"]))
            g = float64_grad(model64, versions[job["version"]], x[idx], y[idx])
            w = (1.0 + u - job["version"]) ** -0.5 / 3
            step = {n: step.get(n, 0) + w * g[n] for n in g}
        buf = step if buf is None else {n: scn.training.momentum * buf[n] + step[n] for n in step}
        versions.append({n: versions[-1][n] - scn.training.lr * buf[n] for n in step})
    assert_models_close(out, versions[-1])


def test_max_concurrency_is_respected_at_every_instant(tmp_path):
    out = run(tmp_path, *ASYNC_BASE, "policy.max_concurrency=3", "policy.buffer_size=2")
    ev = table(out, "events")
    running, peak, starts_at_zero = 0, 0, 0
    for t, e, layer in zip(ev["time_s"], ev["event"], ev["layer"]):
        if e == "download_start":
            running += 1
            starts_at_zero += t == 0.0
        elif (e == "backward_end" and layer == 0) or e == "stopped":
            running -= 1
        peak = max(peak, running)
        assert running <= 3
    assert peak == 3 and starts_at_zero == 3 and running == 0
    jobs = jobs_from_events(out)
    assert len({j["device"] for j in jobs}) == 8, "idle devices are drawn at random, so all get turns"
    # with max_concurrency <= the fleet, a device never runs two jobs at once
    by_device = {}
    for j in jobs:
        by_device.setdefault(j["device"], []).append((j["start"], j["end"]))
    for spans in by_device.values():
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_fleet_participants_is_the_default_concurrency(tmp_path):
    out = run(tmp_path, *ASYNC_BASE, "fleet.participants=2")
    ev = table(out, "events")
    running = peak = 0
    for e, layer in zip(ev["event"], ev["layer"]):
        running += (e == "download_start") - ((e == "backward_end" and layer == 0) or e == "stopped")
        peak = max(peak, running)
    assert peak == 2


def test_churn_hooks_availability_and_offline_interrupts(tmp_path):
    from fedsim.sim.engine import StopCause

    def before(env, server):
        server.is_online = lambda device, at: device != 2 or at >= 50.0   # device 2 joins at 50 s

        def churn(env):
            yield env.timeout(10.0)
            server.active[0].interrupt(StopCause.OFFLINE)     # device 0 leaves 10 s into its first job
            yield env.timeout(40.0)
            server.dispatch(env)                              # device 2 came online: fill the free slot

        env.process(churn(env))

    manual_run(tmp_path, "policy.max_concurrency=2", before=before)
    devices = rows_of(tmp_path, "devices")
    offline = [d for d in devices if d["status"] == "offline"]
    assert [(d["device"], d["round"], d["download_s"], d["compute_s"]) for d in offline] == [(0, 0, 1.5, 8.5)]
    jobs = jobs_from_events(tmp_path)
    # the slot freed at 10 s goes to device 0 again (device 2 is offline); 2 starts only when dispatched
    assert [(j["device"], j["start"]) for j in jobs[:3]] == [(0, 0.0), (1, 0.0), (0, 10.0)]
    assert min(j["start"] for j in jobs if j["device"] == 2) >= 50.0
    ev = table(tmp_path, "events")
    assert (10.0, 0, "offline") in set(zip(ev["time_s"], ev["device"], ev["event"]))


def test_evaluation_rows_at_multiples_of_eval_every_s(tmp_path):
    out = run(tmp_path, *ASYNC_BASE, "policy.eval_every_s=0.03125")
    rounds = rows_of(out, "rounds")
    evals = [r for r in rounds if r["test_accuracy"] is not None]
    assert [r["end_s"] for r in evals] == [0.03125 * k for k in range(1, 9)]
    assert all(r["participants"] == 0 and r["duration_s"] == 0.0 for r in evals)
    # rows are in time order, and an evaluation row's round is the number of updates before it
    assert [r["end_s"] for r in rounds] == sorted(r["end_s"] for r in rounds)
    for r in evals:
        assert r["round"] == sum(1 for u in rounds if u["participants"] > 0 and u["end_s"] <= r["end_s"])


def test_run_rounds_caps_the_server_updates(tmp_path):
    out = run(tmp_path, "run.rounds=2", text=TINY)
    rounds = rows_of(out, "rounds")
    assert [(r["round"], r["end_s"], r["participants"]) for r in rounds] == [(0, 21.75, 1), (1, 42.0, 1),
                                                                             (2, 42.0, 0)]
    assert rounds[-1]["test_accuracy"] is not None
    assert json.loads((out / "status.json").read_text())["sim_time_s"] == 42.0


def test_same_seed_same_trace(tmp_path):
    overrides = ASYNC_BASE + ("policy.max_concurrency=5", "policy.buffer_size=3", 'network.upload_mode="streaming"')
    a = run(tmp_path, *overrides, name="a")
    b = run(tmp_path, *overrides, name="b")
    c = run(tmp_path, *overrides, "run.seed=4", name="c")
    for name in ("events", "rounds", "devices"):
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.equals(tb, check_metadata=True), name
    assert not pq.read_table(a / "rounds.parquet").equals(pq.read_table(c / "rounds.parquet"))


@pytest.mark.parametrize("override, field, message", [
    ("policy.buffer_size=0", "policy.buffer_size", "positive integer"),
    ("policy.buffer_size=2.5", "policy.buffer_size", "integer"),
    ("policy.staleness_exponent=-1", "policy.staleness_exponent", ">= 0"),
    ("policy.max_concurrency=0", "policy.max_concurrency", "positive integer"),
    ("policy.max_concurrency=9", "policy.max_concurrency", "at most the number of devices (8)"),
    ("policy.max_staleness=-1", "policy.max_staleness", ">= 0"),
    ("policy.duration_s=0", "policy.duration_s", "> 0"),
    ("policy.eval_every_s=0", "policy.eval_every_s", "> 0"),
    ("policy.eval_every_s=1e-9", "policy.eval_every_s", "at most 100000 evaluations"),
    ("policy.eval_every_s=\"often\"", "policy.eval_every_s", "must be a number"),
    ("policy.stalenes_exponent=1", "policy.stalenes_exponent", "unknown field"),
    ("training.local_steps=2", "training.local_steps", "one local step"),
])
def test_bad_fields_name_the_field(override, field, message):
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError) as info:
        scenario(*ASYNC_BASE, override)
    assert info.value.field == field and message in str(info.value)
    assert str(info.value).startswith("test.toml: " + field)


def test_fedasync_ignores_a_buffer_and_requires_duration():
    from fedsim.errors import ScenarioError

    # fedbuff's buffer is read only by fedbuff: fedasync (a buffer of one) names it in a notice
    scn = scenario("policy.buffer_size=4", text=TINY)
    assert scn.policy.buffer_size == 1 and scn.notices == ("fedasync ignores policy.buffer_size",)
    text = TINY.replace("duration_s = 140\n", "")
    with pytest.raises(ScenarioError, match=r"policy\.duration_s: missing required field"):
        scenario(text=text)
    # fields of the synchronous policies are accepted and ignored, so --set policy.name switches policy
    scn = scenario('policy.name="fedbuff"', "policy.duration_s=1", text=BASE_TOML)
    assert not hasattr(scn.policy, "deadline_s") and scn.policy.describe() == "fedbuff(K=10,a=0.5)"
    assert scn.ignored == ("policy.deadline_s",)
    assert scn.policy.eval_every_s == 1.0 and scn.policy.max_staleness == 32


def test_churn_takes_async_jobs_away_and_brings_devices_back(tmp_path):
    """Devices of class 'slow' are online 0.2 s, offline 0.3 s, in turn: jobs start only on online devices,
    a job running when its device leaves ends with status offline, and the device trains again later."""
    from conftest import run, table

    out = run(tmp_path, 'policy.name="fedbuff"', "policy.duration_s=2.0", "policy.eval_every_s=0.5",
              "policy.buffer_size=2", "run.rounds=100000",
              'fleet.classes[0].availability={ on_s = 0.2, off_s = 0.3, initial = "online" }')
    dev = table(out, "devices")
    slow = {d for d, c in zip(dev["device"], dev["class"]) if c == "slow"}
    assert "offline" in {s for d, s in zip(dev["device"], dev["status"]) if d in slow}
    ev = table(out, "events")
    starts = [(d, t) for d, e, t in zip(ev["device"], ev["event"], ev["time_s"]) if e == "download_start" and d in slow]
    for d, t in starts:                    # online during [0, 0.2), [0.5, 0.7), [1.0, 1.2), ...
        assert (t % 0.5) < 0.2 + 1e-9, (d, t)
    assert any(t >= 0.5 for _, t in starts), "devices come back and train again"
