"""The reference flow-level network: one Python object per flow, every re-share of a group runs the general
progressive filling over all of its flows (fedsim's network before flows were kept as columns per route).
`tests/test_network_oracle.py` checks the real `Network` against it, result for result.

One change from that earlier code: a flow opened onto a 0-bit/s link now starts with no finish time (it
stalls); it used to keep its start time as finish time and end at once.
"""

from __future__ import annotations

import heapq
import math
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np
import simpy

from fedsim.errors import FedsimError
from fedsim.spec.network import Direction
from fedsim.world.links import Topology

_DONE_FRACTION = 1e-9


def max_min_rates(paths: Sequence[Sequence[int]], capacity: Callable[[int], float]) -> list[float]:
    """Max-min fair rates of flows over shared resources (progressive filling).

    Repeatedly the resource with the smallest fair share (remaining capacity / unfrozen flows) fixes
    the rate of its unfrozen flows; their share is taken off every other resource they cross. A heap
    keyed by share makes it O((flows * path length) log resources). A flow crossing no resource is
    unconstrained (rate inf).
    """
    users: dict[int, list[int]] = {}
    for f, path in enumerate(paths):
        for r in path:
            users.setdefault(r, []).append(f)
    left = {r: capacity(r) for r in users}
    count = {r: len(fs) for r, fs in users.items()}
    key = {r: left[r] / count[r] for r in users}
    heap = [(k, r) for r, k in key.items()]
    heapq.heapify(heap)
    rates = [math.inf] * len(paths)
    frozen = [False] * len(paths)
    while heap:
        share, r = heapq.heappop(heap)
        if count[r] == 0 or share != key[r]:
            continue   # stale entry: a later push holds this resource's current share
        for f in users[r]:
            if frozen[f]:
                continue
            frozen[f] = True
            rates[f] = share
            for r2 in paths[f]:
                left[r2] = max(left[r2] - share, 0.0)
                count[r2] -= 1
                if r2 != r and count[r2] > 0:
                    key[r2] = left[r2] / count[r2]
                    heapq.heappush(heap, (key[r2], r2))
    return rates


class _Flow:
    __slots__ = ("id", "device", "resources", "total_bits", "remaining_bits", "rate", "updated_at",
                 "finish_at", "version", "timed", "event", "active")

    def __init__(self, fid: int, device: int, resources: tuple[int, ...], bits: float, now: float, event):
        self.id, self.device, self.resources = fid, device, resources
        self.total_bits = self.remaining_bits = bits
        self.rate = 0.0
        self.updated_at = now
        self.finish_at = math.inf
        self.version = 0
        self.timed = False    # a completion timer is pending for the current version
        self.event = event
        self.active = True


class ReferenceNetwork:
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


