"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous FL with a buffer of K updates per server step.

Updates arrive as in FedAsync; the server keeps them in a buffer and, when the K-th arrives, takes one
step of the server optimizer (SGD with `training.lr` and `training.momentum`) on their staleness-weighted
mean, as in the paper's Algorithm 1 (the sum is divided by K, not by the sum of the weights):

    w <- w - lr * (1/K) * sum_i s(tau_i) g_i,      s(tau) = (1 + tau) ** (-a)

Every update in one buffer saw the same server version (the version only changes at a server step), so
tau_i = V - v_i. With K = 1 and a = 0 the server applies each device's gradient, at the version it
downloaded, in arrival order: plain sequential (asynchronous) SGD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedsim.policies.asynchronous import COMMON_FIELDS, AsyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec

__all__ = ["FedBuff", "MAX_BUFFER"]

MAX_BUFFER = 1_000_000


@dataclass(frozen=True)
class FedBuff(AsyncPolicy):
    name: ClassVar[str] = "fedbuff"
    reads: ClassVar[frozenset[str]] = COMMON_FIELDS | {"buffer_size"}
    buffer_size: int = 10       # the paper's usual K

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "FedBuff":
        common = cls.read_common(fields, training)
        return cls(buffer_size=fields.integer("buffer_size", 10, low=1, high=MAX_BUFFER), **common)

    def describe(self) -> str:
        return f"fedbuff(K={self.buffer_size},a={self.staleness_exponent:g})"
