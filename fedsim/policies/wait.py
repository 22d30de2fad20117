"""Wait for everyone (plain FedSGD): no deadline; a round lasts until its slowest participant delivers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedsim.spec.fields import Fields
from fedsim.policies.base import Policy, RoundInputs, RoundUpdate
import numpy as np

from fedsim.policies.layerwise import full_model_update

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
        return full_model_update(inputs, grads, np.flatnonzero(inputs.depths == inputs.n_layers))
