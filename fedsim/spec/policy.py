"""The `[policy]` table: the policy named there reads its own fields (each policy's module, fedsim.policies).

`policy.name` is a built-in name, a name an installed package registers in the `fedsim.policies` entry-point
group, or a "package.module:Class" import path (`fedsim.spec.plugins`). Built-in policies are registered by
import path, imported only when named: the spec layer knows where a policy lives, not what it is.

Each policy class declares the fields it reads (`reads`). A key of the table that the named policy does not
read is a notice when another built-in policy reads it ("wait ignores policy.deadline_s": one scenario can
switch policy with `--set policy.name=...`), and an error otherwise, with the closest known field.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from fedsim.spec.fields import Fields
from fedsim.spec.plugins import call_plugin, load_plugin

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
    "flower": "fedsim.policies.flower:Flower",
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


def _is_policy(obj: object) -> bool:
    return (isinstance(obj, type) and getattr(obj, "kind", None) in _KINDS and callable(getattr(obj, "read", None))
            and isinstance(getattr(obj, "reads", None), frozenset))


def policy_class(name: str, fields: Fields | None = None) -> PolicyReading:
    """The policy class `name` names: built in, registered in the `fedsim.policies` entry-point group, or at
    import path "package.module:Class"."""
    fields = fields or Fields({"name": name}, "<policy>", "policy")
    return load_plugin(name, group="fedsim.policies", builtins=POLICY_PATHS, source=fields.source,
                       field=fields.field("name"), kind="policy", form="package.module:Class", check=_is_policy,
                       expected="a fedsim policy (a subclass of fedsim.policies.SyncPolicy or AsyncPolicy)")


def builtin_fields() -> dict[str, frozenset[str]]:
    """The `[policy]` fields each built-in policy reads."""
    return {name: policy_class(name).reads for name in POLICY_PATHS}


def read_policy(fields: Fields, training: "TrainingSpec") -> tuple[PolicyConfig, tuple[str, ...]]:
    """The policy of the `[policy]` table, and the table's keys it ignores (as field paths)."""
    name = fields.string("name")
    cls = policy_class(name, fields)
    policy = call_plugin(cls.read, fields, training, source=fields.source, field=fields.field("name"),
                         label=f"policy {name!r}: read")
    undeclared = sorted(fields.read_keys() - cls.reads - {"name"})
    if undeclared:
        raise fields.error(undeclared[0], f"policy {name!r} read a field it does not declare in its `reads` "
                                          f"({', '.join(sorted(cls.reads)) or 'none'})")
    ignored = fields.ignored_or_unknown(cls.reads | {"name"}, lambda: frozenset().union(*builtin_fields().values()),
                                        policy.describe())
    return policy, ignored
