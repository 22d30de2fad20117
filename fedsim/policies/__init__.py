"""Straggler policies, one module each; built-ins are registered by name in fedsim.spec.policy.POLICY_PATHS.

A policy outside fedsim is a class deriving from `SyncPolicy` (or `AsyncPolicy`) in any module, named in a
scenario as `policy.name = "package.module:Class"` (see docs/examples/keep_fastest.py).
"""

from __future__ import annotations

from fedsim.spec.policy import POLICY_PATHS, policy_class, read_policy
from fedsim.policies.asynchronous import AsyncPolicy, is_asynchronous
from fedsim.policies.base import Aggregation, JSONValue, PolicyBase, PolicyState
from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.sync import RoundContext, RoundInputs, RoundUpdate, RunContext, SyncPolicy
from fedsim.world.candidates import Candidates

__all__ = ["POLICY_PATHS", "Aggregation", "AsyncPolicy", "Candidates", "FixedDeadline", "JSONValue", "PolicyBase", "PolicyState",
           "RoundContext", "RoundInputs", "RoundUpdate", "RunContext", "SyncPolicy", "is_asynchronous",
           "policy_class", "read_policy"]
