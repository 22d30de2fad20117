"""The `[policy]` table: the policy named there reads its own fields (each policy's module, fedsim.policies).

Policies are registered by import path ("package.module:Name"), imported only when named: the spec layer
knows where a policy lives, not what it is.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedsim.spec.fields import Fields

__all__ = ["POLICY_PATHS", "policy_class", "read_policy"]

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


def policy_class(name: str) -> Any:
    """The policy class registered as `name`."""
    module, _, attr = POLICY_PATHS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def read_policy(fields: Fields, training) -> Any:
    name = fields.choice("name", sorted(POLICY_PATHS))
    policy = policy_class(name).read(fields, training)
    fields.finish()
    return policy
