"""Wait for everyone (plain FedSGD): no deadline; a round lasts until its slowest participant delivers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedsim.fields import Fields
from fedsim.strategies.base import Aggregation, Policy, RoundInputs, RoundUpdate
from fedsim.strategies.layerwise import layerwise_fedsgd

__all__ = ["Wait"]


@dataclass(frozen=True)
class Wait(Policy):
    name: ClassVar[str] = "wait"
    deadline_s: None = None

    @classmethod
    def read(cls, fields: Fields, training) -> "Wait":
        # deadline_s and aggregation are accepted and ignored so one scenario can switch policy by --set
        fields.raw("deadline_s", None)
        fields.raw("aggregation", None)
        return cls()

    def aggregate(self, inputs: RoundInputs, grads) -> RoundUpdate:
        return layerwise_fedsgd(inputs, grads, inputs.depths, Aggregation.MEAN)
