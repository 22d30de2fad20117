"""Drop stragglers: only devices that delivered every layer by the deadline count; the rest are discarded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedsim.spec.fields import Fields
from fedsim.policies.base import Aggregation, Policy, RoundInputs, RoundUpdate
from fedsim.policies.layerwise import full_model_update

__all__ = ["Drop"]


@dataclass(frozen=True)
class Drop(Policy):
    name: ClassVar[str] = "drop"
    deadline_s: float
    aggregation: Aggregation = Aggregation.MEAN

    @classmethod
    def read(cls, fields: Fields, training) -> "Drop":
        return cls(
            deadline_s=fields.number("deadline_s", low=0.0, low_open=True),
            aggregation=Aggregation(fields.choice("aggregation", ["mean", "all"], "mean")),
        )

    def aggregate(self, inputs: RoundInputs, grads) -> RoundUpdate:
        return full_model_update(inputs, grads, np.flatnonzero(inputs.depths == inputs.n_layers), self.aggregation)
