"""The SimPy processes of a synchronous run: the server's rounds and each device's round.

`env.now` is the only clock. A device process yields one timeout per phase (download, forward, each
layer's backward, each layer's upload). The deadline is not a SimPy event every device waits on (that
would cost a condition per layer): a device compares the end of its next phase with the deadline and,
if the phase would overrun it, works until the deadline and reports what it had delivered by then.
Other endings are SimPy interrupts: the device going offline (churn) or the round reaching its quorum
(overselect). Either way the energy of the unfinished phase is accounted to the simulated second.
Real gradients are computed only after the round's processes are done, by the server callback, for
exactly what each device delivered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import simpy

from fedsim.network import Network
from fedsim.network import transfer as network_transfer
from fedsim.network_spec import Direction
from fedsim.scenario import DeviceClassSpec, UploadMode
from fedsim.timing import RoundPlan
from fedsim.trace import SERVER, DeviceStatus, EventKind, TraceWriter

__all__ = ["DeviceOutcome", "RoundSetup", "RoundServer", "StopCause", "run_device_round", "run_round",
           "serve_rounds"]


class StopCause(enum.Enum):
    OFFLINE = "offline"      # churn: the device left; undelivered work is lost
    QUORUM = "quorum"        # the round already has the updates it waits for


class _Phase(enum.Enum):
    DOWNLOAD = "download"
    COMPUTE = "compute"
    UPLOAD = "upload"


@dataclass(slots=True)
class DeviceOutcome:
    """What one participant did in one round, measured in simulated seconds."""
    depth: int = 0               # layers delivered (the last `depth` layers)
    layers_computed: int = 0
    download_s: float = 0.0
    compute_s: float = 0.0
    upload_s: float = 0.0
    active_until_at: float = 0.0   # simulated time the device stopped working in this round
    done_at: float | None = None   # time it delivered everything it intended to; None if stopped
    stopped: StopCause | None = None
    nonfinite: bool = False          # its update had NaN/Inf and was dropped

    def status(self, n_layers: int) -> DeviceStatus:
        if self.stopped is StopCause.OFFLINE:
            return DeviceStatus.OFFLINE
        if self.depth == 0:
            return DeviceStatus.NOTHING
        return DeviceStatus.COMPLETE if self.depth == n_layers else DeviceStatus.PARTIAL

    def add(self, phase: "_Phase", seconds: float) -> None:
        if phase is _Phase.DOWNLOAD:
            self.download_s += seconds
        elif phase is _Phase.COMPUTE:
            self.compute_s += seconds
        else:
            self.upload_s += seconds


@dataclass(frozen=True)
class _PlanColumns:
    """The plan's per-device numbers as Python lists: reading numpy scalars one by one costs ~10x more."""
    devices: list
    download_s: list
    forward_s: list
    backward_s: list       # list of per-device lists, in backward order
    target_depth: list
    download_bytes: list


@dataclass(frozen=True)
class RoundSetup:
    """Everything the processes of one round need; built by the server before the round starts."""
    round: int
    plan: RoundPlan
    deadline_s: float | None
    upload_mode: UploadMode
    powers: list[DeviceClassSpec]     # the class spec (power figures) of each participant
    quorum: int | None = None         # end the round once this many participants are done
    network: Network | None = None    # shared-link transfers; None: private links (plan durations)

    @cached_property
    def columns(self) -> _PlanColumns:
        p = self.plan
        return _PlanColumns(p.devices.tolist(), p.download_s.tolist(), p.forward_s.tolist(), p.backward_s.tolist(),
                            p.target_depth.tolist(), p.download_bytes.tolist())


class _Cut(Exception):
    """The next phase would overrun the deadline; the lane worked until the deadline."""


@dataclass(slots=True)
class _Lane:
    """One activity stream of a device (compute, or the uplink in streaming mode)."""
    env: simpy.Environment
    trace: TraceWriter
    round: int
    device: int
    limit_at: float
    out: DeviceOutcome
    phase: _Phase | None = None
    phase_start_at: float = 0.0
    power_w: float = 0.0
    layer: int = -1

    def run(self, phase: _Phase, dur: float, power_w: float, layer: int, end: EventKind, nbytes: int = 0):
        """One phase; raises _Cut at the deadline if it would end after it."""
        env = self.env
        self.phase, self.phase_start_at, self.power_w, self.layer = phase, env.now, power_w, layer
        if env.now + dur > self.limit_at:
            yield env.timeout(self.limit_at - env.now)
            self.stop(EventKind.CUT)
            raise _Cut
        yield env.timeout(dur)
        self.phase = None
        self.out.add(phase, dur)
        self.trace.event(self.round, env.now, self.device, end, layer, nbytes, power_w * dur)

    def transfer(self, network: Network, direction: Direction, phase: _Phase, nbytes: int, power_w: float,
                 layer: int, end: EventKind):
        """A transfer through the shared network model; raises _Cut if it cannot arrive by the deadline."""
        env = self.env
        self.phase, self.phase_start_at, self.power_w, self.layer = phase, env.now, power_w, layer
        until = None if self.limit_at == float("inf") else self.limit_at
        result = yield from network_transfer(env, network, self.device, direction, nbytes, until_at=until)
        if not result.done:
            self.stop(EventKind.CUT)
            raise _Cut
        self.phase = None
        dur = result.end_at - result.start_at
        self.out.add(phase, dur)
        self.trace.event(self.round, env.now, self.device, end, layer, nbytes, power_w * dur)

    def stop(self, kind: EventKind) -> None:
        """Account the unfinished phase (if any) up to now."""
        now = self.env.now
        if self.phase is not None:
            spent = now - self.phase_start_at
            self.out.add(self.phase, spent)
            self.trace.event(self.round, now, self.device, kind, self.layer, 0, self.power_w * spent)
            self.phase = None
        self.out.active_until_at = max(self.out.active_until_at, now)


def run_device_round(env: simpy.Environment, setup: RoundSetup, i: int, deadline_at: float | None,
                     trace: TraceWriter, on_done: Callable[[int], None] | None = None,
                     deadline: simpy.Event | None = None):
    """One participant's round: download, forward, per-layer backward, uploads; returns DeviceOutcome.

    `deadline`, if given, is the round's own event at `deadline_at`: devices the deadline cuts wait on it
    together instead of each scheduling a timeout of its own.
    """
    plan, r, cols = setup.plan, setup.round, setup.columns
    device = cols.devices[i]
    power = setup.powers[i]
    out = DeviceOutcome()
    limit = float("inf") if deadline_at is None else deadline_at
    lane = _Lane(env, trace, r, device, limit, out)
    uploader = None
    until_deadline = (lambda now: env.timeout(limit - now)) if deadline is None else (lambda now: deadline)
    mode = setup.upload_mode
    try:
        trace.event(r, env.now, device, EventKind.DOWNLOAD_START)
        if setup.network is not None:
            yield from lane.transfer(setup.network, Direction.DOWN, _Phase.DOWNLOAD, cols.download_bytes[i],
                                     power.power_rx_w, -1, EventKind.DOWNLOAD_END)
            phases = ((_Phase.COMPUTE, cols.forward_s[i], power.power_compute_w, EventKind.FORWARD_END, 0),)
        else:
            phases = ((_Phase.DOWNLOAD, cols.download_s[i], power.power_rx_w, EventKind.DOWNLOAD_END,
                       cols.download_bytes[i]),
                      (_Phase.COMPUTE, cols.forward_s[i], power.power_compute_w, EventKind.FORWARD_END, 0))
        for phase, dur, power_w, end, nbytes in phases:      # `_Lane.run`, inlined: once per device and phase
            now = env.now
            lane.phase, lane.phase_start_at, lane.power_w, lane.layer = phase, now, power_w, -1
            if now + dur > limit:
                yield until_deadline(now)
                lane.stop(EventKind.CUT)
                raise _Cut
            yield env.timeout(dur)
            lane.phase = None
            out.add(phase, dur)
            trace.event(r, now + dur, device, end, -1, nbytes, power_w * dur)
        queue = None
        if mode is UploadMode.STREAMING:
            queue = simpy.Store(env)
            up_lane = _Lane(env, trace, r, device, limit, out)
            uploader = env.process(_stream_uploads(env, setup, i, up_lane, queue))
        target = cols.target_depth[i]
        computed, compute_s, finished = 0, out.compute_s, False
        try:
            # The hot loop (one iteration per layer per device): state in locals, synced to `out` when the
            # loop ends however it ends; trace rows appended column by column.
            backward = cols.backward_s[i]
            layers = plan.layer_order
            power_w = power.power_compute_w
            timeout = env.timeout
            a_round, a_time, a_device, a_event, a_layer, a_bytes, a_energy = trace.event_columns()
            backward_end = EventKind.BACKWARD_END.value
            lane.phase, lane.power_w = _Phase.COMPUTE, power_w
            for k in range(target):
                dur = backward[k]
                now = env.now
                if now + dur > limit:
                    lane.phase_start_at, lane.layer = now, layers[k]
                    yield until_deadline(now)
                    out.compute_s = compute_s          # then stop() adds the unfinished layer's seconds
                    lane.stop(EventKind.CUT)
                    raise _Cut
                try:
                    yield timeout(dur)
                except simpy.Interrupt:
                    lane.phase_start_at, lane.layer = now, layers[k]    # the phase the interrupt cuts short
                    out.compute_s = compute_s
                    raise
                compute_s += dur
                computed += 1
                a_round(r)
                a_time(now + dur)          # == env.now: SimPy schedules the timeout at now + dur
                a_device(device)
                a_event(backward_end)
                a_layer(layers[k])
                a_bytes(0)
                a_energy(power_w * dur)
                if queue is not None:
                    queue.put(k)
            lane.phase = None
            finished = True
        finally:
            out.layers_computed = computed
            if mode is UploadMode.IDEAL:
                out.depth = computed
            if finished:
                out.compute_s = compute_s
            if queue is not None:
                queue.put(None)
        if uploader is not None:
            yield uploader
        elif mode is UploadMode.AFTER_COMPUTE:
            for k in range(target):
                yield from _upload(setup, i, k, lane)
        if out.depth == target:
            out.done_at = env.now
            if on_done is not None:
                on_done(i)
        out.active_until_at = max(out.active_until_at, env.now)
    except _Cut:
        if uploader is not None and uploader.is_alive:
            try:
                yield uploader       # it ends at the deadline too
            except simpy.Interrupt:
                pass                 # stopped at the deadline instant: nothing left to account
    except simpy.Interrupt as stop:
        out.stopped = stop.cause
        kind = EventKind.OFFLINE if stop.cause is StopCause.OFFLINE else EventKind.STOPPED
        lane.stop(kind)
        if uploader is not None and uploader.is_alive:
            uploader.interrupt(stop.cause)
            yield uploader
    return out


def _upload(setup: RoundSetup, i: int, k: int, lane: _Lane):
    """Send the gradient of the k-th layer in backward order; it counts once it has fully arrived."""
    plan = setup.plan
    layer = plan.layer_order[k]
    lane.trace.event(setup.round, lane.env.now, lane.device, EventKind.UPLOAD_START, layer)
    if setup.network is None:
        yield from lane.run(_Phase.UPLOAD, float(plan.upload_s[i, k]), setup.powers[i].power_tx_w, layer,
                            EventKind.UPLOAD_END, int(plan.upload_bytes[i, k]))
    else:
        yield from lane.transfer(setup.network, Direction.UP, _Phase.UPLOAD, int(plan.upload_bytes[i, k]),
                                 setup.powers[i].power_tx_w, layer, EventKind.UPLOAD_END)
    lane.out.depth += 1


def _stream_uploads(env, setup: RoundSetup, i: int, lane: _Lane, queue: simpy.Store):
    """Streaming mode: each finished layer is queued on the uplink; uploads run one after another."""
    try:
        while True:
            k = yield queue.get()
            if k is None or env.now >= lane.limit_at:
                return
            yield from _upload(setup, i, k, lane)
    except _Cut:
        return
    except simpy.Interrupt as stop:
        lane.stop(EventKind.OFFLINE if stop.cause is StopCause.OFFLINE else EventKind.STOPPED)


class RoundServer(Protocol):
    """The callbacks `serve_rounds` needs; `fedsim.server.Server` implements them."""

    current_round: int
    trace: TraceWriter
    active: dict[int, simpy.Process]     # device id -> its process in the round under way

    def setup_round(self, round_: int, env: simpy.Environment) -> RoundSetup: ...
    def wait_for_devices(self, env: simpy.Environment): ...
    def watch(self, env: simpy.Environment, devices) -> None: ...
    def unwatch(self) -> None: ...
    def finish_round(self, setup: RoundSetup, start_at: float, end_at: float,
                     outcomes: list[DeviceOutcome]) -> None: ...


def run_round(env: simpy.Environment, server: RoundServer):
    """One synchronous round: dispatch every participant, wait for delivery, the deadline or the quorum."""
    r = server.current_round
    setup = server.setup_round(r, env)
    start_at = env.now
    trace = server.trace
    trace.event(r, start_at, SERVER, EventKind.ROUND_START)
    deadline_at = None if setup.deadline_s is None else start_at + setup.deadline_s
    quorum_reached = env.event()
    done: list[int] = []

    def on_done(i: int) -> None:
        done.append(i)
        if setup.quorum is not None and len(done) == setup.quorum:
            quorum_reached.succeed()

    deadline = None if deadline_at is None else env.timeout(setup.deadline_s)
    procs = [env.process(run_device_round(env, setup, i, deadline_at, trace, on_done, deadline))
             for i in range(setup.plan.n)]
    server.active = dict(zip(setup.columns.devices, procs))
    server.watch(env, setup.plan.devices)
    if procs:
        everyone = simpy.AllOf(env, procs)
        yield everyone | quorum_reached
        if not everyone.triggered:                 # quorum: stop the others where they are
            running = [p for p in procs if p.is_alive]
            for p in running:
                p.interrupt(StopCause.QUORUM)
            # a fired condition detaches from the events it nests, so wait on a fresh one
            yield simpy.AllOf(env, running)
    server.unwatch()
    server.active = {}
    outcomes = [p.value for p in procs]
    if deadline_at is not None and env.now >= deadline_at and any(o.done_at is None for o in outcomes):
        trace.event(r, env.now, SERVER, EventKind.DEADLINE)
    trace.event(r, env.now, SERVER, EventKind.ROUND_END)
    server.finish_round(setup, start_at, env.now, outcomes)


def serve_rounds(env: simpy.Environment, server: RoundServer, rounds: int,
                 on_round: Callable[[int], None] | None = None):
    """The server process: `rounds` synchronous rounds back to back."""
    while server.current_round < rounds:
        yield from server.wait_for_devices(env)
        yield from run_round(env, server)
        server.current_round += 1
        if on_round is not None:
            on_round(server.current_round)
