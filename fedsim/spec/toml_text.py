"""A scenario's TOML text read into tables, bounded: its size, and how deep tables and lists nest."""

from __future__ import annotations

import tomllib
from typing import Any

from fedsim.errors import ScenarioError
from fedsim.spec.fields import printable, show_key

__all__ = ["MAX_DEPTH", "MAX_SCENARIO_BYTES", "parse_toml", "too_deep"]

MAX_SCENARIO_BYTES = 4 * 2**20   # tomllib reads about 0.6 MiB/s of the worst text; a scenario is a few kB
MAX_DEPTH = 32             # tables and lists nested in one another (a scenario needs about 5)


def too_deep(raw: Any) -> str | None:
    """The path of a table or list nested deeper than MAX_DEPTH levels, else None (no recursion)."""
    stack = [(raw, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return where
        if isinstance(node, dict):
            items = ((f"{where}.{show_key(str(k))}" if where else show_key(str(k)), v) for k, v in node.items())
        elif isinstance(node, list):
            items = ((f"{where}[{i}]", v) for i, v in enumerate(node))
        else:
            continue
        # past a few levels the path says nothing more: keep the prefix
        stack.extend((v, depth + 1, w if depth < 4 else where) for w, v in items if isinstance(v, (dict, list)))
    return None


def parse_toml(text: str, source: str) -> dict:
    if len(text) > MAX_SCENARIO_BYTES:
        raise ScenarioError(source, "", f"larger than {MAX_SCENARIO_BYTES // 2**20} MiB; a scenario is a small "
                                        "TOML file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"malformed TOML: {exc}") from None
    except ValueError as exc:     # an integer of more than 4300 digits
        raise ScenarioError(source, "", f"malformed TOML: a number too long to read "
                                        f"({printable(str(exc).split(';')[0])})") from None
    except RecursionError:
        raise ScenarioError(source, "", f"tables or lists nested deeper than {MAX_DEPTH} levels") from None
    where = too_deep(raw)
    if where is not None:
        raise ScenarioError(source, where, f"tables or lists nested deeper than {MAX_DEPTH} levels")
    return raw
