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
keeps a single completion timer. The flows of one route are a `Bundle` of numpy columns, so re-sharing a
group costs array operations, not a Python step per flow: one route (an access point and its backhaul, with
or without private radios) in a few (`sharing.one_route_max_min_rates`), several routes sharing links in a
few per link (`sharing.routes_max_min_rates`). Only a group in which one device has two flows in one
direction runs the general progressive filling (`sharing.max_min_rates`). The same rates every way, bit for
bit.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import numpy as np
import simpy

from fedsim.errors import FedsimError
from fedsim.spec.network import (AccessKind, ClassNetSpec, Direction, Fading, LinkSpec, NodeKind, NodeSpec,
                                 Preset, RouteMetric, TopologySpec, WirelessSpec, read_network_spec)
from fedsim.world.bundles import Bundle
from fedsim.world.links import Topology, build_topology, path_gain, rayleigh_power_gain, shannon_rate_bps
from fedsim.world.sharing import max_min_rates, one_route_max_min_rates, route_share, routes_max_min_rates
from fedsim.world.transfer import Transfer, TransferResult, transfer

__all__ = [
    "Direction", "Preset", "RouteMetric", "NodeKind", "AccessKind", "Fading", "NodeSpec", "LinkSpec",
    "WirelessSpec", "ClassNetSpec", "TopologySpec", "read_network_spec", "Topology", "build_topology",
    "Network", "Transfer", "TransferResult", "transfer", "max_min_rates", "shannon_rate_bps", "path_gain",
    "rayleigh_power_gain",
]


# -- the flow-level simulation ------------------------------------------------------------------------------

# A flow whose remaining bits are below this fraction of its size ends now (rounding of simultaneous ends).
_DONE_FRACTION = 1e-9


class _Flow:
    """One transfer's flow. While it is active its numbers live in its bundle's columns; once it has left
    the links, `remaining_bits`, `rate` and `finish_at` hold its last values."""

    __slots__ = ("id", "device", "resources", "total_bits", "remaining_bits", "rate", "finish_at", "event",
                 "active", "bundle")

    def __init__(self, fid: int, device: int, resources: tuple[int, ...], bits: float, event):
        self.id, self.device, self.resources = fid, device, resources
        self.total_bits = self.remaining_bits = bits
        self.rate = 0.0
        self.finish_at = math.inf
        self.event = event
        self.active = True
        self.bundle: Bundle | None = None


class Network:
    """The flows in progress on a `Topology`, inside one SimPy environment.

    Resources are link directions: infrastructure link i, direction d is `2 * i + d`; device k's private
    access link is `2 * n_links + 2 * k + d`. The flows of one route and direction are one `Bundle` (columns);
    bundles whose routes share a link form a connected group, re-shared together. Completion timers are
    plain timeouts with a callback (no process, no polling); a rate change bumps the flow's version so that
    an outdated timer is ignored.
    """

    def __init__(self, env: simpy.Environment, topology: Topology):
        self.env = env
        self.topology = topology
        self._access = topology.access_bps.copy()
        self._base = 2 * topology.link_bps.shape[1]
        self._bundles: dict[tuple[int, ...], Bundle] = {}
        self._bundles_on: dict[int, dict[tuple[int, ...], Bundle]] = {}   # link direction -> bundles crossing it
        self._private_users: dict[int, int] = {}                           # private link -> flows on it
        self._dirty: set[int] = set()
        self._pending = False
        self._next_id = 0
        # each class's route in each direction, as resource numbers
        self._class_of = topology.class_of
        self._class_routes = [[tuple(2 * i + d for i in route) for route in topology.device_route] for d in (0, 1)]

    @property
    def n_active(self) -> int:
        return sum(b.n for b in self._bundles.values())

    def rates_bps(self) -> dict[int, float]:
        """Current rate of every active flow, by flow id (for tests and introspection)."""
        return {int(i): float(r) for b in self._bundles.values() for i, r in zip(b.ids[:b.n], b.rate_bps[:b.n])}

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

    def _route(self, device: int, d: int) -> tuple[int, ...]:
        return self._class_routes[d][self._class_of[device]]     # (a numpy int indexes the list)

    def _open(self, device: int, direction: Direction, bits: float, until_at: float | None) -> _Flow:
        d = direction.value
        route = self._route(device, d)
        private = not math.isinf(self._access[d, device])
        resources = (self._base + 2 * device + d, *route) if private else route
        flow = _Flow(self._next_id, device, resources, bits, self.env.event())
        self._next_id += 1
        if resources:
            key = route or resources
            bundle = self._bundles.get(key)
            if bundle is None:
                bundle = self._bundles[key] = Bundle(key, route, d, self.env.now)
                for r in route:
                    self._bundles_on.setdefault(r, {})[key] = bundle
            bundle.add(flow, device, private, bits, _DONE_FRACTION * bits)
            flow.bundle = bundle
            if private:
                users = self._private_users[resources[0]] = self._private_users.get(resources[0], 0) + 1
                bundle.shared_private += users == 2
            self._mark(resources)
        else:       # nothing to cross: the bytes are out at once
            flow.remaining_bits = 0.0
            flow.active = False
            flow.event.succeed(True)
        if until_at is not None:
            self.env.timeout(max(until_at - self.env.now, 0.0)).callbacks.append(partial(self._cut, flow))
        return flow

    def _close(self, flow: _Flow) -> None:
        """Remove an active flow (finished, cut or interrupted): its share goes to the others."""
        bundle = flow.bundle
        i = bundle.index(flow.id)
        rate = float(bundle.rate_bps[i])
        now = self.env.now
        flow.remaining_bits = max(float(bundle.remaining_bits[i]) - rate * (now - bundle.updated_at), 0.0)
        flow.rate, flow.finish_at = rate, float(bundle.finish_at[i])
        flow.active = False
        flow.bundle = None
        bundle.remove(i)
        if len(flow.resources) > len(bundle.route):
            private = flow.resources[0]
            users = self._private_users[private] - 1
            bundle.shared_private -= users == 1
            if users:
                self._private_users[private] = users
            else:
                del self._private_users[private]
        if bundle.n == 0:
            del self._bundles[bundle.key]
            for r in bundle.route:
                on = self._bundles_on[r]
                del on[bundle.key]
                if not on:
                    del self._bundles_on[r]
        self._mark(flow.resources)

    def _mark(self, resources: Iterable[int]) -> None:
        """Recompute the affected flows once, after every change at this instant has been made."""
        self._dirty.update(resources)
        if not self._pending and self._dirty:
            self._pending = True
            self.env.timeout(0).callbacks.append(self._reallocate)

    def _component(self, start: int, seen: set[tuple[int, ...]]) -> list[Bundle]:
        """The bundles connected to resource `start` through shared links (none if it carries no flow or
        its group was re-shared already)."""
        if start >= self._base:
            if start not in self._private_users:
                return []
            device, d = divmod(start - self._base, 2)
            first = self._bundles[self._route(device, d) or (start,)]
        else:
            on = self._bundles_on.get(start)
            if not on:
                return []
            first = next(iter(on.values()))
        if first.key in seen:
            return []
        seen.add(first.key)
        group, todo = [], [first]
        while todo:
            bundle = todo.pop()
            group.append(bundle)
            for r in bundle.route:
                for other in self._bundles_on[r].values():
                    if other.key not in seen:
                        seen.add(other.key)
                        todo.append(other)
        return group

    def _reallocate(self, _event=None) -> None:
        """Re-share every connected group of flows touching a changed resource.

        Any end in a group re-shares the whole group, so only the group's earliest finisher needs a
        timer: one SimPy event per change instead of one per flow (n flows on one access point would
        otherwise leave n^2 outdated timers in the event queue).
        """
        self._pending = False
        dirty, self._dirty = sorted(self._dirty), set()
        seen: set[tuple[int, ...]] = set()
        now = self.env.now
        for start in dirty:
            group = self._component(start, seen)
            if group:
                self._reshare(group, now)

    def _reshare(self, group: list[Bundle], now: float) -> None:
        done = []
        for b in group:
            elapsed = now - b.updated_at
            if elapsed != 0:     # (at the same instant nothing moved, and nothing left can have ended)
                remaining = b.remaining_bits[:b.n]
                remaining -= b.rate_bps[:b.n] * elapsed
                b.updated_at = now
                ended = remaining <= b.done_bits[:b.n]
                if ended.any():
                    done += [b.flows[i] for i in np.flatnonzero(ended)]
        if done:   # simultaneous finishers: end them all, by id; their removal re-shares the rest
            for f in sorted(done, key=lambda f: f.id):
                self._end(f)
            return
        first = None
        for b, rates in zip(group, self._shares(group)):
            self._set_rates(b, rates, now)
            i = int(np.argmin(b.finish_at[:b.n]))
            if first is None or (b.finish_at[i], b.ids[i]) < (first[0].finish_at[first[1]], first[0].ids[first[1]]):
                first = (b, i)
        b, i = first
        finish_at = float(b.finish_at[i])
        version = b.flow_version(i)
        if b.armed[i] != version and finish_at < math.inf:
            b.armed[i] = version
            timer = self.env.timeout(max(finish_at - now, 0.0))
            timer.callbacks.append(partial(self._finish, b.flows[i], version))

    @staticmethod
    def _set_rates(b: Bundle, rates: np.ndarray | float, now: float) -> None:
        """New rates (one for all, or one each); a flow whose rate is unchanged keeps its finish time (and
        timer) exact. A 0-bit/s capacity (a deep fade) stalls a flow until a capacity changes."""
        n = b.n
        rate = b.rate_bps[:n]
        changed = rate != rates
        if isinstance(rates, float) and changed.all():
            rate[:] = rates
            b.epoch += 1
            if rates > 0:
                np.add(now, b.remaining_bits[:n] / rates, out=b.finish_at[:n])
            else:
                b.finish_at[:n] = math.inf
        elif changed.any():
            rates = np.broadcast_to(rates, (n,))
            rate[changed] = rates[changed]
            b.version[:n][changed] += 1
            with np.errstate(divide="ignore", invalid="ignore"):
                finish = np.where(rates > 0, now + b.remaining_bits[:n] / rates, math.inf)
            b.finish_at[:n][changed] = finish[changed]

    def _private_bps(self, b: Bundle) -> np.ndarray:
        return np.where(b.has_private[:b.n], self._access[b.direction, b.device[:b.n]], math.inf)

    def _shares(self, group: list[Bundle]) -> list[np.ndarray | float]:
        """Each bundle's max-min rates, in its order (a float: the same for all its flows)."""
        if len(group) == 1 and group[0].shared_private == 0:
            b = group[0]
            route_bps = [self._capacity(r) for r in b.route]
            share = route_share(route_bps, b.n) if b.route else math.inf
            if b.n_private:
                private_bps = self._private_bps(b)
                if not private_bps.min() >= share:     # some private link binds: else all get the share
                    return [one_route_max_min_rates(private_bps, route_bps, b.route)]
            return [share]
        sizes = np.cumsum([b.n for b in group])[:-1]
        if not any(b.shared_private for b in group):
            rates = routes_max_min_rates(np.concatenate([self._private_bps(b) for b in group]),
                                         np.repeat(np.arange(len(group)), [b.n for b in group]),
                                         [b.route for b in group], self._capacity)
            return np.split(rates, sizes)
        ids = np.concatenate([b.ids[:b.n] for b in group])
        flows = [f for b in group for f in b.flows]
        order = np.argsort(ids, kind="stable")
        rates = np.empty(len(flows), dtype=np.float64)
        rates[order] = max_min_rates([flows[k].resources for k in order.tolist()], self._capacity)
        return np.split(rates, sizes)

    def _state(self, flow: _Flow) -> tuple[float, float, int]:
        """(rate, finish time, version) of an active flow."""
        b = flow.bundle
        i = b.index(flow.id)
        return float(b.rate_bps[i]), float(b.finish_at[i]), b.flow_version(i)

    def _end(self, flow: _Flow) -> None:
        self._close(flow)
        flow.remaining_bits = 0.0
        flow.event.succeed(True)

    def _finish(self, flow: _Flow, version: int, _event=None) -> None:
        if flow.active and version == self._state(flow)[2]:
            self._end(flow)

    def _cut(self, flow: _Flow, _event=None) -> None:
        if not flow.active:
            return
        rate, finish_at, _version = self._state(flow)
        if rate > 0 and finish_at <= self.env.now:
            self._end(flow)   # finishing at this very instant: not cut
            return
        self._close(flow)
        flow.event.succeed(False)
