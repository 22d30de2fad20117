"""The SimPy processes of a synchronous run: the server's rounds and each device's round.

`env.now` is the only clock. A device process yields one timeout per phase (download, forward, each
layer's backward, each layer's upload). The deadline is not a SimPy event every device waits on (that
would cost a condition per layer): a device compares the end of its next phase with the deadline and,
if the phase would overrun it, idles until the deadline and reports what it had delivered by then.
Real gradients are computed only after the round's processes are done, by the server callback, for
exactly what each device delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import simpy

from fedsim.scenario import DeviceClassSpec, UploadMode
from fedsim.timing import RoundPlan
from fedsim.trace import SERVER, DeviceStatus, EventKind, TraceWriter

__all__ = ["DeviceOutcome", "RoundSetup", "RoundServer", "run_device_round", "run_round", "serve_rounds"]


@dataclass
class DeviceOutcome:
    """What one participant did in one round, measured in simulated seconds."""
    depth: int = 0               # layers delivered (the last `depth` layers)
    layers_computed: int = 0
    download_s: float = 0.0
    compute_s: float = 0.0
    upload_s: float = 0.0
    active_until_at: float = 0.0   # simulated time the device stopped working in this round
    done_at: float | None = None   # time it delivered everything it intended to, None if cut

    def status(self, n_layers: int) -> DeviceStatus:
        if self.depth == 0:
            return DeviceStatus.NOTHING
        return DeviceStatus.COMPLETE if self.depth == n_layers else DeviceStatus.PARTIAL


@dataclass(frozen=True)
class RoundSetup:
    """Everything the processes of one round need; built by the server before the round starts."""
    round: int
    plan: RoundPlan
    deadline_s: float | None
    upload_mode: UploadMode
    powers: list[DeviceClassSpec]     # the class spec (power figures) of each participant


class RoundServer(Protocol):
    """The callbacks `serve_rounds` needs; `fedsim.server.Server` implements them."""

    current_round: int
    trace: TraceWriter

    def setup_round(self, round_: int, env: simpy.Environment) -> RoundSetup: ...
    def finish_round(self, setup: RoundSetup, start_at: float, end_at: float,
                     outcomes: list[DeviceOutcome]) -> None: ...


def _cut(env, trace, r, device, deadline_at, power_w, layer, out: DeviceOutcome):
    """Idle the rest of the round in the current phase and record the energy spent on it."""
    spent_s = deadline_at - env.now
    yield env.timeout(spent_s)
    trace.event(r, env.now, device, EventKind.CUT, layer, 0, power_w * spent_s)
    out.active_until_at = env.now
    return spent_s


def run_device_round(env: simpy.Environment, setup: RoundSetup, i: int, deadline_at: float | None,
                     trace: TraceWriter):
    """One participant's round: download, forward, per-layer backward, uploads; returns DeviceOutcome."""
    plan, r = setup.plan, setup.round
    device = int(plan.devices[i])
    power = setup.powers[i]
    out = DeviceOutcome()
    mode = setup.upload_mode
    n_layers = len(plan.layer_order)
    target = int(plan.target_depth[i]) if mode is UploadMode.AFTER_COMPUTE else n_layers
    limit = float("inf") if deadline_at is None else deadline_at

    trace.event(r, env.now, device, EventKind.DOWNLOAD_START)
    dur = float(plan.download_s[i])
    if env.now + dur > limit:
        out.download_s = yield from _cut(env, trace, r, device, limit, power.power_rx_w, -1, out)
        return out
    yield env.timeout(dur)
    out.download_s = dur
    trace.event(r, env.now, device, EventKind.DOWNLOAD_END, -1, plan.download_bytes, power.power_rx_w * dur)

    dur = float(plan.forward_s[i])
    if env.now + dur > limit:
        out.compute_s = yield from _cut(env, trace, r, device, limit, power.power_compute_w, -1, out)
        return out
    yield env.timeout(dur)
    out.compute_s = dur
    trace.event(r, env.now, device, EventKind.FORWARD_END, -1, 0, power.power_compute_w * dur)

    uploader = None
    queue = None
    if mode is UploadMode.STREAMING:
        queue = simpy.Store(env)
        uploader = env.process(_stream_uploads(env, setup, i, limit, queue, trace, out))

    backward = plan.backward_s[i]
    for k in range(target):
        dur = float(backward[k])
        layer = plan.layer_order[k]
        if env.now + dur > limit:
            out.compute_s += yield from _cut(env, trace, r, device, limit, power.power_compute_w, layer, out)
            if mode is UploadMode.IDEAL:
                out.depth = out.layers_computed
            if queue is not None:
                queue.put(None)
                yield uploader
            return out
        yield env.timeout(dur)
        out.compute_s += dur
        out.layers_computed += 1
        trace.event(r, env.now, device, EventKind.BACKWARD_END, layer, 0, power.power_compute_w * dur)
        if queue is not None:
            queue.put(k)

    if mode is UploadMode.IDEAL:
        out.depth = out.layers_computed
    elif mode is UploadMode.STREAMING:
        queue.put(None)
        yield uploader
        if out.depth < out.layers_computed:
            return out
    else:
        for k in range(target):
            if not (yield from _upload(env, setup, i, k, limit, trace, out)):
                return out
    out.active_until_at = env.now
    out.done_at = env.now
    return out


def _upload(env, setup: RoundSetup, i: int, k: int, limit: float, trace: TraceWriter, out: DeviceOutcome):
    """Send the gradient of the k-th layer in backward order; False if the deadline cut it."""
    plan, r = setup.plan, setup.round
    device = int(plan.devices[i])
    power_w = setup.powers[i].power_tx_w
    layer = plan.layer_order[k]
    dur = float(plan.upload_s[i, k])
    if env.now >= limit:
        return False
    trace.event(r, env.now, device, EventKind.UPLOAD_START, layer)
    if env.now + dur > limit:
        out.upload_s += yield from _cut(env, trace, r, device, limit, power_w, layer, out)
        return False
    yield env.timeout(dur)
    out.upload_s += dur
    out.depth += 1
    trace.event(r, env.now, device, EventKind.UPLOAD_END, layer, plan.upload_bytes[k], power_w * dur)
    return True


def _stream_uploads(env, setup: RoundSetup, i: int, limit: float, queue: simpy.Store, trace, out):
    """Streaming mode: each finished layer is queued on the uplink; uploads run one after another."""
    while True:
        k = yield queue.get()
        if k is None or not (yield from _upload(env, setup, i, k, limit, trace, out)):
            return


def run_round(env: simpy.Environment, server: RoundServer):
    """One synchronous round: dispatch every participant, wait for delivery or the deadline."""
    r = server.current_round
    setup = server.setup_round(r, env)
    start_at = env.now
    trace = server.trace
    trace.event(r, start_at, SERVER, EventKind.ROUND_START)
    deadline_at = None if setup.deadline_s is None else start_at + setup.deadline_s
    procs = [env.process(run_device_round(env, setup, i, deadline_at, trace)) for i in range(setup.plan.n)]
    if procs:
        yield simpy.AllOf(env, procs)
    outcomes = [p.value for p in procs]
    if deadline_at is not None and any(o.done_at is None for o in outcomes):
        trace.event(r, env.now, SERVER, EventKind.DEADLINE)
    trace.event(r, env.now, SERVER, EventKind.ROUND_END)
    server.finish_round(setup, start_at, env.now, outcomes)


def serve_rounds(env: simpy.Environment, server: RoundServer, rounds: int,
                 on_round: Callable[[int], None] | None = None):
    """The server process: `rounds` synchronous rounds back to back."""
    while server.current_round < rounds:
        yield from run_round(env, server)
        server.current_round += 1
        if on_round is not None:
            on_round(server.current_round)
