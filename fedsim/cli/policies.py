"""`fedsim policies`: each built-in policy, what it does (its module's first line) and the fields it reads,
with their defaults (the policy's own) and meanings (fedsim.spec.reference)."""

from __future__ import annotations

import dataclasses
import enum
import sys
import textwrap

from fedsim.spec.policy import POLICY_PATHS, policy_class
from fedsim.spec.reference import lookup

__all__ = ["describe_policies"]

WIDTH = 100


def _default(cls: type, field: str) -> str:
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.name != field:
            continue
        if f.default is dataclasses.MISSING:
            return "required"
        value = f.default.value if isinstance(f.default, enum.Enum) else f.default
        return "automatic" if value is None else repr(value)
    entry = lookup(f"policy.{field}")
    return entry.kind.replace("`", "") if entry is not None else ""


def describe_policies() -> str:
    lines = []
    for name in POLICY_PATHS:
        cls = policy_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        lines.append(f"{name} ({cls.kind}): {doc[0] if doc else ''}")
        for field in sorted(cls.reads):
            entry = lookup(f"policy.{field}")
            meaning = entry.meaning.replace("`", "") if entry is not None else ""
            head = f"  {field:<19} {_default(cls, field):<10} "
            lines += textwrap.wrap(meaning, WIDTH, initial_indent=head, subsequent_indent=" " * len(head)) or [head]
        if not cls.reads:
            lines.append("  (no fields)")
        lines.append("")
    lines.append("A field another policy reads is named in a notice and ignored; policy.name also takes "
                 "\"package.module:Class\" (README: Your own policy).")
    return "\n".join(lines)
