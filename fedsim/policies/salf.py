"""SALF (Lang, Cohen, Shlezinger, arXiv 2403.18375): every layer aggregated over the devices that reached it.

Backpropagation runs from the last layer to the first, so a device stopped by the deadline still holds the
gradients of its last `depth` layers and sends them. Layer l is updated with the average over its own
contributor set U_l; a layer nobody reached stays unchanged. One local step (FedSGD), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedsim.spec.fields import Fields
from fedsim.policies.base import Aggregation, Policy, RoundInputs, RoundUpdate
from fedsim.policies.layerwise import layerwise_fedsgd

__all__ = ["Salf"]


@dataclass(frozen=True)
class Salf(Policy):
    name: ClassVar[str] = "salf"
    deadline_s: float
    aggregation: Aggregation = Aggregation.MEAN

    @classmethod
    def read(cls, fields: Fields, training) -> "Salf":
        if training.local_steps != 1:
            raise fields.error("name", "salf uses one local step per round (FedSGD), as in the paper; "
                                       f"set training.local_steps = 1, got {training.local_steps}")
        return cls(
            deadline_s=fields.number("deadline_s", low=0.0, low_open=True),
            aggregation=Aggregation(fields.choice("aggregation", [a.value for a in Aggregation], "mean")),
        )

    def aggregate(self, inputs: RoundInputs, grads) -> RoundUpdate:
        return layerwise_fedsgd(inputs, grads, inputs.depths, self.aggregation)

    def describe(self) -> str:
        return f"salf({self.aggregation.value})"
