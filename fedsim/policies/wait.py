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
    depth_model_refusal: ClassVar[str | None] = (
        "it has no deadline and waits for every participant to deliver every layer, so none is a straggler; "
        "run it without fleet.depth_model (the authors' no-straggler baseline)")

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Wait":
        return cls()

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        return full_model_update(inputs, grads, np.flatnonzero(inputs.depths == inputs.n_layers))
