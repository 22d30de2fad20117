"""What the device rounds of one round share (`RoundSetup`), built by the server before the round starts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedsim.policies.sync import RoundContext
from fedsim.spec.scenario import DeviceClassSpec, UploadMode
from fedsim.world.network import Network
from fedsim.world.timing import RoundPlan

__all__ = ["RoundSetup"]


@dataclass(frozen=True)
class _PlanColumns:
    """The plan's per-device numbers as Python lists: reading numpy scalars one by one costs ~10x more."""
    devices: list
    download_s: list
    forward_s: list
    backward_s: list       # list of per-device lists, in backward order
    target_depth: list
    download_bytes: list


@dataclass(frozen=True)
class RoundSetup:
    """Everything the device rounds of one round need; built by the server before the round starts."""
    round: int
    plan: RoundPlan
    deadline_s: float | None
    upload_mode: UploadMode
    powers: list[DeviceClassSpec]     # the class spec (power figures) of each participant
    quorum: int | None = None         # end the round once this many participants are done
    network: Network | None = None    # shared-link transfers; None: private links (plan durations)
    context: RoundContext | None = None   # what the policy planned the round from (None: an async job)
    step_batches: list[list[np.ndarray]] | None = None   # every participant's mini-batch of every local step
    straggler_depth: np.ndarray | None = None   # fleet.depth_model: each participant's drawn depth, -1 if none

    @cached_property
    def columns(self) -> _PlanColumns:
        p = self.plan
        return _PlanColumns(p.devices.tolist(), p.download_s.tolist(), p.forward_s.tolist(), p.backward_s.tolist(),
                            p.target_depth.tolist(), p.download_bytes.tolist())
