"""The policy interface: what a straggler policy decides, and nothing else.

A policy is a frozen config read from the scenario's `[policy]` table. The engine asks it for the round's
deadline and how much work each participant attempts; at the end of the round it hands the policy what
each device delivered plus a gradient engine, and the policy returns the update for the global model.
A new policy is one module with one class; register it in `fedsim/strategies/__init__.py`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from fedsim.fields import Fields

if TYPE_CHECKING:
    from fedsim.grads import GradientEngine
    from fedsim.scenario import TrainingSpec

__all__ = ["Aggregation", "Policy", "RoundInputs", "RoundUpdate"]


class Aggregation(enum.Enum):
    MEAN = "mean"            # divide layer l by |U_l|
    UNBIASED = "unbiased"    # mean, scaled by 1 / (1 - P_l^U)
    ALL = "all"              # divide by the number of participants U (missing layers count as zero)


@dataclass(frozen=True)
class RoundInputs:
    """What the server knows when the round ends."""
    round: int
    n_layers: int
    devices: np.ndarray          # participant ids
    depths: np.ndarray           # layers delivered by each participant (the last `depth` layers)
    depth_counts: np.ndarray     # histogram of depths over every device-round so far, this one included
    batches: list[np.ndarray]    # training-sample indices of each participant's mini-batch


@dataclass(frozen=True)
class RoundUpdate:
    grads: dict[str, torch.Tensor | None]   # applied by the server optimizer; None leaves a tensor unchanged
    contributors: np.ndarray                # devices aggregated into each layer (forward order)
    train_loss: float | None                # mean mini-batch loss over the contributing devices


class Policy(ABC):
    """Base class of every synchronous straggler policy."""

    name: ClassVar[str]
    deadline_s: float | None

    @classmethod
    @abstractmethod
    def read(cls, fields: Fields, training: "TrainingSpec") -> "Policy":
        """Build the policy from its `[policy]` table; every field validated with its path."""

    @abstractmethod
    def aggregate(self, inputs: RoundInputs, grads: "GradientEngine") -> RoundUpdate:
        """The global update from what each participant delivered."""

    def describe(self) -> str:
        return self.name
