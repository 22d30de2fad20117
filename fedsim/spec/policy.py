"""The `[policy]` table: the policy named there reads its own fields (each policy's module, fedsim.policies).

`policy.name` is a built-in name or a "package.module:Class" import path. Built-in policies are registered
by import path, imported only when named: the spec layer knows where a policy lives, not what it is.

Each policy class declares the fields it reads (`reads`). A key of the table that the named policy does not
read is a notice when another built-in policy reads it ("wait ignores policy.deadline_s": one scenario can
switch policy with `--set policy.name=...`), and an error otherwise, with the closest known field.
"""

from __future__ import annotations

import difflib
import importlib
from typing import ClassVar, Protocol

from fedsim.spec.fields import Fields, printable

# "Scenario" and "TrainingSpec" below are fedsim.spec.scenario's, which imports this module

__all__ = ["POLICY_PATHS", "PolicyConfig", "PolicyReading", "builtin_fields", "policy_class", "read_policy"]

POLICY_PATHS: dict[str, str] = {
    "salf": "fedsim.policies.salf:Salf",
    "drop": "fedsim.policies.drop:Drop",
    "wait": "fedsim.policies.wait:Wait",
    "partial": "fedsim.policies.partial:Partial",
    "heterofl": "fedsim.policies.heterofl:HeteroFL",
    "overselect": "fedsim.policies.overselect:Overselect",
    "fedasync": "fedsim.policies.fedasync:FedAsync",
    "fedbuff": "fedsim.policies.fedbuff:FedBuff",
}
_KINDS = ("sync", "async")


class PolicyConfig(Protocol):
    """What the spec layer knows of a policy (fedsim.policies.base.PolicyBase implements it)."""
    name: ClassVar[str]
    kind: ClassVar[str]
    reads: ClassVar[frozenset[str]]

    def check(self, scenario: "Scenario") -> None: ...
    def describe(self) -> str: ...


class PolicyReading(Protocol):
    """A policy class, as `read_policy` uses it."""
    name: str
    kind: str
    reads: frozenset[str]

    def read(self, fields: Fields, training: "TrainingSpec") -> PolicyConfig: ...


def _import(path: str, fields: Fields) -> object:
    """The object at "package.module:Attr", or a ScenarioError on policy.name naming the value."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise fields.error("name", f"a policy is a built-in name ({', '.join(POLICY_PATHS)}) or "
                                   f"'package.module:Class', got {printable(repr(path))}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise fields.error("name", f"no module named {exc.name!r} (policy {path!r}); is it installed or on "
                                       "PYTHONPATH?") from None
        raise fields.error("name", f"importing {module_name!r} (policy {path!r}) failed: "
                                   f"{type(exc).__name__}: {printable(str(exc))}") from None
    except Exception as exc:       # noqa: BLE001 - a plugin module may raise anything on import
        raise fields.error("name", f"importing {module_name!r} (policy {path!r}) failed: "
                                   f"{type(exc).__name__}: {printable(str(exc))}") from None
    if not hasattr(module, attr):
        raise fields.error("name", f"module {module_name!r} has no attribute {attr!r} (policy {path!r})")
    return getattr(module, attr)


def policy_class(name: str, fields: Fields | None = None) -> PolicyReading:
    """The policy class registered as `name`, or at import path `name` ("package.module:Class")."""
    fields = fields or Fields({"name": name}, "<policy>", "policy")
    if name in POLICY_PATHS:
        return _import(POLICY_PATHS[name], fields)
    if ":" not in name:
        close = difflib.get_close_matches(name, POLICY_PATHS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise fields.error("name", f"unknown policy {printable(repr(name))}; {hint}built-in policies are "
                                   f"{', '.join(POLICY_PATHS)}, or give 'package.module:Class'")
    cls = _import(name, fields)
    if not (isinstance(cls, type) and getattr(cls, "kind", None) in _KINDS and callable(getattr(cls, "read", None))
            and isinstance(getattr(cls, "reads", None), frozenset)):
        raise fields.error("name", f"{name!r} is not a fedsim policy (a subclass of "
                                   "fedsim.policies.SyncPolicy or fedsim.policies.AsyncPolicy), got "
                                   f"{type(cls).__name__ if not isinstance(cls, type) else 'class ' + cls.__name__}")
    return cls


def builtin_fields() -> dict[str, frozenset[str]]:
    """The `[policy]` fields each built-in policy reads."""
    return {name: policy_class(name).reads for name in POLICY_PATHS}


def read_policy(fields: Fields, training: "TrainingSpec") -> tuple[PolicyConfig, tuple[str, ...]]:
    """The policy of the `[policy]` table, and the table's keys it ignores (as field paths)."""
    name = fields.string("name")
    cls = policy_class(name, fields)
    policy = cls.read(fields, training)
    undeclared = sorted(fields.read_keys() - cls.reads - {"name"})
    if undeclared:
        raise fields.error(undeclared[0], f"policy {name!r} read a field it does not declare in its `reads` "
                                          f"({', '.join(sorted(cls.reads)) or 'none'})")
    others = frozenset().union(*builtin_fields().values())
    ignored = []
    for key in sorted(set(fields.table) - cls.reads - {"name"}):
        if key in others:
            ignored.append(fields.field(key))
            continue
        known = sorted(cls.reads | others | {"name"})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {fields.field(close[0])}? " if close else ""
        raise fields.error(key, f"unknown field; {hint}({policy.describe()} reads: "
                                f"{', '.join(sorted(cls.reads)) or 'no field but name'})")
    return policy, tuple(ignored)
