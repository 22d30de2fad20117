"""Max-min fair rates of flows over shared resources: progressive filling, in general and on one route.

`max_min_rates` is the general algorithm (any paths). `one_route_max_min_rates` gives the same rates, bit for
bit, for the common case of many flows crossing the same route, each through at most a private resource of its
own (one access point, its backhaul, the devices' radios), with numpy instead of a loop per flow.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["max_min_rates", "one_route_max_min_rates", "route_share"]


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
    return min(c / n_flows for c in route_bps)


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
