"""What the device rounds of one round share (`RoundSetup`), built by the server before the round starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedsim.policies.sync import RoundContext
from fedsim.spec.scenario import DeviceClassSpec, UploadMode
from fedsim.world.network import Network
from fedsim.world.timing import RoundPlan

__all__ = ["ParticipantClasses", "RoundSetup", "power_table"]


class ParticipantClasses(Sequence):
    """Each participant's class spec (its power figures), held as the index of its class in `classes`."""

    def __init__(self, classes: Sequence[DeviceClassSpec], index: np.ndarray):
        self.classes, self.index = classes, np.asarray(index, dtype=np.int64)
        self._listed: list[int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._listed is None:
            self._listed = self.index.tolist()
        return self.classes[self._listed[i]]


def power_table(powers: Sequence[DeviceClassSpec]) -> np.ndarray:
    """(n, 4): each participant's power (W) by phase kind: download (rx), forward and backward (compute), upload
    (tx). Each distinct class spec is read once."""
    if isinstance(powers, ParticipantClasses):
        classes, index = powers.classes, powers.index
    else:
        ids = np.fromiter(map(id, powers), dtype=np.int64, count=len(powers))
        _, first, index = np.unique(ids, return_index=True, return_inverse=True)
        classes, index = [powers[j] for j in first.tolist()], index.reshape(-1)
    table = np.array([[c.power_rx_w, c.power_compute_w, c.power_compute_w, c.power_tx_w] for c in classes],
                     dtype=np.float64).reshape(len(classes), 4)
    return table[index]


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
    powers: Sequence[DeviceClassSpec]     # the class spec (power figures) of each participant
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
