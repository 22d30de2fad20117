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

`AsyncPolicy` is the base of both asynchronous policies; `fedsim.sim.async_engine` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim.errors import ScenarioError
from fedsim.spec.fields import Fields
from fedsim.policies.base import Policy, RoundInputs, RoundUpdate

__all__ = ["AsyncPolicy", "FedAsync", "is_asynchronous", "MAX_EVALUATIONS", "MAX_STALENESS"]

# Every evaluation is a pass over the whole test set: a typo such as eval_every_s = 1e-6 would stall a run.
MAX_EVALUATIONS = 100_000
# One parameter snapshot per version kept: bound it so a typo cannot exhaust memory on a large model.
MAX_STALENESS = 10_000


def is_asynchronous(policy: Any) -> bool:
    """True for policies run by `fedsim.sim.async_engine` instead of synchronous rounds."""
    return isinstance(policy, AsyncPolicy)


@dataclass(frozen=True)
class AsyncPolicy(Policy):
    """What an asynchronous policy decides: run length, evaluation instants, concurrency, staleness rule."""

    name: ClassVar[str]
    duration_s: float                  # simulated time budget of the run
    eval_every_s: float                # evaluate the global model at every multiple of this
    staleness_exponent: float = 0.5    # a in s(tau) = (1 + tau)^-a; 0 weighs every update equally
    max_concurrency: int | None = None  # devices training at once; None: fleet.participants, else all
    max_staleness: int = 32            # old versions kept; an update staler than this is discarded
    buffer_size: int = 1               # updates per server step (K)
    deadline_s: None = None            # asynchronous FL has no deadline

    def staleness_weight(self, staleness: int) -> float:
        """s(tau) = (1 + tau)^-a, the polynomial weight of FedAsync (also used by FedBuff)."""
        return (1.0 + staleness) ** (-self.staleness_exponent)

    def aggregate(self, inputs: RoundInputs, grads) -> RoundUpdate:
        raise TypeError(f"{self.name} is asynchronous: it has no rounds to aggregate; "
                        "fedsim.run dispatches it to fedsim.sim.async_engine.serve_async")

    def check(self, scenario) -> None:
        n = scenario.fleet.n_devices
        if self.max_concurrency is not None and self.max_concurrency > n:
            raise ScenarioError(scenario.source, "policy.max_concurrency",
                                f"must be at most the number of devices ({n}), got {self.max_concurrency}")

    @classmethod
    def read_common(cls, fields: Fields, training) -> dict[str, Any]:
        """The fields both asynchronous policies share, validated with their paths."""
        if training.local_steps != 1:
            raise ScenarioError(fields.source, "training.local_steps",
                                f"{cls.name} sends one local step (a gradient) per update; "
                                f"set training.local_steps = 1, got {training.local_steps}")
        # the synchronous policies' fields are accepted and ignored, so a scenario switches policy by --set
        fields.raw("deadline_s", None)
        fields.raw("aggregation", None)
        duration_s = fields.number("duration_s", low=0.0, low_open=True)
        eval_every_s = fields.number("eval_every_s", duration_s, low=0.0, low_open=True)
        if duration_s / eval_every_s > MAX_EVALUATIONS:
            raise fields.error("eval_every_s", f"would evaluate {duration_s / eval_every_s:.3g} times in "
                                               f"duration_s = {duration_s:g}; at most {MAX_EVALUATIONS} "
                                               f"evaluations per run, got {eval_every_s:g}")
        concurrency = fields.raw("max_concurrency", "all")
        return {
            "duration_s": duration_s,
            "eval_every_s": eval_every_s,
            "staleness_exponent": fields.number("staleness_exponent", 0.5, low=0.0, high=64.0),
            "max_concurrency": None if concurrency == "all" else fields.integer("max_concurrency", low=1),
            "max_staleness": fields.integer("max_staleness", 32, low=0, high=MAX_STALENESS),
        }


@dataclass(frozen=True)
class FedAsync(AsyncPolicy):
    name: ClassVar[str] = "fedasync"

    @classmethod
    def read(cls, fields: Fields, training) -> "FedAsync":
        common = cls.read_common(fields, training)
        # a buffer_size left over from a fedbuff scenario is accepted only if it means what fedasync does
        if fields.integer("buffer_size", 1, low=1) != 1:
            raise fields.error("buffer_size", "fedasync applies every update on arrival (a buffer of 1); "
                                              f"use policy.name = \"fedbuff\" for a buffer, got "
                                              f"{fields.table['buffer_size']}")
        return cls(**common)

    def describe(self) -> str:
        return f"fedasync(a={self.staleness_exponent:g})"
