"""A fixed deadline: the same `policy.deadline_s` every round (salf, drop, partial, heterofl)."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.policies.sync import RoundContext, SyncPolicy
from fedsim.spec.fields import Fields

__all__ = ["FixedDeadline"]


@dataclass(frozen=True)
class FixedDeadline(SyncPolicy):
    """A synchronous policy whose every round ends at `deadline_s` after its start."""

    deadline_s: float

    @staticmethod
    def read_deadline_s(fields: Fields) -> float:
        return fields.number("deadline_s", low=0.0, low_open=True)

    def deadline(self, round_: int, ctx: RoundContext) -> float | None:
        return self.deadline_s
