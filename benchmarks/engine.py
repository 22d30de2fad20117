"""The SimPy engine alone, and the memory of a large fleet.

    python -m benchmarks.engine [--quick]

1. Events per second: 1,000 participants x 10 layers (`benchmarks.models:deep_mlp`, synthetic data),
   SALF with a deadline that cuts most devices partway through backward. The real `Server` and engine
   run, with the gradient work stubbed out (a `GradientEngine` whose `layer_sums` returns empty sums, so
   the update is empty). The server callbacks (`setup_round`: batches and the timing plan;
   `finish_round`: aggregation, device rows, Parquet flush) are timed apart, so "event part" is
   `env.run` minus the callbacks: the SimPy processes and their trace event rows. Events are counted
   with SimPy's event id counter (every scheduled event takes one). The rounds run event by event (one
   `DeviceRound` per participant, the path of shared networks, streaming uploads and churn); the same rounds
   computed at once (`fedsim.sim.timeline`, private links, ideal and after_compute uploads) are timed too.
2. Peak RSS of a 100,000-device fleet with 100 participants per round running a few rounds of the paper
   MLP on synthetic data (and of a 1,000-device fleet, for the difference), each in a fresh subprocess
   reading its own `resource.getrusage(RUSAGE_SELF).ru_maxrss`. `--fleet-devices N` measures a fleet of N
   devices instead (`fleet_rss_mb`; `fleet_100k_rss_mb` is then null).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import REPO, emit, machine, print_table

# trace rows that end a phase: each is one SimPy timeout (with a star network), the rest of a round is overhead
PHASE_ENDS = ("download_end", "forward_end", "backward_end", "upload_end")

# the fleet of both benchmarks: one class of lognormal-speed phones (a str.format template)
PHONE_CLASS = """
[[fleet.classes]]
name = "phone"
count = {devices}
speed_flops = {{ dist = "lognormal", median = 2.0e7, sigma = 0.3 }}
slowdown = {{ dist = "uniform", low = 1.0, high = 3.0 }}
downlink_bps = 5.0e7
uplink_bps = 1.0e7
latency_s = 0.01
"""

ENGINE_TOML = """
[run]
name = "engine"
seed = 0
rounds = {rounds}
eval_every = 1000000

[model]
name = "benchmarks.models:deep_mlp"

[data]
name = "synthetic"
samples_per_device = 16
test_samples_per_device = 1

[training]
batch_size = 16
lr = 0.1

[fleet]
participants = "all"

""" + PHONE_CLASS + """
[network]
upload_mode = "{upload_mode}"

[policy]
name = "salf"
deadline_s = {deadline_s}
"""

FLEET_TOML = """
[run]
name = "fleet"
seed = 0
rounds = {rounds}
eval_every = 1000000

[model]
name = "mlp"

[data]
name = "synthetic"
samples_per_device = 10
test_samples_per_device = 1

[training]
batch_size = 10
lr = 0.1

[fleet]
participants = {participants}

""" + PHONE_CLASS + """
[policy]
name = "salf"
deadline_s = 0.1
"""


def _null_grads(server):
    """A GradientEngine that computes nothing: empty sums, the right contributor counts."""
    from fedsim.learn.grads import GradientEngine, LayerSums

    class NullGrads(GradientEngine):
        def layer_sums(self, batches, depths):
            depths = np.asarray(depths, dtype=np.int64)
            n_layers = self.profile.n_layers
            at_least = np.cumsum(np.bincount(depths, minlength=n_layers + 1)[::-1])[::-1]
            return LayerSums({}, at_least[1:][::-1].astype(np.int64), 0.0, int(np.count_nonzero(depths)))

    g = server.grads
    return NullGrads(g.model, g.profile, g.x[:1], g.y[:1])


def engine_rounds(devices: int, rounds: int, deadline_s: float, upload_mode: str, timeline: bool = False) -> dict:
    """Run `rounds` rounds with the gradient work stubbed out; time the event part apart from the callbacks.
    Event by event (one `DeviceRound` per participant), or, with `timeline`, each round computed at once."""
    import simpy

    from fedsim.sim.build import build_components
    from fedsim.sim.engine import run_events, serve_rounds
    from fedsim.spec.scenario import parse_scenario
    from fedsim.sim.server import Server
    from fedsim.output.trace import TraceWriter

    scn = parse_scenario(ENGINE_TOML.format(rounds=rounds, devices=devices, deadline_s=deadline_s,
                                            upload_mode=upload_mode), "benchmarks/engine.py")
    comp = build_components(scn)
    with tempfile.TemporaryDirectory() as tmp:
        trace = TraceWriter(Path(tmp), {})
        server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        server.grads = _null_grads(server)
        spent = {"setup_round": 0.0, "finish_round": 0.0}
        depths: list[np.ndarray] = []

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[name] += time.perf_counter() - start
            return wrapper

        setup, finish = server.setup_round, server.finish_round

        def finish_recording(setup_, start_at, end_at, outcomes, *rest, **kw):
            depths.append(outcomes.depth.copy())
            return finish(setup_, start_at, end_at, outcomes, *rest, **kw)

        server.setup_round = timed("setup_round", setup)
        server.finish_round = timed("finish_round", finish_recording)
        env = simpy.Environment(initial_time=getattr(server, "clock_at", 0.0))
        env.process(serve_rounds(env, server, rounds, timeline=timeline))
        start = time.perf_counter()
        run_events(env)             # as a run does: env.run() with the heap built so far frozen
        total = time.perf_counter() - start
        events = next(env._eid)      # SimPy numbers every scheduled event from 0
        trace.close()
        kinds = pq.read_table(Path(tmp) / "events.parquet", columns=["event"]).column("event").to_pylist()
    phase_events = {k: kinds.count(k) for k in PHASE_ENDS}
    event_s = total - spent["setup_round"] - spent["finish_round"]
    all_depths = np.concatenate(depths)
    n_layers = comp.profile.n_layers
    return {
        "devices": devices, "rounds": rounds, "layers": n_layers, "events": events,
        "events_per_round": events / rounds, "phase_events": phase_events, "event_s": event_s, "total_s": total,
        "events_per_s": events / event_s, "round_event_ms": event_s / rounds * 1e3,
        "setup_ms": spent["setup_round"] / rounds * 1e3, "finish_ms": spent["finish_round"] / rounds * 1e3,
        "straggler_fraction": float(np.mean(all_depths < n_layers)), "mean_depth": float(all_depths.mean()),
    }


def fleet_child(devices: int, rounds: int) -> None:
    """Run in a subprocess: a whole run of a large fleet; print its own peak RSS as JSON."""
    from fedsim.run import run_scenario
    from fedsim.spec.scenario import parse_scenario

    start = time.perf_counter()
    scn = parse_scenario(FLEET_TOML.format(devices=devices, participants=100, rounds=rounds), "benchmarks/engine.py")
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_scenario(scn, Path(tmp) / "run")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: kilobytes
    print(json.dumps({"devices": devices, "rounds": rounds, "rounds_run": summary.rounds, "rss_mb": rss_mb,
                      "seconds": time.perf_counter() - start}))


def fleet_rss(devices: int, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.engine", "--fleet-child", str(devices),
                          "--rounds", str(rounds)], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"fleet subprocess ({devices} devices) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bare_simpy_events_per_s(n: int = 200_000) -> float:
    """The floor: one process yielding `n` plain timeouts."""
    import simpy

    env = simpy.Environment()

    def proc(env):
        for _ in range(n):
            yield env.timeout(1.0)

    env.process(proc(env))
    start = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - start)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds; the fleet runs one round, no 1k baseline")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=0.09, help="deadline_s of the event benchmark")
    ap.add_argument("--fleet-devices", type=int, default=100_000,
                    help="devices of the large fleet whose memory is measured (default 100,000)")
    ap.add_argument("--fleet-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fleet_child is not None:
        fleet_child(args.fleet_child, args.rounds or 3)
        return {}
    rounds = args.rounds or (2 if args.quick else 10)
    print(f"benchmarks.engine: {args.devices} participants x 10 layers, {rounds} rounds, gradients stubbed out")
    print(f"machine: {machine()}")
    bare = bare_simpy_events_per_s(50_000 if args.quick else 200_000)
    runs = {mode: engine_rounds(args.devices, rounds, args.deadline, mode)
            for mode in (("ideal",) if args.quick else ("ideal", "after_compute", "streaming"))}
    at_once = {mode: engine_rounds(args.devices, rounds, args.deadline, mode, timeline=True)
               for mode in runs if mode != "streaming"}
    rows = [[mode, r["events_per_round"], r["events_per_s"] / 1e6, r["round_event_ms"],
             at_once[mode]["round_event_ms"] if mode in at_once else "-", r["setup_ms"], r["finish_ms"],
             r["straggler_fraction"], r["mean_depth"]] for mode, r in runs.items()]
    print_table(f"one round of {args.devices} devices (bare SimPy timeout loop: {bare / 1e6:.2f} M events/s)",
                ["upload mode", "events/round", "M events/s", "event part ms", "computed at once ms",
                 "setup_round ms", "finish_round ms", "stragglers", "mean depth"], rows)
    fleet_rounds = 1 if args.quick else 3
    big = fleet_rss(args.fleet_devices, fleet_rounds)
    fleet_rows = [[big["devices"], big["rss_mb"], big["seconds"]]]
    small = None
    if not args.quick:      # the same run with 1,000 devices: libraries, model and the rest of a run
        small = fleet_rss(1_000, fleet_rounds)
        fleet_rows.insert(0, [small["devices"], small["rss_mb"], small["seconds"]])
    print_table(f"peak RSS of a whole run (own process): paper MLP, synthetic data (10 samples per device), "
                f"100 participants, {fleet_rounds} round(s)", ["devices", "peak RSS MB", "seconds"], fleet_rows)
    per_device_kb = None
    if small is not None:
        per_device_kb = (big["rss_mb"] - small["rss_mb"]) * 1024 / (big["devices"] - small["devices"])
        print(f"  difference: {per_device_kb:.2f} KB per extra device, its training data included")
    ideal = runs["ideal"]
    result = {"benchmark": "engine", "quick": args.quick, "devices": args.devices, "layers": ideal["layers"],
              "events_per_s": round(ideal["events_per_s"]), "round_event_ms": round(ideal["round_event_ms"], 2),
              "events_per_round": round(ideal["events_per_round"]), "bare_simpy_events_per_s": round(bare),
              "rounds": rounds, "events": ideal["events"], "phase_events": ideal["phase_events"],
              "straggler_fraction": round(ideal["straggler_fraction"], 4),
              "mean_depth": round(ideal["mean_depth"], 3),
              "setup_round_ms": round(ideal["setup_ms"], 2), "finish_round_ms": round(ideal["finish_ms"], 2),
              "fleet_devices": big["devices"], "fleet_rss_mb": round(big["rss_mb"], 1),
              "fleet_100k_rss_mb": round(big["rss_mb"], 1) if big["devices"] == 100_000 else None,
              "fleet_rounds": fleet_rounds, "fleet_rounds_run": big["rounds_run"],
              "fleet_1k_rss_mb": None if small is None else round(small["rss_mb"], 1),
              "fleet_kb_per_device": None if per_device_kb is None else round(per_device_kb, 3),
              "round_event_ms_at_once": round(at_once["ideal"]["round_event_ms"], 2),
              "by_upload_mode": {m: {"round_event_ms": round(r["round_event_ms"], 2),
                                     "events_per_s": round(r["events_per_s"]),
                                     "round_event_ms_at_once": (round(at_once[m]["round_event_ms"], 2)
                                                                if m in at_once else None)}
                                 for m, r in runs.items()}}
    emit(result)
    return result


if __name__ == "__main__":
    main()
