"""Straggler policies, one module each, registered by their scenario name in fedsim.spec.policy."""

from __future__ import annotations

from fedsim.spec.policy import POLICY_PATHS, policy_class, read_policy
from fedsim.policies.base import Aggregation, Policy, RoundContext, RoundInputs, RoundUpdate
from fedsim.policies.drop import Drop
from fedsim.policies.fedasync import FedAsync
from fedsim.policies.fedbuff import FedBuff
from fedsim.policies.heterofl import HeteroFL
from fedsim.policies.overselect import Overselect
from fedsim.policies.partial import Partial
from fedsim.policies.salf import Salf
from fedsim.policies.wait import Wait

__all__ = ["POLICIES", "Aggregation", "Policy", "RoundContext", "RoundInputs", "RoundUpdate", "read_policy"]

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Salf, Drop, Wait, Partial, HeteroFL, Overselect,
                                                               FedAsync, FedBuff)}
assert POLICIES == {name: policy_class(name) for name in POLICY_PATHS}, "fedsim.spec.policy.POLICY_PATHS"
