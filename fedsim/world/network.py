"""Networks: static routes over a networkx graph and exact transfer times under max-min fair sharing.

The model (a fluid model, exact between events):

* Infrastructure is an undirected graph of named nodes (one server, routers, access points) and links.
  A link has two independent capacities: `down_bps` for traffic from the server towards devices and
  `up_bps` for traffic towards the server. FL traffic only ever runs server <-> device, so "down" and
  "up" are unambiguous on every link, whatever its geometry.
* Devices are not graph nodes (a 100,000-node graph would cost memory for nothing): a device has a
  private access link (its own radio: the fleet's downlink_bps/uplink_bps, a Shannon-rate wireless
  channel, or none) ending at its class's attach node, then the static route from that node to the
  server: one shortest path per attach node, by summed latency (or by hops), computed once.
* Every concurrent transfer (a flow) crossing a link direction shares its capacity. Rates are max-min
  fair over the whole path (progressive filling), recomputed whenever a flow starts, ends or is cut, or
  a capacity changes. Between two such events rates are constant, so completion times are exact.
* Latency: a transfer pushes its bytes through at the shared rates, then waits the route's latency
  (device latency_s + the links' latency_s) once: the propagation of the last bit.

Cost: a change re-shares only the group of flows connected to it through shared resources (in a star
network, the changed flow alone); simultaneous starts are batched into one recomputation, and a group
keeps a single completion timer. n flows ending one by one on one access point cost O(n^2) per round
(about 1 s for n = 2,000 here); 20,000 private-link flows cost about 0.4 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import numpy as np
import simpy

from fedsim.errors import FedsimError
from fedsim.spec.network import (AccessKind, ClassNetSpec, Direction, Fading, LinkSpec, NodeKind, NodeSpec,
                                 Preset, RouteMetric, TopologySpec, WirelessSpec, read_network_spec)
from fedsim.world.links import (Topology, build_topology, max_min_rates, path_gain, rayleigh_power_gain,
                                shannon_rate_bps)

__all__ = [
    "Direction", "Preset", "RouteMetric", "NodeKind", "AccessKind", "Fading", "NodeSpec", "LinkSpec",
    "WirelessSpec", "ClassNetSpec", "TopologySpec", "read_network_spec", "Topology", "build_topology",
    "Network", "Transfer", "TransferResult", "transfer", "max_min_rates", "shannon_rate_bps", "path_gain",
    "rayleigh_power_gain",
]


# -- the flow-level simulation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransferResult:
    done: bool           # all bytes arrived (latency included) by until_at, if one was given
    start_at: float
    end_at: float        # arrival time if done; else until_at
    bytes_sent: float    # bytes that left the sender (all of them if done)
    bytes_end_at: float  # when the last byte left, or the flow was cut: the radio's airtime ends here


# A flow whose remaining bits are below this fraction of its size ends now (rounding of simultaneous ends).
_DONE_FRACTION = 1e-9


class _Flow:
    __slots__ = ("id", "device", "resources", "total_bits", "remaining_bits", "rate", "updated_at",
                 "finish_at", "version", "timed", "event", "active")

    def __init__(self, fid: int, device: int, resources: tuple[int, ...], bits: float, now: float, event):
        self.id, self.device, self.resources = fid, device, resources
        self.total_bits = self.remaining_bits = bits
        self.rate = 0.0
        self.updated_at = self.finish_at = now
        self.version = 0
        self.timed = False    # a completion timer is pending for the current version
        self.event = event
        self.active = True


class Network:
    """The flows in progress on a `Topology`, inside one SimPy environment.

    Resources are link directions: infrastructure link i, direction d is `2 * i + d`; device k's private
    access link is `2 * n_links + 2 * k + d`. Completion timers are plain timeouts with a callback (no
    process, no polling); a rate change bumps the flow's version so that an outdated timer is ignored.
    """

    def __init__(self, env: simpy.Environment, topology: Topology):
        self.env = env
        self.topology = topology
        self._access = topology.access_bps.copy()
        self._base = 2 * topology.link_bps.shape[1]
        self._flows_on: dict[int, dict[int, _Flow]] = {}
        self._dirty: set[int] = set()
        self._pending = False
        self._next_id = 0

    @property
    def n_active(self) -> int:
        return len({fid for flows in self._flows_on.values() for fid in flows})

    def rates_bps(self) -> dict[int, float]:
        """Current rate of every active flow, by flow id (for tests and introspection)."""
        return {f.id: f.rate for flows in self._flows_on.values() for f in flows.values()}

    def set_access_bps(self, devices: np.ndarray, rates_bps: np.ndarray) -> None:
        """Change private-link capacities ((2, len(devices)) as from `Topology.access_rates_bps`);
        flows in progress on them are re-shared at once."""
        devices = np.asarray(devices, dtype=np.int64)
        rates_bps = np.asarray(rates_bps, dtype=np.float64)
        if np.any(~(rates_bps >= 0)):
            raise FedsimError(f"set_access_bps: capacities must be >= 0 bit/s, got {rates_bps.min()!r}")
        self._access[:, devices] = rates_bps
        self._mark([self._base + 2 * int(d) + k for d in devices for k in (0, 1)])

    def begin_round(self, devices: np.ndarray, rng: np.random.Generator) -> None:
        """Draw this round's fading for `devices` and apply it."""
        self.set_access_bps(devices, self.topology.access_rates_bps(devices, rng))

    def _capacity(self, r: int) -> float:
        if r < self._base:
            return float(self.topology.link_bps[r & 1, r >> 1])
        r -= self._base
        return float(self._access[r & 1, r >> 1])

    def _resources(self, device: int, direction: Direction) -> tuple[int, ...]:
        d = direction.value
        route = tuple(2 * i + d for i in self.topology.route_of(device))
        if math.isinf(self._access[d, device]):
            return route
        return (self._base + 2 * device + d, *route)

    def _open(self, device: int, direction: Direction, bits: float, until_at: float | None) -> _Flow:
        flow = _Flow(self._next_id, device, self._resources(device, direction), bits, self.env.now,
                     self.env.event())
        self._next_id += 1
        for r in flow.resources:
            self._flows_on.setdefault(r, {})[flow.id] = flow
        self._mark(flow.resources)
        if not flow.resources:
            self._finish(flow, flow.version)
        if until_at is not None:
            self.env.timeout(max(until_at - self.env.now, 0.0)).callbacks.append(partial(self._cut, flow))
        return flow

    def _close(self, flow: _Flow) -> None:
        """Remove an active flow (finished, cut or interrupted): its share goes to the others."""
        flow.remaining_bits = max(flow.remaining_bits - flow.rate * (self.env.now - flow.updated_at), 0.0)
        flow.updated_at = self.env.now
        flow.active = False
        for r in flow.resources:
            users = self._flows_on[r]
            del users[flow.id]
            if not users:
                del self._flows_on[r]
        self._mark(flow.resources)

    def _mark(self, resources: Iterable[int]) -> None:
        """Recompute the affected flows once, after every change at this instant has been made."""
        self._dirty.update(resources)
        if not self._pending and self._dirty:
            self._pending = True
            self.env.timeout(0).callbacks.append(self._reallocate)

    def _component(self, start: int, seen: set[int]) -> list[_Flow]:
        """The flows connected to resource `start` through shared resources, by flow id."""
        flows: dict[int, _Flow] = {}
        todo = [start]
        while todo:
            r = todo.pop()
            if r in seen:
                continue
            seen.add(r)
            for fid, f in self._flows_on.get(r, {}).items():
                if fid not in flows:
                    flows[fid] = f
                    todo.extend(f.resources)
        return [flows[k] for k in sorted(flows)]

    def _reallocate(self, _event=None) -> None:
        """Re-share every connected group of flows touching a changed resource.

        Any end in a group re-shares the whole group, so only the group's earliest finisher needs a
        timer: one SimPy event per change instead of one per flow (n flows on one access point would
        otherwise leave n^2 outdated timers in the event queue).
        """
        self._pending = False
        dirty, self._dirty = sorted(self._dirty), set()
        seen: set[int] = set()
        now = self.env.now
        for start in dirty:
            group = self._component(start, seen)
            if not group:
                continue
            for f in group:
                f.remaining_bits -= f.rate * (now - f.updated_at)
                f.updated_at = now
            done = [f for f in group if f.remaining_bits <= _DONE_FRACTION * f.total_bits]
            if done:   # simultaneous finishers: end them all; their removal re-shares the rest
                for f in done:
                    self._finish(f, f.version)
                continue
            for f, rate in zip(group, max_min_rates([f.resources for f in group], self._capacity)):
                if rate != f.rate:   # an unchanged rate keeps its finish time (and timer) exact
                    f.rate = rate
                    f.version += 1
                    f.timed = False
                    # A 0-bit/s capacity (a deep fade) stalls the flow until a capacity changes.
                    f.finish_at = now + f.remaining_bits / rate if rate > 0 else math.inf
            first = min(group, key=lambda f: (f.finish_at, f.id))
            if not first.timed and first.finish_at < math.inf:
                first.timed = True
                timer = self.env.timeout(max(first.finish_at - now, 0.0))
                timer.callbacks.append(partial(self._finish, first, first.version))

    def _finish(self, flow: _Flow, version: int, _event=None) -> None:
        if not flow.active or version != flow.version:
            return
        self._close(flow)
        flow.remaining_bits = 0.0
        flow.event.succeed(True)

    def _cut(self, flow: _Flow, _event=None) -> None:
        if not flow.active:
            return
        if flow.rate > 0 and flow.finish_at <= self.env.now:
            self._finish(flow, flow.version)   # finishing at this very instant: not cut
            return
        self._close(flow)
        flow.event.succeed(False)


class Transfer:
    """One transfer as SimPy callbacks, no process: `then(TransferResult)` runs when it has arrived.

    Send `nbytes` between the server and `device`: the bytes go through at the shared rates, then the
    route's latency passes. With `until_at`, a transfer that cannot arrive by then is cut at `until_at`
    (its flow leaves the links then) and ends with done=False at `until_at`. `cancel()` (the device went
    offline) removes the flow at once, so the others speed up, and `then` is never called.
    """

    __slots__ = ("network", "device", "direction", "nbytes", "until_at", "then", "start_at", "_flow", "_waiting",
                 "_waiting_callback")

    def __init__(self, network: "Network", device: int, direction: Direction, nbytes: float,
                 until_at: float | None, then: Callable[[TransferResult], None]):
        if not nbytes >= 0:
            raise FedsimError(f"transfer: nbytes must be >= 0, got {nbytes!r}")
        self.network, self.device, self.direction, self.nbytes = network, int(device), direction, float(nbytes)
        self.until_at, self.then = until_at, then
        self.start_at = network.env.now
        self._flow: _Flow | None = None
        self._waiting: simpy.Event | None = None
        self._waiting_callback = None

    def start(self) -> None:
        """Open the flow (a transfer of 0 bytes goes straight to its latency)."""
        if self.nbytes > 0:
            self._flow = self.network._open(self.device, self.direction, 8.0 * self.nbytes, self.until_at)
            self._wait(self._flow.event, self._bytes_out)
        else:
            self._bytes_out(None)

    def cancel(self) -> None:
        """Stop now: the flow leaves the links; nothing more happens."""
        if self._waiting is not None and self._waiting.callbacks is not None:
            self._waiting.callbacks.remove(self._waiting_callback)
        self._waiting = None
        if self._flow is not None and self._flow.active:
            self.network._close(self._flow)
        self.then = _ignore

    def _wait(self, event: simpy.Event, callback) -> None:
        self._waiting, self._waiting_callback = event, callback
        event.callbacks.append(callback)

    def _bytes_out(self, event: simpy.Event | None) -> None:
        env = self.network.env
        flow = self._flow
        delivered = True if event is None else event.value
        sent = self.nbytes if flow is None else (flow.total_bits - flow.remaining_bits) / 8.0
        bytes_end_at = env.now
        latency = float(self.network.topology.latency_s[self.device])
        until_at = self.until_at
        if delivered and (until_at is None or env.now + latency <= until_at):
            result = TransferResult(True, self.start_at, env.now + latency, sent, bytes_end_at)
            wait_s = latency
        else:
            end_at = env.now if until_at is None else max(until_at, env.now)
            result = TransferResult(False, self.start_at, end_at, sent, bytes_end_at)
            wait_s = end_at - env.now
        if wait_s > 0:
            self._wait(env.timeout(wait_s), lambda _event: self._end(result))
        else:
            self._end(result)

    def _end(self, result: TransferResult) -> None:
        self._waiting = None
        self.then(result)


def _ignore(_result) -> None:
    pass


def transfer(env: simpy.Environment, network: Network, device: int, direction: Direction, nbytes: float, *,
             until_at: float | None = None):
    """`Transfer` as a SimPy generator for a process: returns its TransferResult.

    Interrupting the calling process (the device goes offline) cancels the transfer (its flow leaves the
    links at once, so the others speed up) and re-raises the Interrupt.
    """
    if env is not network.env:
        raise FedsimError("transfer: the network belongs to another SimPy environment")
    arrived = env.event()
    job = Transfer(network, device, direction, nbytes, until_at, arrived.succeed)
    job.start()
    try:
        return (yield arrived)
    except simpy.Interrupt:
        job.cancel()
        raise
