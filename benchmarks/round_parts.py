"""Where the time of a big round goes: N devices, K participants, the fleet of `benchmarks.scale`.

    python -m benchmarks.round_parts [--quick] [--devices N] [--participants K] [--rounds R]

Runs the scenario of `benchmarks.scale` (paper MLP on synthetic data, SALF with a 0.1 s deadline, one torch
thread, the real `Server`, trace and gradients) and times each part of every round with the server's own
methods wrapped: the round's set-up (of which the mini-batch draws), the events (the round's wall time minus
the server's callbacks), and the end of the round (of which the policy's aggregation with its gradients, the
device rows, and the trace flush). Medians over `rounds` rounds (the first, which warms torch up, left out),
next to the same round run event by event and bare SimPy scheduling the events the round models
(`benchmarks.scale.event_path_rounds`; each timed round is followed by a bare-SimPy round, timed apart:
`benchmarks.scale.interleaved_rounds`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import emit, print_table


def _timed(owner, name: str, spent: dict[str, list[float]], label: str) -> None:
    """Wrap method `name` of `owner` so that each call's wall time is added to the current round's `label`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label][-1] += time.perf_counter() - start

    try:
        setattr(owner, name, wrapper)
    except AttributeError:           # a class with __slots__: wrap its method (this process only)
        method = getattr(type(owner), name)
        setattr(type(owner), name, lambda self, *a, **k: wrapper(*a, **k) if self is owner else method(self, *a, **k))


def measure(devices: int, participants: int, rounds: int) -> dict:
    import torch

    from benchmarks.scale import EVENT_PATH_ROUNDS, SCALE_TOML, event_path_rounds, interleaved_rounds, more_rounds
    from fedsim.output.trace import TraceWriter
    from fedsim.sim.build import build_components
    from fedsim.sim import server as server_module
    from fedsim.sim.server import Server
    from fedsim.spec.scenario import parse_scenario

    torch.set_num_threads(1)
    scn = parse_scenario(SCALE_TOML.format(devices=devices, participants=participants,
                                           rounds=1 + EVENT_PATH_ROUNDS + rounds), "benchmarks/round_parts.py")
    comp = build_components(scn)
    parts = ("setup_round", "sample_batches", "finish_round", "aggregate", "device rows", "trace flush")
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0])
    with tempfile.TemporaryDirectory() as tmp:
        trace = TraceWriter(Path(tmp), {})
        server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace)
        more_rounds(server, 1)       # round 0 warms torch up
        events_per_round, event_path_ms = event_path_rounds(server, EVENT_PATH_ROUNDS)
        _timed(server, "setup_round", spent, "setup_round")
        _timed(server.partition, "sample_batches", spent, "sample_batches")
        _timed(server, "finish_round", spent, "finish_round")
        original = server_module.aggregate_finite        # sim.finite_update's, as the server calls it
        _timed(server_module, "aggregate_finite", spent, "aggregate")
        _timed(server, "_write_devices", spent, "device rows")
        _timed(trace, "end_round", spent, "trace flush")

        def next_round(_done: int) -> None:
            for label in parts:
                spent[label].append(0.0)

        try:
            round_s, bare_s = interleaved_rounds(server, rounds, participants, round(events_per_round), next_round)
        finally:
            server_module.aggregate_finite = original       # the module as it was, for whoever runs next here
        trace.close()
    per_round = {label: [s * 1e3 for s in spent[label][:-1]] for label in parts}
    per_round["round"] = [s * 1e3 for s in round_s]
    median = {label: statistics.median(values) for label, values in per_round.items()}
    median["events"] = statistics.median(
        r - s - f for r, s, f in zip(per_round["round"], per_round["setup_round"], per_round["finish_round"]))
    median["event by event"] = event_path_ms
    median["bare SimPy"] = statistics.median(bare_s) * 1e3
    return {"devices": devices, "participants": participants, "rounds": rounds,
            "events_per_round": events_per_round, "ms": median}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N 400, K 200, 2 rounds")
    ap.add_argument("--devices", type=int, default=None, help="default 2,000 (--quick 400)")
    ap.add_argument("--participants", type=int, default=None, help="default 1,000 (--quick 200)")
    ap.add_argument("--rounds", type=int, default=None, help="default 10 (--quick 2)")
    args = ap.parse_args(argv)
    args.devices = args.devices or (400 if args.quick else 2_000)
    args.participants = args.participants or (200 if args.quick else 1_000)
    args.rounds = args.rounds or (2 if args.quick else 10)
    measured = measure(args.devices, args.participants, args.rounds)
    ms = measured["ms"]
    rows = [["whole round", ms["round"]],
            ["  set-up (selection, plan, draws)", ms["setup_round"]],
            ["    of which mini-batch draws", ms["sample_batches"]],
            ["  device rounds (computed at once) and trace rows", ms["events"]],
            ["  end of round", ms["finish_round"]],
            ["    of which aggregation (gradients)", ms["aggregate"]],
            ["    of which device rows", ms["device rows"]],
            ["    of which trace flush", ms["trace flush"]],
            ["the whole round, event by event", ms["event by event"]],
            ["bare SimPy, the same events", ms["bare SimPy"]]]
    print_table(f"N {args.devices}, K {args.participants}: median ms per round ({round(measured['events_per_round'])} "
                "events)", ["part", "ms/round"], rows)
    result = {"benchmark": "round_parts", "quick": args.quick, **{k: v for k, v in measured.items() if k != "ms"},
              **{f"ms_{k.replace(' ', '_')}": round(v, 4) for k, v in ms.items()}}
    emit(result)
    return result


if __name__ == "__main__":
    main()
