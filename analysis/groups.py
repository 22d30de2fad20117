"""Grouping runs honestly: a group is the runs of one scenario that differ only by their seed.

The group of a run is the identity hash `group` of its marker (fedsim-run.json: the scenario after its
overrides, without `run.seed`). Groups are never pooled with one another; a group's label is made of the
settings that differ between the groups studied together (policy first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs import AnalysisError, Run, load_runs
from .scenario import flatten

__all__ = ["Group", "Study", "group_runs", "load_study"]

@dataclass(eq=False)
class Group:
    number: int                 # 1, 2, ... in order of first appearance
    runs: list[Run]             # one per seed, by seed
    settings: dict[str, Any] = field(default_factory=dict)   # what sets it apart from the other groups
    label: str = ""

    @property
    def gid(self) -> str:
        return self.runs[0].group_id

    @property
    def slug(self) -> str:
        return f"g{self.number}"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "(unset)"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _label_keys(differ: list[str], flat: list[dict]) -> list[str]:
    """Few keys that tell the groups apart: the policy first if it differs, then, greedily, the key that
    separates the most groups still sharing a label, until every group has its own (or no key helps)."""
    def key_of(f: dict, keys: list[str]) -> str:
        return json.dumps([f.get(k) for k in keys], sort_keys=True, default=str)

    chosen = [k for k in differ if k == "policy.name"]
    rest = [k for k in differ if k != "policy.name"]
    while rest and len({key_of(f, chosen) for f in flat}) < len(flat):
        best = max(rest, key=lambda k: len({key_of(f, chosen + [k]) for f in flat}))
        if len({key_of(f, chosen + [best]) for f in flat}) == len({key_of(f, chosen) for f in flat}):
            break
        chosen.append(best)
        rest.remove(best)
    return chosen


def _labels(groups: list[Group]) -> None:
    """Each group's settings that differ between groups (run.seed aside), and a label made of the few of them
    that tell the groups apart (a setting a group does not have is left out of its label)."""
    flat = [flatten(g.runs[0].tree) for g in groups]
    for f in flat:
        f.pop("run.seed", None)
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    differ.sort(key=lambda k: k != "policy.name")          # the policy first
    shown = _label_keys(differ, flat)
    tails = [k.rsplit(".", 1)[-1] for k in shown]
    for g, f in zip(groups, flat):
        g.settings = {k: f.get(k) for k in differ}
        parts = []
        for k, tail in zip(shown, tails):
            if f.get(k) is None:
                continue
            parts.append(_short(f[k]) if k == "policy.name" else
                         f"{tail if tails.count(tail) == 1 else k}={_short(f[k])}")
        g.label = ", ".join(parts) if parts else g.runs[0].policy
    labels = [g.label for g in groups]
    for g in groups:
        if labels.count(g.label) > 1:
            g.label += f" [{g.slug}]"


def group_runs(runs: list[Run]) -> list[Group]:
    buckets: dict[str, list[Run]] = {}
    for run in runs:
        buckets.setdefault(run.group_id, []).append(run)
    groups = [Group(i + 1, sorted(members, key=lambda r: r.seed)) for i, members in enumerate(buckets.values())]
    _labels(groups)
    return groups


@dataclass
class Study:
    directory: Path
    runs: list[Run]
    groups: list[Group]

    @property
    def sweeps(self) -> list[Path]:
        return list(dict.fromkeys(r.sweep for r in self.runs if r.sweep is not None))

    def find(self, run_id: str) -> Run:
        for run in self.runs:
            if run_id in (run.run_id, str(run.path), str(run.path.relative_to(self.directory))
                          if run.path.is_relative_to(self.directory) else None):
                return run
        known = ", ".join(r.run_id for r in self.runs[:10]) + (", ..." if len(self.runs) > 10 else "")
        raise AnalysisError(f"--run {run_id}: no completed run with that id under {self.directory}; known: {known}")

    def group_of(self, run: Run) -> Group:
        return next(g for g in self.groups if run in g.runs)


def load_study(directory: Path) -> Study:
    runs = load_runs(directory)
    return Study(Path(directory), runs, group_runs(runs))
