"""FedAsync (Xie, Koyejo, Gupta 2019): the server applies every update as it arrives, weighted by staleness.

There are no rounds and no deadline. An idle device downloads the current global model (version v),
computes one full local step (the gradient of its mini-batch mean loss over every layer, at version v) and
uploads it. When the update arrives the server is at version V >= v; its staleness is V - v and it is
applied at once, as one step of the server optimizer (SGD with `training.lr` and `training.momentum`):

    w <- w - lr * s(V - v) * g_v,      s(tau) = (1 + tau) ** (-a),   a = policy.staleness_exponent

Xie et al. write the server step as mixing, `w <- (1 - alpha_t) w + alpha_t x_new` with
`alpha_t = alpha * s(V - v)`. With one local step `x_new = w_v - gamma g_v`, which gives
`w <- w - alpha_t gamma g_v - alpha_t (w - w_v)`: the same step as above (lr = alpha gamma) plus a pull
towards the stale model w_v. For a fresh update (V = v) the two are identical; for stale ones this
simulator uses the gradient form (the form FedBuff and most later systems use, and the one that lets
momentum and `fedbuff` share one server optimizer). FedAsync is FedBuff with a buffer of one update.

The protocol is `fedsim.policies.asynchronous.AsyncPolicy`; `fedsim.sim.async_engine` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedsim.policies.asynchronous import COMMON_FIELDS, AsyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec

__all__ = ["FedAsync"]


@dataclass(frozen=True)
class FedAsync(AsyncPolicy):
    """FedBuff with a buffer of one update: every update is applied on arrival."""

    name: ClassVar[str] = "fedasync"
    reads: ClassVar[frozenset[str]] = COMMON_FIELDS

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "FedAsync":
        return cls(**cls.read_common(fields, training))

    def describe(self) -> str:
        return f"fedasync(a={self.staleness_exponent:g})"
