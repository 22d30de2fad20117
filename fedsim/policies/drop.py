"""Drop stragglers: only devices that delivered every layer by the deadline count; the rest are discarded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.base import Aggregation
from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.layerwise import full_model_update
from fedsim.policies.sync import RoundInputs, RoundUpdate
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["Drop"]


@dataclass(frozen=True)
class Drop(FixedDeadline):
    name: ClassVar[str] = "drop"
    reads: ClassVar[frozenset[str]] = frozenset({"deadline_s", "aggregation"})
    depth_model_refusal: ClassVar[str | None] = None     # a straggler counts only if it drew every layer
    aggregation: Aggregation = Aggregation.MEAN

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Drop":
        return cls(
            deadline_s=cls.read_deadline_s(fields),
            aggregation=Aggregation(fields.choice("aggregation", ["mean", "all"], "mean")),
        )

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        return full_model_update(inputs, grads, np.flatnonzero(inputs.depths == inputs.n_layers), self.aggregation)
