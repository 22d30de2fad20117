"""Wait for everyone (plain FedSGD): no deadline; a round lasts until its slowest participant delivers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.layerwise import full_model_update
from fedsim.policies.sync import RoundInputs, RoundUpdate, SyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["Wait"]


@dataclass(frozen=True)
class Wait(SyncPolicy):
    name: ClassVar[str] = "wait"
    reads: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Wait":
        return cls()

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        return full_model_update(inputs, grads, np.flatnonzero(inputs.depths == inputs.n_layers))
