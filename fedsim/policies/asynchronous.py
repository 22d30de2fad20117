"""The asynchronous policy protocol: no rounds, no deadline; run by `fedsim.sim.async_engine`.

An asynchronous policy decides how long the run lasts and when it is evaluated (`duration_s`,
`eval_every_s`), how many devices train at once (`concurrency`), how many arrived updates make one server
step (`buffer_size`), how far behind an update may be and still count (`max_staleness`), and how much a
stale update weighs (`staleness_weight`). The engine owns everything else: which idle devices start
(uniformly, online ones), the jobs' timing, the gradients and the server optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypedDict

from fedsim.errors import ScenarioError
from fedsim.policies.base import PolicyBase
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import Scenario, TrainingSpec

__all__ = ["AsyncPolicy", "COMMON_FIELDS", "MAX_EVALUATIONS", "MAX_STALENESS", "is_asynchronous"]

# Every evaluation is a pass over the whole test set: a typo such as eval_every_s = 1e-6 would stall a run.
MAX_EVALUATIONS = 100_000
# One parameter snapshot per version kept: bound it so a typo cannot exhaust memory on a large model.
MAX_STALENESS = 10_000

COMMON_FIELDS = frozenset({"duration_s", "eval_every_s", "staleness_exponent", "max_concurrency", "max_staleness"})


def is_asynchronous(policy: PolicyBase) -> bool:
    """True for policies run by `fedsim.sim.async_engine` instead of synchronous rounds."""
    return policy.kind == "async"


class _Common(TypedDict):
    duration_s: float
    eval_every_s: float
    staleness_exponent: float
    max_concurrency: int | None
    max_staleness: int


@dataclass(frozen=True)
class AsyncPolicy(PolicyBase):
    """Base class of the asynchronous policies: its fields are its decisions (see the module docstring)."""

    kind: ClassVar[str] = "async"
    depth_model_refusal: ClassVar[str | None] = "an asynchronous run has no rounds to draw stragglers in"
    duration_s: float                  # simulated time budget of the run
    eval_every_s: float                # evaluate the global model at every multiple of this
    staleness_exponent: float = 0.5    # a in s(tau) = (1 + tau)^-a; 0 weighs every update equally
    max_concurrency: int | None = None  # devices training at once; None: fleet.participants, else all
    max_staleness: int = 32            # old versions kept; an update staler than this is discarded
    buffer_size: int = 1               # updates per server step (K)

    def staleness_weight(self, staleness: int) -> float:
        """s(tau) = (1 + tau)^-a, the polynomial weight of FedAsync (also used by FedBuff)."""
        return (1.0 + staleness) ** (-self.staleness_exponent)

    def concurrency(self, n_devices: int, participants: int | None) -> int:
        """Devices training at once: max_concurrency, else fleet.participants, else every device."""
        return min(self.max_concurrency or participants or n_devices, n_devices)

    def check(self, scenario: Scenario) -> None:
        n = scenario.fleet.n_devices
        if self.max_concurrency is not None and self.max_concurrency > n:
            raise ScenarioError(scenario.source, "policy.max_concurrency",
                                f"must be at most the number of devices ({n}), got {self.max_concurrency}")

    @classmethod
    def read_common(cls, fields: Fields, training: TrainingSpec) -> _Common:
        """The fields every asynchronous policy reads (`COMMON_FIELDS`), validated with their paths."""
        if training.local_steps != 1:
            raise ScenarioError(fields.source, "training.local_steps",
                                f"{cls.name} sends one local step (a gradient) per update; "
                                f"set training.local_steps = 1, got {training.local_steps}")
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
