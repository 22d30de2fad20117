"""Scalar random distributions used by fleet fields (speeds, slowdowns, bandwidths, on/off durations).

In TOML a distribution is either a plain number (fixed) or a table with a `dist` key:
`{ dist = "uniform", low = 1, high = 3 }`, `{ dist = "lognormal", median = 2e8, sigma = 0.5 }`,
`{ dist = "exponential", mean = 60 }`, `{ dist = "fixed", value = 5 }`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from fedsim.spec.fields import Fields

__all__ = ["Dist", "DistKind", "read_dist"]


class DistKind(enum.Enum):
    FIXED = "fixed"
    UNIFORM = "uniform"
    LOGNORMAL = "lognormal"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class Dist:
    kind: DistKind
    a: float          # fixed: value; uniform: low; lognormal: median; exponential: mean
    b: float = 0.0    # uniform: high; lognormal: sigma of the log

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind is DistKind.FIXED:
            return np.full(n, self.a)
        if self.kind is DistKind.UNIFORM:
            return rng.uniform(self.a, self.b, n)
        if self.kind is DistKind.LOGNORMAL:
            return self.a * np.exp(self.b * rng.standard_normal(n))
        return rng.exponential(self.a, n)

    def cdf(self, x: float) -> float:
        """P(X <= x); used to compute straggler probabilities exactly where the model allows."""
        if self.kind is DistKind.FIXED:
            return 1.0 if x >= self.a else 0.0
        if self.kind is DistKind.UNIFORM:
            if self.b == self.a:
                return 1.0 if x >= self.a else 0.0
            return float(min(1.0, max(0.0, (x - self.a) / (self.b - self.a))))
        if x <= 0:
            return 0.0
        if self.kind is DistKind.LOGNORMAL:
            if self.b == 0:
                return 1.0 if x >= self.a else 0.0
            return 0.5 * (1.0 + math.erf(math.log(x / self.a) / (self.b * math.sqrt(2.0))))
        return 1.0 - math.exp(-x / self.a)

    @property
    def minimum(self) -> float:
        return {DistKind.FIXED: self.a, DistKind.UNIFORM: self.a}.get(self.kind, 0.0)

    @property
    def mean(self) -> float:
        if self.kind is DistKind.UNIFORM:
            return 0.5 * (self.a + self.b)
        if self.kind is DistKind.LOGNORMAL:
            return self.a * math.exp(0.5 * self.b**2)
        return self.a


def read_dist(fields: Fields, key: str, default=None, *, positive: bool = True) -> Dist:
    """Read `key` of `fields` as a distribution; every parameter validated with a field path."""
    raw = fields.raw(key, default)
    if raw is None:
        raise fields.error(key, "missing required field")
    if isinstance(raw, Dist):
        return raw
    low = 0.0
    if not isinstance(raw, dict):
        value = fields.check_number(key, raw, low=low, low_open=positive)
        return Dist(DistKind.FIXED, value)
    sub = Fields(raw, fields.source, fields.field(key))
    kind = DistKind(sub.choice("dist", [k.value for k in DistKind]))
    if kind is DistKind.FIXED:
        dist = Dist(kind, sub.number("value", low=low, low_open=positive))
    elif kind is DistKind.UNIFORM:
        lo = sub.number("low", low=low, low_open=positive)
        hi = sub.number("high", low=lo)
        dist = Dist(kind, lo, hi)
    elif kind is DistKind.LOGNORMAL:
        dist = Dist(kind, sub.number("median", low=0.0, low_open=True), sub.number("sigma", low=0.0, high=10.0))
    else:
        dist = Dist(kind, sub.number("mean", low=0.0, low_open=True))
    sub.finish()
    return dist
