"""Large fleets, big rounds and crowded links.

    python -m benchmarks.scale [--quick] [--rounds R] [--no-million] [--links-only] [--churn-only]
    python -m benchmarks.scale --paired N_SMALL N_LARGE [--rounds R] [--churn]

1. Fleets of N devices with K participants per round: the paper MLP on synthetic data (10 samples per
   device, one test sample, one torch thread), SALF with a 0.1 s deadline, the real `Server`, trace and gradients. Each size
   runs in a fresh subprocess, which reports the seconds its imports took, the build (`build_components` and
   the `Server`), the median wall time of a round (the first round, which warms torch up, left out), the
   last round (the only one evaluated: a fleet whose data are made on demand makes its test set there) and its
   own peak RSS (`ru_maxrss`). Rounds whose participants cannot affect one another are computed at once
   (`fedsim.sim.timeline`); three more rounds then run event by event, one `DeviceRound` per participant, which
   gives the SimPy events a round models (one per phase end, plus the deadline) and that path's ms per round.
   Two fleets run again with churn (exponential on and off periods, means 600 s and 120 s): a round then
   selects from the devices online.
2. The reference of a round: bare SimPy scheduling the events the round models, as K chains of timeouts whose
   callbacks schedule the next (how fedsim's device rounds work), nothing else.
3. A crowded link: n = 1,000 and 3,000 flows of sizes 1, 2, ..., n kB start together on one access point's
   link (8 Mbit/s, no private links), so they end one at a time and every end re-shares the others; the wall
   time of the whole run. With SimGrid's Python bindings on the system Python (Debian `python3-simgrid`),
   the same run in SimGrid (one link, `Comm.sendto_async`) is timed in the same run of the benchmark.

`--paired`: only the ratio of a large fleet's round to a small one's (K = 100), both built in one process and
their rounds alternating, so that both see the machine alike (`paired_child`); its JSON line holds each median
and the median of the per-pair ratios.

The last line is one JSON object; `build_s_1m`, `rss_mb_1m`, `ms_per_round_k1000`, `simpy_ms_per_round_k1000`,
`shared_link_1000_s` and `shared_link_3000_s` (with SimGrid's `simgrid_shared_link_s`, `simgrid_shared_link_3000_s`)
are the headline figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import REPO, emit, print_table
from benchmarks.engine import FLEET_TOML

SCALE_TOML = FLEET_TOML      # the paper MLP on synthetic data, one phone class, SALF at 0.1 s

CHURN = ('latency_s = 0.01\navailability = { on_s = { dist = "exponential", mean = 600 }, '
         'off_s = { dist = "exponential", mean = 120 } }')
# (N, K, churn)
SIZES = ((1_000, 100, False), (100_000, 100, False), (1_000_000, 100, False), (2_000, 1_000, False),
         (1_000, 100, True), (1_000_000, 100, True))
QUICK_SIZES = ((1_000, 100, False), (10_000, 100, False), (1_000, 1_000, False), (1_000, 100, True))


def fleet_child(devices: int, participants: int, rounds: int, churn: bool = False) -> None:
    """Run in a fresh subprocess: imports, build, `rounds` + 1 rounds; print the figures as JSON."""
    start = time.perf_counter()
    from fedsim.output.trace import TraceWriter
    from fedsim.sim.build import build_components
    from fedsim.sim.server import Server
    from fedsim.spec.scenario import parse_scenario
    import_s = time.perf_counter() - start
    import torch

    torch.set_num_threads(1)        # as `fedsim run` and the sweep runner: one thread per process

    start = time.perf_counter()
    text = SCALE_TOML.format(devices=devices, participants=participants, rounds=1 + EVENT_PATH_ROUNDS + rounds)
    scn = parse_scenario(text.replace("latency_s = 0.01", CHURN) if churn else text, "benchmarks/scale.py")
    comp = build_components(scn)
    with tempfile.TemporaryDirectory() as tmp:
        trace = TraceWriter(Path(tmp), {})
        server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        build_s = time.perf_counter() - start
        more_rounds(server, 1)       # round 0 warms torch up
        events_per_round, event_path_ms = event_path_rounds(server, EVENT_PATH_ROUNDS)
        per_round, bare = interleaved_rounds(server, rounds, participants, round(events_per_round))
        trace.close()
    print(json.dumps({
        "devices": devices, "participants": participants, "churn": churn, "rounds": rounds, "import_s": import_s,
        "build_s": build_s, "ms_per_round": statistics.median(per_round) * 1e3, "last_round_s": per_round[-1],
        "events_per_round": events_per_round, "event_path_ms_per_round": event_path_ms,
        "simpy_ms_per_round": statistics.median(bare) * 1e3,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))     # Linux: kilobytes


EVENT_PATH_ROUNDS = 3


def paired_child(small: int, large: int, participants: int, rounds: int, churn: bool) -> None:
    """Run in a fresh subprocess: two fleets built side by side, their rounds alternating (one of the small fleet,
    one of the large), so both see the machine alike; print each one's median ms per round and the median of the
    per-pair ratios as JSON. A shared machine's speed drifts by 2x between separate runs; within a pair it does
    not."""
    import torch

    from fedsim.output.trace import TraceWriter
    from fedsim.sim.build import build_components
    from fedsim.sim.server import Server
    from fedsim.spec.scenario import parse_scenario

    torch.set_num_threads(1)
    servers, traces, tmp = [], [], tempfile.TemporaryDirectory()
    for n in (small, large):
        text = SCALE_TOML.format(devices=n, participants=participants, rounds=rounds + 2)
        scn = parse_scenario(text.replace("latency_s = 0.01", CHURN) if churn else text, "benchmarks/scale.py")
        comp = build_components(scn)
        (Path(tmp.name) / str(n)).mkdir()
        trace = TraceWriter(Path(tmp.name) / str(n), {})
        servers.append(Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace))
        traces.append(trace)
    spent: list[list[float]] = [[], []]
    for r in range(rounds + 1):           # round 0 warms torch up
        for which, server in enumerate(servers):
            start = time.perf_counter()
            more_rounds(server, 1)
            if r:
                spent[which].append(time.perf_counter() - start)
    for trace in traces:
        trace.close()
    tmp.cleanup()
    ratios = [b / a for a, b in zip(*spent)]
    print(json.dumps({"small": small, "large": large, "participants": participants, "churn": churn, "rounds": rounds,
                      "small_ms_per_round": statistics.median(spent[0]) * 1e3,
                      "large_ms_per_round": statistics.median(spent[1]) * 1e3,
                      "ratio": statistics.median(ratios)}))


def more_rounds(server, rounds: int, timeline: bool = True, on_round: Callable[[int], None] | None = None):
    """Run the next `rounds` rounds of `server`'s run in a fresh environment that starts at the run's clock, as a run
    does (`run_events`); returns the environment (its event ids count what was scheduled)."""
    import simpy

    from fedsim.sim.engine import run_events, serve_rounds

    env = simpy.Environment(initial_time=server.clock_at)
    server.ended_by = None
    env.process(serve_rounds(env, server, server.current_round + rounds, on_round=on_round, timeline=timeline))
    run_events(env)
    return env


def interleaved_rounds(server, rounds: int, chains: int, events: int,
                       on_round: Callable[[int], None] | None = None) -> tuple[list[float], list[float]]:
    """(wall seconds of each of the run's next `rounds` rounds, of each bare-SimPy round): every round is
    followed by one round of bare SimPy scheduling `events` timeouts in `chains` chains (`bare_simpy_round_s`),
    outside the round's time, so that both see the machine as it is at that moment. `on_round` runs first at
    the end of each round (outside its time too)."""
    import random

    round_s, bare_s = [], []
    rnd = random.Random(0)
    last = [time.perf_counter()]

    def after_round(done: int) -> None:
        round_s.append(time.perf_counter() - last[0])
        if on_round is not None:
            on_round(done)
        bare_s.append(bare_simpy_round_s(chains, events, rnd))
        last[0] = time.perf_counter()

    more_rounds(server, rounds, on_round=after_round)
    return round_s, bare_s


def event_path_rounds(server, rounds: int) -> tuple[float, float]:
    """(SimPy events per round, median ms per round) of `rounds` more rounds of `server`'s run, event by event
    (`serve_rounds(..., timeline=False)`: one `DeviceRound` per participant, one event per phase). The count is
    SimPy's event ids: the events a round models (download, forward, each layer's backward, uploads, the
    deadline), whether it is computed at once or not, plus the few of the round itself (the server's wait, the
    condition that ends it, a churn watcher's wake-ups): the bare-SimPy reference schedules as many."""
    ends = [time.perf_counter()]
    env = more_rounds(server, rounds, timeline=False, on_round=lambda _done: ends.append(time.perf_counter()))
    return next(env._eid) / rounds, statistics.median(b - a for a, b in zip(ends, ends[1:])) * 1e3


def bare_simpy_round_s(chains: int, events: int, rnd) -> float:
    """Wall seconds of one round of bare SimPy: `events` timeouts of random delays (`rnd`) in `chains` callback
    chains, in a fresh environment (as fedsim's rounds each start afresh), nothing else."""
    import simpy

    lengths = [events // chains + (i < events % chains) for i in range(chains)]
    delays = [[rnd.random() for _ in range(n)] for n in lengths]
    start = time.perf_counter()
    env = simpy.Environment()
    for chain in delays:
        _chain(env, chain, 0)
    env.run()
    return time.perf_counter() - start


def _chain(env, delays: list[float], i: int) -> None:
    if i < len(delays):
        env.timeout(delays[i]).callbacks.append(lambda _event: _chain(env, delays, i + 1))


def fleet(devices: int, participants: int, churn: bool, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--child", str(devices), str(participants),
                          "--rounds", str(rounds)] + ["--churn"] * churn, cwd=REPO, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"scale subprocess (N={devices}, K={participants}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- a crowded link -----------------------------------------------------------------------------------------

SHARED_LINK = """
[[network.nodes]]
name = "server"
kind = "server"
[[network.nodes]]
name = "ap"
kind = "ap"
[[network.links]]
a = "ap"
b = "server"
bandwidth_bps = {capacity}
[network.classes.phones]
attach = "ap"
access = "none"
"""


def shared_link_s(flows: int, capacity_bps: float = 8e6) -> tuple[float, float]:
    """(wall seconds, simulated end of the last flow): `flows` flows of 1..flows kB on one link, one run."""
    import tomllib

    import numpy as np
    import simpy

    from fedsim.spec.fields import Fields
    from fedsim.spec.network import Direction, read_network_spec
    from fedsim.world.network import Network, Transfer, build_topology

    raw = tomllib.loads(SHARED_LINK.format(capacity=capacity_bps))
    spec = read_network_spec(Fields(raw["network"], "benchmarks/scale.py", "network"), ["phones"], ())
    topo = build_topology(spec, class_of=np.zeros(flows, dtype=np.int64), downlink_bps=np.full(flows, np.inf),
                          uplink_bps=np.full(flows, np.inf), latency_s=np.zeros(flows), rng=np.random.default_rng(0))
    ends: list[float] = []
    start = time.perf_counter()
    env = simpy.Environment()
    net = Network(env, topo)
    for d in range(flows):
        Transfer(net, d, Direction.DOWN, 1000.0 * (d + 1), None, lambda result: ends.append(result.end_at)).start()
    env.run()
    wall = time.perf_counter() - start
    assert len(ends) == flows
    return wall, max(ends)


SIMGRID_SCRIPT = r"""
import json, sys, time
from simgrid import Actor, Comm, Engine, Host
flows, capacity = int(sys.argv[1]), float(sys.argv[2])
e = Engine(["sg", "--log=root.thr:critical", "--cfg=network/model:CM02", "--cfg=network/crosstraffic:0",
            "--cfg=network/weight-S:0", "--cfg=network/latency-factor:1", "--cfg=network/bandwidth-factor:1"])
from simgrid import NetZone, LinkInRoute
zone = NetZone.create_full_zone("zone")
server, ap = zone.create_host("server", 1e9), zone.create_host("ap", 1e9)
link = zone.create_link("shared", capacity / 8.0).seal()
zone.add_route(server.netpoint, ap.netpoint, None, None, [LinkInRoute(link)], True)
zone.seal()
ends = []
def sender():
    comms = [Comm.sendto_async(server, ap, 1000 * (d + 1)) for d in range(flows)]
    for c in comms:
        c.wait()
    ends.append(Engine.clock)
Actor.create("sender", server, sender)
start = time.perf_counter()
e.run()
print(json.dumps({"wall_s": time.perf_counter() - start, "end_s": max(ends)}))
"""


def simgrid_shared_link_s(flows: int, capacity_bps: float = 8e6) -> dict | None:
    """The same crowded link in SimGrid (system Python with `python3-simgrid`), or None if it is missing."""
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", SIMGRID_SCRIPT, str(flows), str(capacity_bps)],
                             capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        print(f"  (SimGrid not run: {out.stderr.strip().splitlines()[-1:] or out.returncode})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main -------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small fleets, 2 rounds, 200 flows")
    ap.add_argument("--rounds", type=int, default=None, help="rounds timed per fleet (default 10; --quick 2)")
    ap.add_argument("--no-million", action="store_true", help="leave out the N = 1,000,000 fleet")
    ap.add_argument("--links-only", action="store_true", help="only the crowded link (no fleets)")
    ap.add_argument("--churn-only", action="store_true", help="of the fleets, only those with churn")
    ap.add_argument("--child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--churn", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paired", type=int, nargs=2, default=None, metavar=("N_SMALL", "N_LARGE"),
                    help="only the paired ratio: two fleets (K = 100) in one process, their rounds alternating")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 10)
    if args.child is not None:
        fleet_child(*args.child, rounds, args.churn)
        return {}
    if args.paired is not None:
        paired_child(*args.paired, 100, rounds, args.churn)
        return {}
    sizes = QUICK_SIZES if args.quick else tuple(s for s in SIZES if not (args.no_million and s[0] == 1_000_000))
    sizes = () if args.links_only else tuple(s for s in sizes if s[2] or not args.churn_only)
    print(f"benchmarks.scale: paper MLP on synthetic data, SALF, {rounds} rounds timed per fleet")
    runs = [fleet(n, k, churn, rounds) for n, k, churn in sizes]
    print_table("fleets (each in its own process)",
                ["N", "K", "churn", "import s", "build s", "ms/round", "event by event", "bare SimPy ms/round",
                 "events/round", "last round s", "peak RSS MB"],
                [[r["devices"], r["participants"], "yes" if r["churn"] else "no", r["import_s"], r["build_s"],
                  r["ms_per_round"], r["event_path_ms_per_round"], r["simpy_ms_per_round"],
                  round(r["events_per_round"]), r["last_round_s"], r["rss_mb"]] for r in runs])
    flow_counts = (200,) if args.quick else (1_000, 3_000)
    links = {}
    for n_flows in flow_counts:
        wall, end_s = shared_link_s(n_flows)
        links[n_flows] = {"wall_s": wall, "end_s": end_s, "simgrid": simgrid_shared_link_s(n_flows)}
    print_table("n flows of 1..n kB on one 8 Mbit/s access-point link",
                ["flows", "fedsim wall s", "SimGrid wall s (python3-simgrid)", "simulated end s", "SimGrid end s"],
                [[n, v["wall_s"], "-" if v["simgrid"] is None else v["simgrid"]["wall_s"], v["end_s"],
                  "-" if v["simgrid"] is None else v["simgrid"]["end_s"]] for n, v in links.items()])
    n_flows = flow_counts[0]
    wall, end_s, simgrid = links[n_flows]["wall_s"], links[n_flows]["end_s"], links[n_flows]["simgrid"]

    def pick(n: int, k: int, key: str, churn: bool = False):
        return next((round(r[key], 3) for r in runs if (r["devices"], r["participants"], r["churn"]) == (n, k, churn)),
                    None)

    k1000 = next((r for r in runs if r["participants"] == 1_000), None)
    result = {"benchmark": "scale", "quick": args.quick, "rounds": rounds,
              "fleets": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
              "build_s_1m": pick(1_000_000, 100, "build_s"), "rss_mb_1m": pick(1_000_000, 100, "rss_mb"),
              "ms_per_round_1m": pick(1_000_000, 100, "ms_per_round"),
              "ms_per_round_1k": pick(1_000, 100, "ms_per_round"),
              "ms_per_round_1k_churn": pick(1_000, 100, "ms_per_round", churn=True),
              "ms_per_round_1m_churn": pick(1_000_000, 100, "ms_per_round", churn=True),
              "last_round_s_1m": pick(1_000_000, 100, "last_round_s"),
              "ms_per_round_k1000": None if k1000 is None else round(k1000["ms_per_round"], 3),
              "simpy_ms_per_round_k1000": None if k1000 is None else round(k1000["simpy_ms_per_round"], 3),
              "shared_link_flows": n_flows, "shared_link_1000_s": round(wall, 4) if n_flows == 1_000 else None,
              "shared_link_s": round(wall, 4), "shared_link_end_s": end_s,
              "simgrid_shared_link_s": None if simgrid is None else round(simgrid["wall_s"], 4),
              "shared_link_3000_s": round(links[3_000]["wall_s"], 4) if 3_000 in links else None,
              "simgrid_shared_link_3000_s": (round(links[3_000]["simgrid"]["wall_s"], 4)
                                             if 3_000 in links and links[3_000]["simgrid"] is not None else None)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
