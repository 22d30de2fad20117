"""A sweep's plan: the grid of `--grid` overrides x seeds, one `SweepRun` (and run id) per point."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import FedsimError, ScenarioError
from fedsim.spec.scenario import load_scenario

__all__ = ["SweepRun", "parse_grid", "plan_sweep"]

_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_ID = 120

@dataclass(frozen=True)
class SweepRun:
    run_id: str
    params: tuple[tuple[str, str], ...]     # grid key -> value text, in command-line order
    seed: int
    overrides: tuple[str, ...]              # --set, then the grid point, then run.seed

    def params_json(self, scenario: Path) -> dict:
        return {"run_id": self.run_id, "params": dict(self.params), "seed": self.seed,
                "scenario": str(scenario), "overrides": list(self.overrides)}


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
        if len(set(values)) != len(values):
            raise FedsimError(f"--grid {key}: repeated value in {values_text!r}")
        grid.append((key, values))
    return grid


def _run_id(params: tuple[tuple[str, str], ...], seed: int) -> str:
    raw = ",".join([f"{k}={v}" for k, v in params] + [f"seed={seed}"])
    safe = _SAFE.sub("_", raw)
    if safe != raw or len(safe) > _MAX_ID:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:_MAX_ID]}-{digest}"
    return safe


def _grid_points(grid: list[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    points: list[tuple[tuple[str, str], ...]] = [()]
    for key, values in grid:
        points = [p + ((key, v),) for p in points for v in values]
    return points


def _blame(scenario: Path, sets: list[str], point, exc: ScenarioError) -> FedsimError:
    """Name the grid key whose value is bad: the first one that fails on its own, else the whole point."""
    for key, value in point:
        try:
            load_scenario(scenario, [*sets, f"{key}={value}"])
        except ScenarioError as single:
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
    base_seed = load_scenario(scenario, sets).run.seed       # errors here name the --set key
    runs: list[SweepRun] = []
    for point in _grid_points(grid):
        grid_overrides = [f"{k}={v}" for k, v in point]
        for i in range(seeds):
            seed = base_seed + i
            overrides = (*sets, *grid_overrides, f"run.seed={seed}")
            try:
                load_scenario(scenario, list(overrides))
            except ScenarioError as exc:
                raise _blame(scenario, sets, point, exc) from None
            runs.append(SweepRun(_run_id(point, seed), point, seed, overrides))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise FedsimError("two grid points map to the same run id; give distinct values")
    return runs


# -- resuming ------------------------------------------------------------------------------------

