"""`--set key=value` overrides applied to the raw TOML tree before validation.

Keys are dotted paths with list indices (`fleet.classes[1].count`); values are parsed as TOML values
(`0.5`, `true`, `"x"`, `[1, 2]`, `{ dist = "fixed", value = 3 }`) and fall back to a plain string.
"""

from __future__ import annotations

import copy
import re
import tomllib
from typing import Any

from fedsim.errors import ScenarioError

__all__ = ["apply_overrides", "parse_value"]

_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _steps(key: str, source: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in key.split("."):
        match = _PART.match(part)
        if not match:
            raise ScenarioError(source, key, f"--set: malformed key part {part!r} (use a.b[0].c=value)")
        steps.append(match.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return steps


def apply_overrides(raw: dict, overrides, source: str) -> dict:
    tree = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScenarioError(source, item, "--set needs key=value")
        steps = _steps(key, source)
        node: Any = tree
        for i, step in enumerate(steps[:-1]):
            where = ".".join(str(s) for s in steps[: i + 1])
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    raise ScenarioError(source, key, f"--set: no list item [{step}] at {where}")
                node = node[step]
            else:
                if not isinstance(node, dict):
                    raise ScenarioError(source, key, f"--set: {where} is not a table")
                node = node.setdefault(step, {})
        last = steps[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ScenarioError(source, key, f"--set: no list item [{last}]")
            node[last] = parse_value(value.strip())
        else:
            if not isinstance(node, dict):
                raise ScenarioError(source, key, "--set: the parent is not a table")
            node[last] = parse_value(value.strip())
    return tree
