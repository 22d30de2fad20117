"""The synchronous engine: the server's rounds, each dispatching its participants' `DeviceRound`s.

`env.now` is the only clock. `run_round` builds the round (`RoundSetup`, from the server), starts every
participant's `fedsim.sim.device_round.DeviceRound` (a chain of event callbacks: download, forward, one event
per layer's backward completion, uploads) and waits until all have ended, or until the quorum of
delivering devices is reached (overselect), when it stops the others where they are. The deadline is one
SimPy timeout per round that the devices it cuts wait on. Real gradients are computed only after the
round's events are over, by the server callback (`finish_round`), for exactly what each device delivered.
"""

from __future__ import annotations

import gc
from typing import Callable, Protocol

import simpy

from fedsim.sim.device_round import DeviceOutcome, DeviceRound, StopCause
from fedsim.sim.round_setup import RoundSetup
from fedsim.output.trace import SERVER, EventKind, TraceWriter
from fedsim.spec.scenario import TIME_RTOL

__all__ = ["DeviceOutcome", "DeviceRound", "RoundSetup", "RoundServer", "StopCause", "run_events", "run_round",
           "serve_rounds"]


class RoundServer(Protocol):
    """The callbacks `serve_rounds` needs; `fedsim.sim.server.Server` implements them."""

    current_round: int
    trace: TraceWriter
    active: dict[int, DeviceRound]     # device id -> its round under way
    time_budget_s: float | None        # no round may end after this simulated time
    ended_by: str | None               # the limit that ended the run, once it has ended

    def setup_round(self, round_: int, env: simpy.Environment) -> RoundSetup: ...
    def wait_for_devices(self, env: simpy.Environment): ...
    def watch(self, env: simpy.Environment, devices) -> None: ...
    def unwatch(self) -> None: ...
    def finish_round(self, setup: RoundSetup, start_at: float, end_at: float,
                     outcomes: list[DeviceOutcome]) -> None: ...
    def out_of_time(self, round_: int, end_at: float) -> None: ...


def run_round(env: simpy.Environment, server: RoundServer):
    """One synchronous round: dispatch every participant, wait for delivery, the deadline or the quorum."""
    r = server.current_round
    trace = server.trace
    events_before = len(trace.events)
    setup = server.setup_round(r, env)
    start_at = env.now
    trace.event(r, start_at, SERVER, EventKind.ROUND_START)
    deadline_at = None if setup.deadline_s is None else start_at + setup.deadline_s
    deadline = None if setup.deadline_s is None else env.timeout(setup.deadline_s)
    everyone_ended, quorum_reached = env.event(), env.event()
    left, delivered = setup.plan.n, 0

    def on_end(device_round: DeviceRound) -> None:
        nonlocal left, delivered
        if device_round.out.done_at is not None:
            delivered += 1
            if delivered == setup.quorum:
                quorum_reached.succeed()
        left -= 1
        if left == 0:
            everyone_ended.succeed()

    rounds = [DeviceRound(env, setup, i, trace, on_end, deadline_at, deadline) for i in range(setup.plan.n)]
    server.active = dict(zip(setup.columns.devices, rounds))
    for device_round in rounds:
        device_round.start()
    server.watch(env, setup.plan.devices)
    if rounds:
        yield everyone_ended | quorum_reached
        for device_round in rounds:          # quorum: stop the others where they are (at once)
            if device_round.is_alive:
                device_round.interrupt(StopCause.QUORUM)
    server.unwatch()
    server.active = {}
    outcomes = [device_round.out for device_round in rounds]
    if server.time_budget_s is not None and env.now > server.time_budget_s * (1.0 + TIME_RTOL):
        # the round would end after the time budget: the run ends with the round before; this one's events
        # (buffered since the last round's flush) are forgotten and nothing is aggregated
        trace.events.truncate(events_before)
        server.out_of_time(r, env.now)
        return
    # the deadline ended the round only if it cut a device still working (not one that had left: churn)
    if deadline_at is not None and env.now >= deadline_at and any(o.done_at is None and o.stopped is None
                                                                  for o in outcomes):
        trace.event(r, env.now, SERVER, EventKind.DEADLINE)
    trace.event(r, env.now, SERVER, EventKind.ROUND_END)
    server.finish_round(setup, start_at, env.now, outcomes)


def serve_rounds(env: simpy.Environment, server: RoundServer, rounds: int,
                 on_round: Callable[[int], None] | None = None):
    """The server process: `rounds` synchronous rounds back to back, or as many as end within the time
    budget (`server.ended_by` says which limit ended the run)."""
    while server.current_round < rounds:
        yield from server.wait_for_devices(env)
        yield from run_round(env, server)
        if server.ended_by is not None:
            return
        server.current_round += 1
        if on_round is not None:
            on_round(server.current_round)
    server.ended_by = "rounds"


def run_events(env: simpy.Environment) -> None:
    """`env.run()`, with everything built before the simulation exempt from the cyclic garbage collector.

    The libraries, the model, the data and the fleet live for the whole run; a round creates and frees
    thousands of events and device rounds, which trigger full collections. Left in the heap, the few
    hundred thousand objects of torch, numpy and pyarrow make each full collection cost ~90 ms here (about
    10 ms a round in a 1,000-device round). Frozen (`gc.freeze`), they are not traversed until the run ends.
    No collection first: it would cost as much, for the few hundred garbage objects a build leaves (they
    are collected after the run, once unfrozen).
    """
    gc.freeze()
    try:
        env.run()
    finally:
        gc.unfreeze()
