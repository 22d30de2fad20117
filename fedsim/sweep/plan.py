"""A sweep's plan: the grid of `--grid` overrides x seeds, one `SweepRun` per point and seed.

Where a run lives is a pure function of its grid point and seed, `run_key`: the Hive partition path
`KEY=VALUE/.../seed=S` (grid keys in command-line order), so `runs/` of a sweep reads as one partitioned
dataset. Values are parsed as TOML (`0.10` and `0.1` are the same value) and written in a canonical text:
strings as they are, numbers as Python writes them, anything else as inline TOML.

Grid points that differ only in fields their scenario ignores (`policy.deadline_s` for `wait`; see
`Scenario.all_ignored`) are one run: its key has Hive's null value, `KEY=__HIVE_DEFAULT_PARTITION__`, for
each ignored grid key, its scenario leaves those keys out, and `SweepRun.points` lists every grid point it
stands for.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedsim.errors import FedsimError, ScenarioError
from fedsim.spec.overrides import parse_value
from fedsim.spec.scenario import load_scenario

__all__ = ["SweepRun", "parse_grid", "plan_sweep", "run_key", "value_text", "Point"]

Point = tuple[tuple[str, str], ...]          # a grid point: (key, value text) in command-line order
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"     # a grid key the run's scenario ignores (read as null)
_MAX_SEGMENT = 120                           # bytes of a partition directory name before it is cut and hashed
_BARE = re.compile(r"[A-Za-z0-9_-]+")          # a TOML bare key


@dataclass(frozen=True)
class SweepRun:
    run_id: str                             # the run key: its directory under runs/ (see run_key)
    params: Point                           # grid key -> value text, in command-line order
    seed: int
    overrides: tuple[str, ...]              # --set, then the grid point (less ignored keys), then run.seed
    ignored: tuple[str, ...] = ()           # grid keys the run's scenario ignores (null in its key)
    points: tuple[Point, ...] = ()          # every grid point this run stands for (params first)

    @property
    def values(self) -> dict[str, Any]:
        """The grid values, typed (TOML)."""
        return {k: parse_value(v) for k, v in self.params}

    def params_json(self, scenario: Path) -> dict:
        return {"run_id": self.run_id, "params": self.values, "seed": self.seed,
                "scenario": str(scenario), "overrides": list(self.overrides), "ignored": list(self.ignored),
                "points": [{k: parse_value(v) for k, v in p} for p in self.points]}


def _inline(value: Any) -> str:
    """A value as inline TOML (the text of a non-string grid value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k if _BARE.fullmatch(k) else _inline(k)} = {_inline(v)}"
                                for k, v in value.items()) + " }"
    return str(value)                        # TOML dates and times print as TOML writes them


def value_text(value: Any) -> str:
    """The canonical text of a typed grid value: a string as it is, anything else as inline TOML."""
    return value if isinstance(value, str) else _inline(value)


def _segment(key: str, value: Any) -> str:
    """One `key=value` directory name; characters other than letters, digits and `._-` (and `[]` in keys)
    are percent-encoded, as Hive does; a name over 120 bytes is cut and given a hash of the whole."""
    name = f"{quote(key, safe='._-[]')}={quote(value_text(value), safe='._-')}"
    if len(name) > _MAX_SEGMENT:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        cut = _MAX_SEGMENT - 9
        cut -= next((i for i in (1, 2) if name[cut - i] == "%"), 0)      # never half of a %XX escape
        name = f"{name[:cut]}-{digest}"
    return name


def run_key(point: Point, seed: int, ignored: tuple[str, ...] = ()) -> str:
    """Where the run of `point` and `seed` lives under runs/: `k1=v1/k2=v2/seed=S` (a Hive partition path),
    with `k=__HIVE_DEFAULT_PARTITION__` for each key in `ignored`. Equal values give equal keys (`0.10` and
    `0.1`), so two grid points can map to the same run."""
    return "/".join([f"{quote(k, safe='._-[]')}={NULL_PARTITION}" if k in ignored else _segment(k, parse_value(v))
                     for k, v in point] + [f"seed={seed}"])


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes (values are TOML values)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`["policy.name=salf,drop", ...]` -> `[("policy.name", ["salf", "drop"]), ...]`."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values_text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FedsimError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        if key == "run.seed":
            raise FedsimError("--grid run.seed: use --seeds N (and --set run.seed=BASE) for seeds")
        if key in (k for k, _ in grid):
            raise FedsimError(f"--grid {key}: given twice; list all its values in one --grid")
        values = _split_values(values_text)
        if any(v == "" for v in values):
            raise FedsimError(f"--grid {key}: empty value in {values_text!r}")
        seen: dict[str, str] = {}
        for v in values:
            canonical = _segment(key, parse_value(v))
            if canonical in seen:
                same = "repeated value" if seen[canonical] == v else f"{seen[canonical]} and {v} are the same value"
                raise FedsimError(f"--grid {key}: {same} in {values_text!r}")
            seen[canonical] = v
        grid.append((key, values))
    return grid


def _grid_points(grid: list[tuple[str, list[str]]]) -> list[Point]:
    points: list[Point] = [()]
    for key, values in grid:
        points = [p + ((key, v),) for p in points for v in values]
    return points


def _blame(scenario: Path, sets: list[str], point, exc: ScenarioError) -> FedsimError:
    """Name the grid key whose value is bad: the first one that fails on its own (with an error the scenario
    and its --set values do not give alone), else the whole point; an error of the --set values is theirs."""
    try:
        load_scenario(scenario, sets)
        base = None
    except ScenarioError as alone:
        base = str(alone)
        if base == str(exc):
            return exc
    for key, value in point:
        try:
            load_scenario(scenario, [*sets, f"{key}={value}"])
        except ScenarioError as single:
            if str(single) != base:
                return FedsimError(f"--grid {key}={value}: {single}")
    shown = ",".join(f"{k}={v}" for k, v in point)
    return FedsimError(f"--grid point {shown}: {exc}")


def plan_sweep(scenario: Path, grid: list[tuple[str, list[str]]], seeds: int,
               sets: list[str]) -> list[SweepRun]:
    """Every run of the sweep, each scenario validated; raises FedsimError before anything is written."""
    if seeds < 1:
        raise FedsimError(f"--seeds must be at least 1, got {seeds}")
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for key, _ in grid:
        if key in set_keys:
            raise FedsimError(f"--grid {key}: also given with --set; keep one")
    runs: dict[str, SweepRun] = {}
    base_seed = None
    for point in _grid_points(grid):
        grid_overrides = [f"{k}={v}" for k, v in point]
        if base_seed is None:     # the base scenario need not be valid alone: a grid key may complete it
            try:
                base_seed = load_scenario(scenario, [*sets, *grid_overrides]).run.seed
            except ScenarioError as exc:
                raise _blame(scenario, sets, point, exc) from None
        for i in range(seeds):
            seed = base_seed + i
            overrides = (*sets, *grid_overrides, f"run.seed={seed}")
            try:
                scn = load_scenario(scenario, list(overrides))
            except ScenarioError as exc:
                raise _blame(scenario, sets, point, exc) from None
            ignored = tuple(k for k, _ in point if k in scn.all_ignored)
            key = run_key(point, seed, ignored)
            if key in runs:                  # differs from a planned run only in fields its scenario ignores
                if _shown(runs[key].params, ignored) != _shown(point, ignored):
                    raise FedsimError(f"two grid points map to the same run directory runs/{key}; give "
                                      "distinct values")
                runs[key] = replace(runs[key], points=runs[key].points + (point,))
                continue
            kept = (*sets, *(f"{k}={v}" for k, v in point if k not in ignored), f"run.seed={seed}")
            runs[key] = SweepRun(key, point, seed, kept, ignored, (point,))
    return list(runs.values())


def _shown(point: Point, ignored: tuple[str, ...]) -> tuple:
    """The values of `point` that make its run, as compared: parsed, ignored keys left out."""
    return tuple((k, value_text(parse_value(v))) for k, v in point if k not in ignored)
