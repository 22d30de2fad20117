"""What every policy is: a frozen value read from the scenario's `[policy]` table, and its learned state.

Two protocols build on `PolicyBase`: `fedsim.policies.sync.SyncPolicy` (rounds with a deadline, run by
`fedsim.sim.server.Server`) and `fedsim.policies.asynchronous.AsyncPolicy` (no rounds, run by
`fedsim.sim.async_engine`). A policy declares the `[policy]` fields it reads (`reads`): a field that no policy
reads is an error, one that only other policies read is a notice ("wait ignores policy.deadline_s").

A policy is a frozen value: what it learns during a run (SALF's depth histogram, HeteroFL's automatic
widths) is a `PolicyState`, handed to its hooks and returned by `observe`, and checkpointed with the run as JSON.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar, Self

from fedsim.spec.fields import Fields
from fedsim.spec.scenario import Scenario, TrainingSpec

__all__ = ["Aggregation", "JSONValue", "PolicyBase", "PolicyState"]

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]


class Aggregation(enum.Enum):
    MEAN = "mean"            # divide layer l by |U_l|
    UNBIASED = "unbiased"    # mean, scaled by 1 / (1 - P_l^U)
    ALL = "all"              # divide by the number of participants U (missing layers count as zero)


class PolicyState(ABC):
    """What a policy has learned so far in a run: a frozen value, saved in checkpoints as JSON."""

    @abstractmethod
    def to_json(self) -> JSONValue:
        """The state as JSON values; the policy's `restore` reads it back exactly."""


class PolicyBase(ABC):
    """What the synchronous and asynchronous protocols share: name, fields, reading, checks."""

    name: ClassVar[str]
    kind: ClassVar[str]                   # "sync" or "async": which engine runs the policy
    reads: ClassVar[frozenset[str]]       # the [policy] fields `read` may read (besides `name`)
    # why the SALF authors' straggler model (`fleet.depth_model`, fedsim.world.stragglers) means nothing to this
    # policy, or None when its rounds take stragglers that stop at a drawn depth (salf, drop)
    depth_model_refusal: ClassVar[str | None] = ("it is defined for salf and drop, whose rounds take stragglers "
                                                 "that stop at a drawn depth")

    @classmethod
    @abstractmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> Self:
        """Build the policy from its `[policy]` table; every field validated with its path."""

    def check(self, scenario: Scenario) -> None:
        """Cross-section checks once the whole scenario is read (raise ScenarioError)."""

    def describe(self) -> str:
        """The policy as the trace names it (rounds.parquet `policy`)."""
        return self.name

    def restore(self, data: JSONValue) -> PolicyState | None:
        """The state `PolicyState.to_json` wrote (a checkpoint); stateless policies have None."""
        return None
