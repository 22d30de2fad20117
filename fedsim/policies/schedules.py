"""Deadline schedules: `policy.deadline_s` values that change over the run, resolved to one per round.

`fedsim.policies.deadline` reads them; `fedsim.policies.adel` adds ADEL-FL's optimised schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from fedsim.errors import ScenarioError
from fedsim.policies.sync import RunContext
from fedsim.spec.scenario import Scenario

__all__ = ["DeadlineSchedule", "ListSchedule", "RampSchedule", "ramp"]


class DeadlineSchedule(ABC):
    """Deadlines that change over the run: `resolve` gives one per round (R = `run.rounds`)."""

    @abstractmethod
    def resolve(self, run: RunContext, rounds: int) -> tuple[float, ...]:
        """The deadline of each of the `rounds` rounds, in seconds."""

    def check(self, scenario: Scenario) -> None:
        """Checks that need the whole scenario (raise ScenarioError naming policy.deadline_s)."""

    def lowest(self, rounds: int) -> float | None:
        """The smallest deadline of the run, when known without the fleet (None: only after `resolve`)."""
        return None


@dataclass(frozen=True)
class ListSchedule(DeadlineSchedule):
    """One deadline per round; rounds past the end of the list take its last value."""
    values: tuple[float, ...]

    def resolve(self, run: RunContext, rounds: int) -> tuple[float, ...]:
        return tuple(self.values[min(r, len(self.values) - 1)] for r in range(rounds))

    def check(self, scenario: Scenario) -> None:
        rounds = scenario.run.rounds
        if len(self.values) > rounds:
            raise ScenarioError(scenario.source, "policy.deadline_s",
                                f"a schedule of {len(self.values)} deadlines for run.rounds = {rounds}; give at "
                                f"most one per round (the last value is repeated), got {_show(self.values)}")

    def lowest(self, rounds: int) -> float | None:
        return min(self.values[:rounds])

    def __str__(self) -> str:
        return _show(self.values)


@dataclass(frozen=True)
class RampSchedule(DeadlineSchedule):
    """From `start` in round 0 to `end` in the last round: linearly, or geometrically (a constant ratio)."""
    kind: str          # "linear" or "geometric"
    start: float
    end: float

    def resolve(self, run: RunContext, rounds: int) -> tuple[float, ...]:
        return ramp(self.kind, self.start, self.end, rounds)

    def lowest(self, rounds: int) -> float | None:
        return min(self.start, self.end)

    def __str__(self) -> str:
        return f"{self.kind} {self.start:g} -> {self.end:g}"


def ramp(kind: str, start: float, end: float, rounds: int) -> tuple[float, ...]:
    """Round r of R: linear `start + (end - start) r / (R - 1)`, geometric `start (end / start)^(r / (R - 1))`."""
    if rounds == 1:
        return (start,)
    out = []
    for r in range(rounds):
        x = r / (rounds - 1)
        out.append(start + (end - start) * x if kind == "linear" else start * (end / start) ** x)
    out[-1] = end               # exactly, whatever the rounding of the last step
    return tuple(out)


def _show(values: tuple[float, ...]) -> str:
    if len(values) > 6:
        return "[" + ", ".join(f"{v:g}" for v in values[:3]) + f", ... ({len(values)} values)]"
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
