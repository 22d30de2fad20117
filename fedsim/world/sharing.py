"""Max-min fair rates of flows over shared resources: progressive filling, in general and on one route.

`max_min_rates` is the general algorithm (any paths). `one_route_max_min_rates` gives the same rates, bit for
bit, for the common case of many flows crossing the same route, each through at most a private resource of its
own (one access point, its backhaul, the devices' radios), with numpy instead of a loop per flow;
`routes_max_min_rates` for flows on several routes (access points sharing a backhaul), in one numpy pass per
route resource.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["max_min_rates", "one_route_max_min_rates", "route_share", "routes_max_min_rates"]


def max_min_rates(paths: Sequence[Sequence[int]], capacity: Callable[[int], float]) -> list[float]:
    """Max-min fair rates of flows over shared resources (progressive filling).

    Repeatedly the resource with the smallest fair share (remaining capacity / unfrozen flows) fixes
    the rate of its unfrozen flows; their share is taken off every other resource they cross. A heap
    keyed by share makes it O((flows * path length) log resources). A flow crossing no resource is
    unconstrained (rate inf). Ties between equal shares go to the smaller resource number.
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


def route_share(route_bps: Sequence[float], n_flows: int) -> float:
    """`max_min_rates` of `n_flows` flows that cross the same resources and nothing else: all get the
    narrowest share capacity / n_flows (the same number whichever resource gives it)."""
    return min([c / n_flows for c in route_bps])


def one_route_max_min_rates(private_bps: np.ndarray, route_bps: Sequence[float],
                            route_ids: Sequence[int]) -> np.ndarray:
    """`max_min_rates` of n flows that all cross the resources `route_ids` (capacities `route_bps`), flow i
    also a private resource of capacity `private_bps[i]` used by no other flow (inf: none), where every
    private resource number is above every route resource number. The same rates, bit for bit.

    Progressive filling here is: take the private capacities in increasing order; the smallest still
    unfrozen one freezes its flow at that capacity (taken off every route resource, in turn) while it is
    below the smallest route share left / unfrozen (a tie goes to the route resource, whose number is
    smaller); then the route resource with the smallest share (ties: the smaller number) freezes every flow
    left at that share. Each route resource's remainder is the same sequence of subtractions the general
    algorithm makes (`np.subtract.accumulate` is sequential), and a private capacity below the share never
    empties a route resource (c < left / m <= left), so the general algorithm's clamp at 0 never acts.
    """
    private_bps = np.asarray(private_bps, dtype=np.float64)
    n = private_bps.shape[0]
    order = np.argsort(private_bps, kind="stable")
    caps = private_bps[order]
    if not route_ids:       # a private resource alone: each flow at its own capacity
        return private_bps.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        # left[j, k]: route resource j's capacity after the k smallest private capacities are frozen
        left = np.subtract.accumulate(
            np.concatenate([np.asarray(route_bps, dtype=np.float64)[:, None],
                            np.broadcast_to(caps[:-1], (len(route_ids), n - 1))], axis=1), axis=1)
        share = left / np.arange(n, 0, -1, dtype=np.float64)
    smallest = share.min(axis=0)
    below = caps < smallest
    k = n if below.all() else int(np.argmin(below))     # flows frozen by their own capacity first
    rates = np.empty(n, dtype=np.float64)
    rates[order[:k]] = caps[:k]
    if k < n:
        at_k = share[:, k]
        best = min(range(len(route_ids)), key=lambda j: (at_k[j], route_ids[j]))
        rates[order[k:]] = at_k[best]
    return rates


def routes_max_min_rates(private_bps: np.ndarray, route_of: np.ndarray, routes: Sequence[Sequence[int]],
                         capacity: Callable[[int], float]) -> np.ndarray:
    """`max_min_rates` of n flows, flow i crossing the resources `routes[route_of[i]]` and a private resource
    of capacity `private_bps[i]` used by no other flow (inf: none), where private resource numbers are above
    every route resource number. The same rates, bit for bit, in as many numpy passes as there are route
    resources (the general algorithm takes a Python step per flow).

    The general algorithm's steps come in two kinds. While the smallest private capacity left is below every
    route resource's share (left / unfrozen flows; a tie goes to the route resource, whose number is
    smaller), it freezes its flow at that capacity, taken off each of its route resources: never emptying
    one (c < left / m <= left). These steps, in increasing capacity, are one pass: each resource's remainder
    after k of them is a sequential `np.subtract.accumulate` (a flow that does not cross it subtracts 0.0,
    which changes nothing). Then the route resource with the smallest share (ties: the smaller number)
    freezes all its unfrozen flows at that share, taken m times off each other resource they cross, with the
    general algorithm's clamp at 0 (once below 0, a remainder stays 0).
    """
    private_bps = np.asarray(private_bps, dtype=np.float64)
    n = private_bps.shape[0]
    shared = sorted({r for route in routes for r in route})
    where = {r: j for j, r in enumerate(shared)}
    crosses = np.zeros((len(shared), len(routes)), dtype=bool)
    for k, route in enumerate(routes):
        crosses[[where[r] for r in route], k] = True
    member = crosses[:, np.asarray(route_of, dtype=np.int64)]          # (resources, flows)
    left = np.array([capacity(r) for r in shared], dtype=np.float64)
    count = member.sum(axis=1)
    rates = np.full(n, math.inf)
    frozen = np.zeros(n, dtype=bool)
    by_capacity = np.argsort(private_bps, kind="stable")
    while True:
        todo = by_capacity[~frozen[by_capacity]]
        if todo.size == 0:
            return rates
        caps, on = private_bps[todo], member[:, todo]
        with np.errstate(invalid="ignore", divide="ignore"):
            taken = np.where(on, caps, 0.0)
            lefts = np.subtract.accumulate(np.concatenate([left[:, None], taken[:, :-1]], axis=1), axis=1)
            counts = count[:, None] - np.concatenate([np.zeros((len(shared), 1), dtype=np.int64),
                                                      np.cumsum(on, axis=1)[:, :-1]], axis=1)
            shares = np.where(counts > 0, lefts / counts, math.inf)
        below = caps < shares.min(axis=0)
        k = todo.size if below.all() else int(np.argmin(below))
        rates[todo[:k]] = caps[:k]
        frozen[todo[:k]] = True
        if k == todo.size:
            return rates
        left = lefts[:, k].copy()
        count = counts[:, k].copy()
        busy = np.flatnonzero(count > 0)   # some unfrozen flow crosses them (in resource-number order)
        shares_now = left[busy] / count[busy]
        j = int(busy[np.argmin(shares_now)])   # the first of equal shares: the smaller resource number
        share = float(left[j] / count[j])
        newly = member[j] & ~frozen
        rates[newly] = share
        frozen |= newly
        for i, m in enumerate((member[:, newly]).sum(axis=1).tolist()):
            if m:
                with np.errstate(invalid="ignore"):     # inf - inf: nan, as the general algorithm's max() keeps
                    steps = np.subtract.accumulate(np.concatenate(([left[i]], np.full(m, share))))
                left[i] = 0.0 if (steps < 0).any() else steps[-1]
                count[i] -= m
