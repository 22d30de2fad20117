"""A bundle: the active flows that cross one route, kept as columns in flow-id order.

Flows of one route in one direction always share every resource of that route, so they are always in the
same connected group and are re-shared together; keeping their state in numpy columns lets one re-share of
n flows cost a few array operations instead of n Python iterations. A flow with no route (a device attached
at the server) and a private link makes a bundle of its private link alone.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Bundle"]


class Bundle:
    """Columns of the active flows of one route (`route`: resource numbers, one direction), by flow id.

    Per flow: `ids`, `flows` (the flow objects), `device`, `has_private` (1 if it also crosses its device's
    private link), `remaining_bits`, `done_bits` (at or below this it has ended: a rounding of simultaneous ends),
    `rate_bps`, `finish_at`, `version` and `armed`. Columns have spare room at the end; the live part is
    `[:n]`.

    Every re-share updates every flow of the bundle, so all flows with a rate were last updated at the
    bundle's `updated_at` (a flow added since has rate 0, so its elapsed time does not matter). A flow's
    version is `version + epoch`: it changes whenever its rate does (`epoch` moves when every rate changes at
    once), so an outdated completion timer is recognised; `armed` is the version a pending timer was set for.
    """

    __slots__ = ("key", "route", "direction", "n", "flows", "shared_private", "n_private", "updated_at", "epoch",
                 "_floats", "_ints", "ids", "device", "has_private", "remaining_bits", "done_bits", "rate_bps",
                 "finish_at", "version", "armed")

    # Columns are rows of two 2-D arrays (one float64, one int64), so that appending, growing or removing a
    # flow is a couple of array operations whatever the number of columns.
    _FLOATS = ("remaining_bits", "done_bits", "rate_bps", "finish_at")
    _INTS = ("ids", "device", "has_private", "version", "armed")

    def __init__(self, key: tuple[int, ...], route: tuple[int, ...], direction: int, now: float):
        self.key, self.route, self.direction = key, route, direction
        self.n = 0
        self.flows: list = []
        self.shared_private = 0     # private links crossed by two or more of this bundle's flows
        self.n_private = 0          # flows that cross a private link
        self.updated_at = now
        self.epoch = 0
        self._columns(np.empty((len(self._FLOATS), 4)), np.empty((len(self._INTS), 4), dtype=np.int64))

    def _columns(self, floats: np.ndarray, ints: np.ndarray) -> None:
        self._floats, self._ints = floats, ints
        for k, name in enumerate(self._FLOATS):
            setattr(self, name, floats[k])
        for k, name in enumerate(self._INTS):
            setattr(self, name, ints[k])

    def add(self, flow, device: int, has_private: bool, bits: float, done_bits: float) -> None:
        """Append a flow (its id is above every id already here), at rate 0."""
        i = self.n
        if i == self._floats.shape[1]:
            floats, ints = np.empty((len(self._FLOATS), 2 * i)), np.empty((len(self._INTS), 2 * i), dtype=np.int64)
            floats[:, :i], ints[:, :i] = self._floats, self._ints
            self._columns(floats, ints)
        self._floats[:, i] = (bits, done_bits, 0.0, math.inf)
        self._ints[:, i] = (flow.id, device, has_private, 0, -1)
        self.flows.append(flow)
        self.n_private += has_private
        self.n = i + 1

    def flow_version(self, i: int) -> int:
        return int(self.version[i]) + self.epoch

    def index(self, flow_id: int) -> int:
        """Position of an active flow of this bundle."""
        return int(np.searchsorted(self.ids[:self.n], flow_id))

    def remove(self, i: int) -> None:
        """Drop the flow at position i; the later ones move up one place (id order is kept)."""
        n = self.n
        self.n_private -= bool(self.has_private[i])
        self._floats[:, i:n - 1] = self._floats[:, i + 1:n]
        self._ints[:, i:n - 1] = self._ints[:, i + 1:n]
        del self.flows[i]
        self.n = n - 1
