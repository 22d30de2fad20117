"""The policy interface: what a straggler policy decides, and nothing else.

A policy is a frozen config read from the scenario's `[policy]` table. The engine asks it for the round's
deadline and how much work each participant attempts; at the end of the round it hands the policy what
each device delivered plus a gradient engine, and the policy returns the update for the global model.
A new policy is one module with one class; register it in `fedsim/policies/__init__.py`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fedsim.spec.fields import Fields

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine
    from fedsim.spec.scenario import TrainingSpec

__all__ = ["Aggregation", "Policy", "RoundContext", "RoundInputs", "RoundUpdate"]


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
    batches: list[np.ndarray]    # training-sample indices of each participant's first mini-batch
    step_batches: list[list[np.ndarray]] = field(default_factory=list)   # every local step's mini-batch
    samples: np.ndarray | None = None     # samples per step each participant processed
    steps: np.ndarray | None = None       # local steps each participant ran
    done_order: np.ndarray | None = None  # participants (positions) in the order they finished
    trainer: Any = None                   # fedsim.learn.local.LocalTrainer, for policies with local training
    quorum: int | None = None             # the round's quorum, if the policy set one
    submodel: Any = None                  # width -> (nn.Module, ModelProfile), see RoundContext


@dataclass(frozen=True)
class RoundUpdate:
    grads: dict[str, torch.Tensor | None]   # applied by the server optimizer; None leaves a tensor unchanged
    contributors: np.ndarray                # devices aggregated into each layer (forward order)
    train_loss: float | None                # mean mini-batch loss over the contributing devices
    frozen: dict[str, torch.Tensor] | None = None   # entries no device held (HeteroFL): left unchanged


@dataclass(frozen=True)
class RoundContext:
    """What a policy may use to plan the work of a round's participants."""
    profile: Any                 # fedsim.learn.profile.ModelProfile of the global model
    fleet: Any                   # fedsim.world.fleet.Fleet
    devices: np.ndarray          # participant ids
    slowdown: np.ndarray
    samples: np.ndarray          # samples per step each participant would process (its batch)
    steps: np.ndarray            # local steps each participant would run
    deadline_s: float | None
    upload_mode: Any             # fedsim.spec.scenario.UploadMode
    submodel: Any = None         # width -> (nn.Module, ModelProfile) of the narrower model (HeteroFL)
    batch_size: int = 0

    def plan(self, rows: np.ndarray | None = None, profile=None, samples=None, steps=None):
        """`fedsim.world.timing.plan_round` for participants `rows` (all by default)."""
        from fedsim.world.timing import plan_round

        rows = np.arange(len(self.devices)) if rows is None else rows
        d = self.devices[rows]
        f = self.fleet
        return plan_round(profile or self.profile, d, f.speed_flops[d], self.slowdown[rows],
                          self.samples[rows] if samples is None else samples,
                          self.steps[rows] if steps is None else steps,
                          f.downlink_bps[d], f.uplink_bps[d], f.latency_s[d])


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

    # -- optional hooks, with the behaviour of a plain synchronous round ---------------------------
    def select(self, candidates: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
        """Participants among the online `candidates`: all, or `k` sampled uniformly."""
        if k is None or k >= len(candidates):
            return candidates
        return np.sort(rng.choice(candidates, size=k, replace=False))

    def plan(self, ctx: RoundContext):
        """The work each participant attempts (a `RoundPlan`); the default is the whole mini-batch."""
        return ctx.plan()

    def quorum(self, n_selected: int, k: int | None) -> int | None:
        """End the round once this many participants are done (None: wait for all or the deadline)."""
        return None

    def check(self, scenario) -> None:
        """Cross-section checks once the whole scenario is read (raise ScenarioError)."""
