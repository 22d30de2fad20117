"""A run's scenario as one tree: its TOML text with its `--set` overrides applied, as fedsim applies them
(fedsim/spec/overrides.py; this package does not import fedsim), and that tree flattened to dotted keys."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

__all__ = ["resolve", "flatten", "steps"]

_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def steps(key: str) -> list[str | int] | None:
    """`fleet.classes[1].count` -> ["fleet", "classes", 1, "count"]; None if malformed."""
    out: list[str | int] = []
    for part in key.split("."):
        m = _PART.fullmatch(part.strip())
        if m is None:
            return None
        out.append(m.group(1))
        out += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return out


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve(text: str, overrides: list[str]) -> dict:
    """A scenario's TOML with its `--set` overrides applied, as fedsim applies them (for runs written before
    trace.json recorded the resolved scenario)."""
    tree: Any = tomllib.loads(text)
    for item in overrides:
        key, _, value = item.partition("=")
        path = steps(key)
        if not path:
            continue
        node = tree
        for step in path[:-1]:
            if isinstance(step, int):
                node = node[step] if isinstance(node, list) and step < len(node) else None
            else:
                node = node.setdefault(step, {}) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            last = path[-1]
            if isinstance(last, int) and isinstance(node, list) and last < len(node):
                node[last] = _value(value.strip())
            elif isinstance(last, str) and isinstance(node, dict):
                node[last] = _value(value.strip())
    return json.loads(json.dumps(tree, default=str))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"policy.deadline_s": 0.1, "fleet.classes[0].count": 30, ...}"""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, list) and tree and all(isinstance(v, (dict, list)) for v in tree):
        for i, v in enumerate(tree):
            out |= flatten(v, f"{prefix}[{i}]")
    else:
        out[prefix] = tree
    return out
