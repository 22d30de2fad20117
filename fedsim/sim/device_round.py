"""One participant's round in simulated time: a chain of SimPy event callbacks, not a process.

A device's round is a download, a forward pass, one backward phase per layer (last layer first) and the
uploads its upload mode asks for. Each phase is one SimPy timeout (or one `Transfer` through a shared
network) whose callback starts the next phase. There is no generator and no process per device: a
round of 1,000 devices costs the events of their phases and nothing else (a process per device would
add a start event, an end event and a generator resume per phase).

Deadline. A phase that would end after the deadline is not scheduled: the device works until the
deadline (waiting on the round's deadline event, one event shared by every device it cuts), records a
`cut` event with the energy of the unfinished phase, and delivers what it had by then.

Lanes. The compute lane runs the download, the forward pass, the backward phases and, in `after_compute`
mode, the uploads. In `streaming` mode the uplink is a second lane: each layer is queued for upload when
its backward phase ends, and uploads run one after another, in backward order. The round ends when every
lane has ended; `on_end(device_round)` then runs.

Interrupts. `interrupt(cause)` ends the round at once (churn: the device left; quorum: the round already
has what it waits for): the pending events are detached, the unfinished phase of each lane is accounted
up to the current simulated second (an `offline` or `stopped` event) and `on_end` runs. A SimPy process
interrupt would take effect at the next event; this one takes effect within the caller's event, which for
the device is the same: none of its events runs in between. (The churn watcher reports a switch after
every other event due at its instant: a phase ending exactly as its device leaves counts.)
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import simpy
from simpy.events import Timeout

from fedsim.world.network import Transfer, TransferResult
from fedsim.world.stragglers import NOT_A_STRAGGLER, deepest_layer
from fedsim.spec.network import Direction
from fedsim.spec.scenario import UploadMode
from fedsim.output.trace import DeviceStatus, EventKind, TraceWriter

if TYPE_CHECKING:
    from fedsim.sim.round_setup import RoundSetup

__all__ = ["DeviceOutcome", "DeviceRound", "StopCause"]


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
    done_at: float | None = None   # time it delivered everything it intended to; None if not
    stopped: StopCause | None = None
    nonfinite: bool = False          # its update had NaN/Inf and was dropped

    def status(self, n_layers: int) -> DeviceStatus:
        if self.stopped is StopCause.OFFLINE:
            return DeviceStatus.OFFLINE
        if self.depth == 0:
            return DeviceStatus.NOTHING
        return DeviceStatus.COMPLETE if self.depth == n_layers else DeviceStatus.PARTIAL

    def add(self, phase: _Phase, seconds: float) -> None:
        if phase is _Phase.DOWNLOAD:
            self.download_s += seconds
        elif phase is _Phase.COMPUTE:
            self.compute_s += seconds
        else:
            self.upload_s += seconds


_BACKWARD_END = EventKind.BACKWARD_END.value


class _Lane:
    """One activity stream of a device: the phase under way and the event it waits on."""

    __slots__ = ("dev", "phase", "phase_start_at", "power_w", "layer", "dur", "end_kind", "nbytes", "then",
                 "waiting", "callback", "transfer", "ended")

    def __init__(self, dev: DeviceRound):
        self.dev = dev
        self.phase: _Phase | None = None
        self.phase_start_at = 0.0
        self.power_w = 0.0
        self.layer = -1
        self.dur = 0.0
        self.end_kind = EventKind.CUT
        self.nbytes = 0
        self.then: Callable[[], None] | None = None
        self.waiting: simpy.Event | None = None
        self.callback = None
        self.transfer: Transfer | None = None
        self.ended = False

    def begin(self, phase: _Phase, power_w: float, layer: int) -> None:
        self.phase, self.phase_start_at, self.power_w, self.layer = phase, self.dev.env.now, power_w, layer

    def wait(self, event: simpy.Event, callback) -> None:
        self.waiting, self.callback = event, callback
        event.callbacks.append(callback)

    def run(self, phase: _Phase, dur: float, power_w: float, layer: int, end_kind: EventKind, nbytes: int,
            then: Callable[[], None]) -> None:
        """A phase of `dur` simulated seconds, then `then()`; cut at the deadline if it would end after it."""
        self.begin(phase, power_w, layer)
        if self.phase_start_at + dur > self.dev.limit_at:
            self.until_deadline()
            return
        self.dur, self.end_kind, self.nbytes, self.then = dur, end_kind, nbytes, then
        self.wait(Timeout(self.dev.env, dur), self._ran)

    def _ran(self, _event) -> None:
        self.waiting = None
        self.end_phase(self.dur)
        self.then()

    def send(self, direction: Direction, phase: _Phase, nbytes: int, power_w: float, layer: int,
             end_kind: EventKind, then: Callable[[], None]) -> None:
        """A transfer through the shared network, then `then()`; cut if it cannot arrive by the deadline."""
        self.begin(phase, power_w, layer)
        self.end_kind, self.nbytes, self.then = end_kind, nbytes, then
        dev = self.dev
        until_at = None if dev.limit_at == float("inf") else dev.limit_at
        self.transfer = Transfer(dev.setup.network, dev.device, direction, nbytes, until_at, self._sent)
        self.transfer.start()

    def _sent(self, result: TransferResult) -> None:
        self.transfer = None
        if not result.done:
            self.cut()
            return
        self.end_phase(result.end_at - result.start_at)
        self.then()

    def end_phase(self, dur: float) -> None:
        """The phase under way has ended after `dur` seconds: account it and record its end event."""
        dev = self.dev
        dev.out.add(self.phase, dur)
        dev.trace.event(dev.round, dev.env.now, dev.device, self.end_kind, self.layer, self.nbytes, self.power_w * dur)
        self.phase = None

    def until_deadline(self) -> None:
        """The phase under way would overrun the deadline: work until it, then cut."""
        dev = self.dev
        if dev.env.now >= dev.limit_at:      # at the deadline already (its event may have been processed)
            self.cut()
            return
        event = dev.deadline if dev.deadline is not None else Timeout(dev.env, dev.limit_at - dev.env.now)
        self.wait(event, self._at_deadline)

    def _at_deadline(self, _event) -> None:
        if not self.ended:      # an interrupted lane leaves its callback on the shared deadline event
            self.waiting = None
            self.cut()

    def cut(self) -> None:
        self.dev.was_cut = True
        self.stop(EventKind.CUT)
        self.end()

    def stop(self, kind: EventKind) -> None:
        """Account the unfinished phase (if any) up to now, as a `kind` event."""
        if self.phase is not None:
            dev = self.dev
            now = dev.env.now
            spent = now - self.phase_start_at
            dev.out.add(self.phase, spent)
            dev.trace.event(dev.round, now, dev.device, kind, self.layer, 0, self.power_w * spent)
            self.phase = None

    def detach(self) -> None:
        """Forget the pending event or transfer: nothing this lane scheduled will call it back.

        The round's shared deadline event keeps the callback (`_at_deadline` ignores an ended lane):
        removing it from a list of up to one callback per device would cost O(devices) per interrupt.
        """
        waiting = self.waiting
        if waiting is not None and waiting is not self.dev.deadline and waiting.callbacks is not None:
            waiting.callbacks.remove(self.callback)
        self.waiting = None
        if self.transfer is not None:
            self.transfer.cancel()
            self.transfer = None

    def end(self) -> None:
        self.ended = True
        self.dev.lane_ended(self)


class DeviceRound:
    """Participant `i` of a round (`RoundSetup`): `start()` it; `on_end(self)` runs when it is over.

    `deadline_at` (None: no deadline) is the absolute simulated time of the deadline; `deadline`, if given,
    is the round's own event at that time, which the devices it cuts wait on together.
    """

    __slots__ = ("env", "setup", "i", "round", "device", "limit_at", "deadline", "trace", "on_end", "out",
                 "is_alive", "was_cut", "target", "compute", "uplink", "_queue", "_uplink_busy", "_k",
                 "_layer_s", "_on_layer", "_backward_s", "_layers", "_compute_w", "_ideal")

    def __init__(self, env: simpy.Environment, setup: RoundSetup, i: int, trace: TraceWriter,
                 on_end: Callable[[DeviceRound], None], deadline_at: float | None = None,
                 deadline: simpy.Event | None = None):
        cols = setup.columns
        self.env, self.setup, self.i, self.round, self.trace, self.on_end = env, setup, i, setup.round, trace, on_end
        self.device = cols.devices[i]
        self.limit_at = float("inf") if deadline_at is None else deadline_at
        self.deadline = deadline
        self.out = DeviceOutcome()
        self.is_alive = True
        self.was_cut = False
        self.target = cols.target_depth[i]
        self.compute = _Lane(self)
        streaming = setup.upload_mode is UploadMode.STREAMING
        self.uplink = _Lane(self) if streaming else None
        self._queue: collections.deque[int] | None = collections.deque() if streaming else None
        self._uplink_busy = False
        self._k = 0                  # next layer of the backward pass (in backward order), then of the uploads
        self._layer_s = 0.0          # duration of the backward phase under way
        self._on_layer = self._layer_done
        self._ideal = setup.upload_mode is UploadMode.IDEAL

    # -- the compute lane --------------------------------------------------------------------------
    def start(self) -> None:
        if not self.is_alive:
            raise RuntimeError(f"device {self.device}'s round was interrupted before it started")
        setup, cols, i = self.setup, self.setup.columns, self.i
        power = setup.powers[i]
        drawn = setup.straggler_depth
        if drawn is not None and drawn[i] != NOT_A_STRAGGLER:
            self.trace.event(self.round, self.env.now, self.device, EventKind.STRAGGLER,
                             deepest_layer(setup.plan, int(drawn[i])))
        self.trace.event(self.round, self.env.now, self.device, EventKind.DOWNLOAD_START)
        if setup.network is not None:
            self.compute.send(Direction.DOWN, _Phase.DOWNLOAD, cols.download_bytes[i], power.power_rx_w, -1,
                              EventKind.DOWNLOAD_END, self._forward)
        else:
            self.compute.run(_Phase.DOWNLOAD, cols.download_s[i], power.power_rx_w, -1, EventKind.DOWNLOAD_END,
                             cols.download_bytes[i], self._forward)

    def _forward(self) -> None:
        setup, i = self.setup, self.i
        self.compute.run(_Phase.COMPUTE, setup.columns.forward_s[i], setup.powers[i].power_compute_w, -1,
                         EventKind.FORWARD_END, 0, self._backward)

    def _backward(self) -> None:
        cols = self.setup.columns
        self._backward_s = cols.backward_s[self.i]
        self._layers = self.setup.plan.layer_order
        self._compute_w = self.compute.power_w = self.setup.powers[self.i].power_compute_w
        self.compute.phase = _Phase.COMPUTE      # from here to the end of the backward pass
        self._next_layer()

    def _next_layer(self) -> None:
        """Start the next backward phase, or end the backward pass. The hot path: one call per layer."""
        k = self._k
        if k == self.target:
            self._backward_done()
            return
        dur = self._backward_s[k]
        lane = self.compute
        now = self.env.now
        lane.phase_start_at = now
        lane.layer = self._layers[k]
        if now + dur > self.limit_at:
            lane.until_deadline()
            return
        self._layer_s = dur
        event = Timeout(self.env, dur)
        event.callbacks.append(self._on_layer)
        lane.waiting, lane.callback = event, self._on_layer

    def _layer_done(self, _event) -> None:
        k = self._k
        dur = self._layer_s
        out = self.out
        out.compute_s += dur
        self._k = out.layers_computed = k + 1
        if self._ideal:
            out.depth = k + 1
        a_round, a_time, a_device, a_event, a_layer, a_bytes, a_energy = self.trace.event_columns()
        a_round(self.round)
        a_time(self.env.now)
        a_device(self.device)
        a_event(_BACKWARD_END)
        a_layer(self.compute.layer)
        a_bytes(0)
        a_energy(self._compute_w * dur)
        queue = self._queue
        if queue is None:
            self._next_layer()
            return
        queue.append(k)
        self._next_layer()          # scheduled before the upload: the order a layer's events are recorded in
        if not self._uplink_busy and not self.uplink.ended:
            self._upload_next()

    def _backward_done(self) -> None:
        self.compute.phase = None
        if self.setup.upload_mode is UploadMode.AFTER_COMPUTE:
            self._k = 0
            self._upload_after_compute()
        else:
            self.compute.end()

    def _upload_after_compute(self) -> None:
        if self._k == self.target:
            self.compute.end()
            return
        self._upload(self.compute, self._k, self._uploaded_after_compute)

    def _uploaded_after_compute(self) -> None:
        self.out.depth += 1
        self._k += 1
        self._upload_after_compute()

    # -- uploads -----------------------------------------------------------------------------------
    def _upload(self, lane: _Lane, k: int, then: Callable[[], None]) -> None:
        """Send the gradient of the k-th layer in backward order; it counts once it has fully arrived."""
        setup, i = self.setup, self.i
        plan = setup.plan
        layer = plan.layer_order[k]
        power_w = setup.powers[i].power_tx_w
        self.trace.event(self.round, self.env.now, self.device, EventKind.UPLOAD_START, layer)
        nbytes = int(plan.upload_bytes[i, k])
        if setup.network is None:
            lane.run(_Phase.UPLOAD, float(plan.upload_s[i, k]), power_w, layer, EventKind.UPLOAD_END, nbytes, then)
        else:
            lane.send(Direction.UP, _Phase.UPLOAD, nbytes, power_w, layer, EventKind.UPLOAD_END, then)

    def _upload_next(self) -> None:
        """Streaming: upload the next finished layer; end the uplink once nothing more can come."""
        queue, lane = self._queue, self.uplink
        if queue and self.env.now < self.limit_at:
            self._uplink_busy = True
            self._upload(lane, queue.popleft(), self._uploaded_streaming)
        elif queue or self.compute.ended:
            self._uplink_busy = False
            lane.end()
        else:
            self._uplink_busy = False          # idle until the next layer's backward phase ends

    def _uploaded_streaming(self) -> None:
        self.out.depth += 1
        self._upload_next()

    # -- the end -----------------------------------------------------------------------------------
    def lane_ended(self, lane: _Lane) -> None:
        uplink = self.uplink
        if uplink is not None and lane is self.compute and not uplink.ended and not self._uplink_busy:
            self._upload_next()              # the backward pass is over: nothing more will be queued
            return
        if self.is_alive and self.compute.ended and (uplink is None or uplink.ended):
            self._finish()

    def interrupt(self, cause: StopCause) -> None:
        """End the round now: churn (`OFFLINE`) or the round's quorum (`QUORUM`)."""
        if not self.is_alive:
            raise RuntimeError(f"device {self.device}'s round has ended and cannot be interrupted")
        kind = EventKind.OFFLINE if cause is StopCause.OFFLINE else EventKind.STOPPED
        self.out.stopped = cause
        for lane in (self.compute, self.uplink):
            if lane is not None and not lane.ended:
                lane.detach()
                lane.stop(kind)
                lane.ended = True
        self._finish()

    def _finish(self) -> None:
        self.is_alive = False
        out = self.out
        now = self.env.now
        out.active_until_at = max(out.active_until_at, now)
        if not self.was_cut and out.stopped is None and out.depth == self.target:
            out.done_at = now
        self.on_end(self)
