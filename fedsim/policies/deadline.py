"""The round deadline of salf, drop, partial and heterofl: `policy.deadline_s`, fixed or a schedule.

`policy.deadline_s` is a number (every round), a list (one per round, the last value repeated), a table
`{ schedule = "linear" | "geometric", start = a, end = b }` (from a in round 0 to b in the last round, R =
`run.rounds`), or `{ optimize = "adel", total_s = T, min_s = t }` (ADEL-FL's deadlines under a time budget,
`fedsim.policies.adel`). A schedule is resolved into one deadline per round once, before the first round
(`SyncPolicy.schedule`), and handed to every round as `RoundContext.schedule`; `deadline(round, ctx)` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.errors import ScenarioError
from fedsim.policies.adel import read_adel_schedule
from fedsim.policies.schedules import DeadlineSchedule, ListSchedule, RampSchedule
from fedsim.policies.sync import RoundContext, RunContext, SyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import Scenario

__all__ = ["DeadlineSchedule", "FixedDeadline", "ListSchedule", "RampSchedule", "read_deadline"]


def read_deadline(fields: Fields) -> float | DeadlineSchedule:
    """`policy.deadline_s`: a positive number, a list of them, or a schedule table (see the module docstring)."""
    raw = fields.raw("deadline_s")
    if isinstance(raw, list):
        if not raw:
            raise fields.error("deadline_s", "an empty list; give at least one deadline")
        return ListSchedule(tuple(_positive(fields, f"deadline_s[{i}]", v) for i, v in enumerate(raw)))
    if not isinstance(raw, dict):
        return fields.number("deadline_s", low=0.0, low_open=True)
    table = fields.sub("deadline_s")
    if table.has("optimize"):
        schedule = read_adel_schedule(table)
    elif table.has("schedule"):
        kind = table.choice("schedule", ["linear", "geometric"])
        schedule = RampSchedule(kind, table.number("start", low=0.0, low_open=True),
                                table.number("end", low=0.0, low_open=True))
    else:
        raise fields.error("deadline_s", "a table needs schedule = \"linear\" | \"geometric\" (with start, end) "
                                         "or optimize = \"adel\" (with total_s, min_s)")
    table.finish()
    return schedule


def _positive(fields: Fields, key: str, value) -> float:
    """A list item: a finite number > 0, the error naming `policy.deadline_s[i]`."""
    try:
        return fields.check_number(key, value, low=0.0, low_open=True)
    except ScenarioError as exc:        # check_number quotes the field as a table key: name the item
        raise ScenarioError(exc.source, f"{fields.path}.{key}", exc.message) from None


@dataclass(frozen=True)
class FixedDeadline(SyncPolicy):
    """A synchronous policy whose round r ends `deadline_s` after its start: one number for every round, or a
    schedule resolved before the first round."""

    deadline_s: float | DeadlineSchedule

    @staticmethod
    def read_deadline_s(fields: Fields) -> float | DeadlineSchedule:
        return read_deadline(fields)

    def check(self, scenario: Scenario) -> None:
        if isinstance(self.deadline_s, DeadlineSchedule):
            self.deadline_s.check(scenario)

    def schedule(self, run: RunContext) -> tuple[float, ...] | None:
        if not isinstance(self.deadline_s, DeadlineSchedule):
            return None
        values = self.deadline_s.resolve(run, run.scenario.run.rounds)
        for r, v in enumerate(values):
            if not (v > 0 and math.isfinite(v)):
                raise ScenarioError(run.scenario.source, "policy.deadline_s",
                                    f"round {r}'s deadline is {v!r} s; a deadline is a positive number of seconds")
        return values

    def deadline(self, round_: int, ctx: RoundContext) -> float | None:
        if ctx.schedule is not None:
            return ctx.schedule[min(round_, len(ctx.schedule) - 1)]
        assert not isinstance(self.deadline_s, DeadlineSchedule), "a schedule is resolved before the first round"
        return self.deadline_s

    @property
    def fixed_deadline_s(self) -> float | None:
        """The deadline of every round, or None when it changes over the run."""
        return None if isinstance(self.deadline_s, DeadlineSchedule) else float(self.deadline_s)
