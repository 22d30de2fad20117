"""SALF (Lang, Cohen, Shlezinger, arXiv 2403.18375): every layer aggregated over the devices that reached it.

Backpropagation runs from the last layer to the first, so a device stopped by the deadline still holds the
gradients of its last `depth` layers and sends them. Layer l is updated with the average over its own
contributor set U_l; a layer nobody reached stays unchanged. One local step (FedSGD), as in the paper.
With `aggregation = "unbiased"` each layer is also scaled by 1 / (1 - P_l^U), where P_l, the probability
that a device misses layer l, is estimated online from every device-round so far (the policy's state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.base import Aggregation, JSONValue, PolicyState
from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.layerwise import layerwise_fedsgd
from fedsim.policies.sync import RoundInputs, RoundUpdate, RunContext
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["DepthHistogram", "Salf"]


@dataclass(frozen=True)
class DepthHistogram(PolicyState):
    """How many device-rounds so far delivered exactly the last d layers, d = 0..L."""
    counts: tuple[int, ...]

    def to_json(self) -> JSONValue:
        return list(self.counts)

    def after(self, depths: np.ndarray) -> np.ndarray:
        """The histogram with one more round's depths counted."""
        return np.asarray(self.counts, dtype=np.int64) + np.bincount(depths, minlength=len(self.counts))


@dataclass(frozen=True)
class Salf(FixedDeadline):
    name: ClassVar[str] = "salf"
    reads: ClassVar[frozenset[str]] = frozenset({"deadline_s", "aggregation"})
    aggregation: Aggregation = Aggregation.MEAN

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Salf":
        if training.local_steps != 1:
            raise fields.error("name", "salf uses one local step per round (FedSGD), as in the paper; "
                                       f"set training.local_steps = 1, got {training.local_steps}")
        return cls(
            deadline_s=cls.read_deadline_s(fields),
            aggregation=Aggregation(fields.choice("aggregation", [a.value for a in Aggregation], "mean")),
        )

    def start(self, run: RunContext) -> DepthHistogram:
        return DepthHistogram((0,) * (run.profile.n_layers + 1))

    def restore(self, data: JSONValue) -> DepthHistogram:
        return DepthHistogram(tuple(int(c) for c in data))

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        state = inputs.state
        assert isinstance(state, DepthHistogram)
        return layerwise_fedsgd(inputs, grads, inputs.depths, self.aggregation, state.after(inputs.depths))

    def observe(self, state: PolicyState | None, inputs: RoundInputs) -> DepthHistogram:
        assert isinstance(state, DepthHistogram)
        return DepthHistogram(tuple(int(c) for c in state.after(inputs.depths)))

    def describe(self) -> str:
        return f"salf({self.aggregation.value})"
