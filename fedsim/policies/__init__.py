"""Straggler policies, one module each, registered here by their scenario name."""

from __future__ import annotations

from fedsim.fields import Fields
from fedsim.strategies.base import Aggregation, Policy, RoundContext, RoundInputs, RoundUpdate
from fedsim.strategies.drop import Drop
from fedsim.strategies.fedasync import FedAsync
from fedsim.strategies.fedbuff import FedBuff
from fedsim.strategies.heterofl import HeteroFL
from fedsim.strategies.overselect import Overselect
from fedsim.strategies.partial import Partial
from fedsim.strategies.salf import Salf
from fedsim.strategies.wait import Wait

__all__ = ["POLICIES", "Aggregation", "Policy", "RoundContext", "RoundInputs", "RoundUpdate", "read_policy"]

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Salf, Drop, Wait, Partial, HeteroFL, Overselect,
                                                               FedAsync, FedBuff)}


def read_policy(fields: Fields, training) -> Policy:
    name = fields.choice("name", sorted(POLICIES))
    policy = POLICIES[name].read(fields, training)
    fields.finish()
    return policy
