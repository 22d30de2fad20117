"""The synchronous engine: the server's rounds, each running its participants' device rounds.

`env.now` is the only clock. `run_round` builds the round (`RoundSetup`, from the server). Event by event, it
starts every participant's `fedsim.sim.device_round.DeviceRound` (a chain of event callbacks: download, forward,
one event per layer's backward completion, uploads) and waits until all have ended, or until the quorum of
delivering devices is reached (overselect), when it stops the others where they are; the deadline is one SimPy
timeout per round that the devices it cuts wait on. A round whose participants cannot affect one another is
computed at once instead (`fedsim.sim.timeline`: the same rows and outcomes), and the server's process waits
until its end. Real gradients are computed only after the round's events are over, by the server callback
(`finish_round`), for exactly what each device delivered.
"""

from __future__ import annotations

import gc
from typing import Callable, Protocol

import numpy as np
import simpy

from fedsim.sim.device_round import DeviceOutcome, DeviceRound, StopCause
from fedsim.sim.outcomes import RoundOutcomes
from fedsim.sim.round_setup import RoundSetup
from fedsim.sim.timeline import Timeline, computable, compute_timeline
from fedsim.output.trace import SERVER, EventKind, TraceWriter
from fedsim.spec.scenario import TIME_RTOL

__all__ = ["DeviceOutcome", "DeviceRound", "RoundOutcomes", "RoundSetup", "RoundServer", "StopCause", "run_events",
           "run_round", "serve_rounds"]


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
                     outcomes: RoundOutcomes) -> None: ...
    def out_of_time(self, round_: int, end_at: float) -> None: ...
    def offline_at(self, devices, after_at: float) -> np.ndarray: ...     # next going offline, per device


def run_round(env: simpy.Environment, server: RoundServer, timeline: bool = True):
    """One synchronous round: dispatch every participant, wait for delivery, the deadline or the quorum.

    `timeline`: compute a round whose participants cannot affect one another at once (`fedsim.sim.timeline`)
    rather than event by event; the trace is the same either way."""
    r = server.current_round
    trace = server.trace
    events_before = len(trace.events)
    setup = server.setup_round(r, env)
    start_at = env.now
    trace.event(r, start_at, SERVER, EventKind.ROUND_START)
    deadline_at = None if setup.deadline_s is None else start_at + setup.deadline_s
    computed = _timeline(server, setup, start_at, deadline_at) if timeline else None
    if computed is not None:
        trace.event_rows(**computed.rows)
        if computed.end_at > env.now:
            yield env.timeout(_delay_to(env.now, computed.end_at))
        outcomes = computed.outcomes
    else:
        outcomes = yield from _dispatch(env, server, setup, deadline_at)
    if server.time_budget_s is not None and env.now > server.time_budget_s * (1.0 + TIME_RTOL):
        # the round would end after the time budget: the run ends with the round before; this one's events
        # (buffered since the last round's flush) are forgotten and nothing is aggregated
        trace.events.truncate(events_before)
        server.out_of_time(r, env.now)
        return
    # the deadline ended the round only if it cut a device still working (not one that had left: churn)
    if deadline_at is not None and env.now >= deadline_at and outcomes.any_cut():
        trace.event(r, env.now, SERVER, EventKind.DEADLINE)
    trace.event(r, env.now, SERVER, EventKind.ROUND_END)
    server.finish_round(setup, start_at, env.now, outcomes)


def _timeline(server: RoundServer, setup: RoundSetup, start_at: float, deadline_at: float | None) -> Timeline | None:
    """The round computed at once, if its participants cannot affect one another and none of them leaves before
    it stops working (a switch within two ulps of that is left to the event path, which orders such ties)."""
    if not computable(setup):
        return None
    leaves_at = server.offline_at(setup.plan.devices, start_at)
    finite = np.isfinite(leaves_at)
    margin_at = leaves_at[finite] - 2.0 * np.spacing(leaves_at[finite])
    if finite.any() and margin_at.min() <= start_at:
        return None                 # someone is offline already, or leaves at once: no need to compute the round
    computed = compute_timeline(setup, start_at, deadline_at)
    if finite.any() and not (computed.finish_at[finite] < margin_at).all():
        return None
    return computed


def _delay_to(now: float, at: float) -> float:
    """The delay whose timeout SimPy schedules at exactly `at` (it adds the delay to `now`)."""
    delay = at - now
    while now + delay < at:
        delay = float(np.nextafter(delay, np.inf))
    while now + delay > at:
        delay = float(np.nextafter(delay, -np.inf))
    return delay


def _dispatch(env: simpy.Environment, server: RoundServer, setup: RoundSetup, deadline_at: float | None):
    """The round event by event: one `DeviceRound` per participant; returns their outcomes."""
    trace = server.trace
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
    return RoundOutcomes.of([device_round.out for device_round in rounds])


def serve_rounds(env: simpy.Environment, server: RoundServer, rounds: int,
                 on_round: Callable[[int], None] | None = None, timeline: bool = True):
    """The server process: `rounds` synchronous rounds back to back, or as many as end within the time
    budget (`server.ended_by` says which limit ended the run). `timeline`: see `run_round`."""
    while server.current_round < rounds:
        yield from server.wait_for_devices(env)
        yield from run_round(env, server, timeline)
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
