"""Over-selection (FedScale style): select ceil(f * K) devices, keep the first K to finish, end the round.

No deadline: the round ends when the K-th participant finishes; the others are stopped where they are
and their work is discarded. K is `policy.k`, else `fleet.participants`, else every online device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.layerwise import full_model_update
from fedsim.policies.sync import RoundInputs, RoundUpdate, SyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec
from fedsim.world.candidates import Candidates

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["Overselect"]


@dataclass(frozen=True)
class Overselect(SyncPolicy):
    name: ClassVar[str] = "overselect"
    reads: ClassVar[frozenset[str]] = frozenset({"fraction", "k"})
    depth_model_refusal: ClassVar[str | None] = (
        "it keeps the first participants to finish, and a straggler that stops at its drawn depth finishes early")
    fraction: float = 1.3
    k: int | None = None

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Overselect":
        k = None if fields.raw("k", None) is None else fields.integer("k", low=1)
        return cls(fraction=fields.number("fraction", 1.3, low=1.0, high=100.0), k=k)

    def _k(self, k: int | None, available: int) -> int:
        return min(self.k or k or available, available)

    def select(self, candidates: Candidates, k: int | None, rng: np.random.Generator) -> np.ndarray:
        n = min(math.ceil(self.fraction * self._k(k, len(candidates)) - 1e-9), len(candidates))
        if n >= len(candidates):
            return candidates.ids()
        return np.sort(candidates.take(rng.choice(len(candidates), size=n, replace=False)))

    def quorum(self, n_selected: int, k: int | None) -> int | None:
        return min(self._k(k, n_selected), n_selected)

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        quorum = inputs.quorum if inputs.quorum is not None else len(inputs.devices)
        finished = [i for i in inputs.done_order if inputs.depths[i] == inputs.n_layers]
        return full_model_update(inputs, grads, np.sort(np.array(finished[:quorum], dtype=np.int64)))

    def describe(self) -> str:
        return f"overselect({self.fraction:g})"
