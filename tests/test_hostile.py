"""Hostile scenario input: random TOML documents and random mutations of every shipped scenario either load
or raise ScenarioError with a field path; nothing else escapes."""

from __future__ import annotations

import os
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from fedsim.errors import ScenarioError
from fedsim.spec.scenario import parse_scenario

FUZZ_SCALE = int(os.environ.get("FEDSIM_FUZZ_SCALE", "1"))    # e.g. 25 for a long local fuzzing session
SHIPPED = sorted((REPO / "scenarios").rglob("*.toml"))

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=12), st.sampled_from(["mlp", "cnn", "salf", "iid", "x:y", "all", "ideal"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"


def _load(text: str, overrides=(), base_dir=None):
    try:
        parse_scenario(text, "fuzz.toml", list(overrides), base_dir=base_dir)
    except ScenarioError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        # a field-level problem names its path (malformed TOML has no field)
        assert exc.field or "malformed TOML" in exc.message or "--set" in str(exc), str(exc)


@settings(max_examples=150 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["run", "model", "data", "training", "fleet", "policy", "network", "junk"]),
                       st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=4), max_size=7))
def test_random_documents(doc):
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in table.items() if "\\" not in k and '"' not in k]
    _load("\n".join(lines))


def _paths(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, list) and tree and isinstance(tree[0], dict):
        for i, v in enumerate(tree):
            yield from _paths(v, f"{prefix}[{i}]")
    else:
        yield prefix


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
@settings(max_examples=60 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_of_shipped_scenarios(path, data):
    text = path.read_text()
    fields = [p for p in _paths(tomllib.loads(text)) if p.isascii()]
    key = data.draw(st.sampled_from(fields))
    value = data.draw(values)
    # data.dir may point anywhere; keep it so that mnist scenarios reach their other checks
    _load(text, [f"{key}={_toml_value(value)}"], base_dir=path.parent)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_garbage_text(text):
    _load(text)


def test_absurd_sizes_are_refused_before_allocating():
    text = (REPO / "scenarios" / "quickstart.toml").read_text()
    with pytest.raises(ScenarioError, match="data.samples_per_device"):
        parse_scenario(text, "q.toml", ["data.samples_per_device=5000000", "fleet.classes[0].count=1000000"])
