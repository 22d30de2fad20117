"""What every participant of a round did, as columns: `RoundOutcomes`.

A round computed at once (`fedsim.sim.timeline`) makes these columns directly; a round run event by event makes
one `DeviceOutcome` per participant and gathers them (`RoundOutcomes.of`). The server reads only the columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedsim.output.trace import DeviceStatus
from fedsim.sim.device_round import DeviceOutcome, StopCause

__all__ = ["RoundOutcomes"]

_NOTHING, _PARTIAL, _COMPLETE, _OFFLINE, _NONFINITE = (list(DeviceStatus).index(s) for s in (
    DeviceStatus.NOTHING, DeviceStatus.PARTIAL, DeviceStatus.COMPLETE, DeviceStatus.OFFLINE, DeviceStatus.NONFINITE))


@dataclass
class RoundOutcomes:
    """One entry per participant, in participant order; seconds are simulated."""
    depth: np.ndarray              # int64: layers delivered (the last `depth` layers)
    layers_computed: np.ndarray    # int64: layers whose backward phase ended
    download_s: np.ndarray
    compute_s: np.ndarray
    upload_s: np.ndarray
    active_until_at: np.ndarray    # when each stopped working in this round
    done_at: np.ndarray            # when each delivered everything it intended to; NaN if it did not
    offline: np.ndarray            # bool: went offline mid-round (churn)
    stopped: np.ndarray            # bool: stopped by churn or by the round's quorum
    nonfinite: np.ndarray          # bool: its update had NaN/Inf and was dropped (set by the server)

    @classmethod
    def of(cls, outs: Sequence[DeviceOutcome]) -> RoundOutcomes:
        def col(name: str, dtype) -> np.ndarray:
            return np.array([getattr(o, name) for o in outs], dtype=dtype).reshape(len(outs))

        return cls(col("depth", np.int64), col("layers_computed", np.int64), col("download_s", np.float64),
                   col("compute_s", np.float64), col("upload_s", np.float64), col("active_until_at", np.float64),
                   np.array([np.nan if o.done_at is None else o.done_at for o in outs], dtype=np.float64),
                   np.array([o.stopped is StopCause.OFFLINE for o in outs], dtype=bool),
                   np.array([o.stopped is not None for o in outs], dtype=bool), np.zeros(len(outs), dtype=bool))

    def __len__(self) -> int:
        return len(self.depth)

    @property
    def delivered_all(self) -> np.ndarray:
        """bool: delivered everything it intended to."""
        return ~np.isnan(self.done_at)

    def done_order(self) -> np.ndarray:
        """Participants that delivered everything, by the time they did (ties: participant order)."""
        done = np.flatnonzero(self.delivered_all)
        return done[np.argsort(self.done_at[done], kind="stable")]

    def any_cut(self) -> bool:
        """Whether some participant was still working when the round ended it (not one that had stopped)."""
        return bool((~self.delivered_all & ~self.stopped).any())

    def statuses(self, n_layers: int) -> np.ndarray:
        """Each participant's devices.parquet status as a position in `DeviceStatus` (its members in definition
        order), as `DeviceOutcome.status` gives it (nonfinite first)."""
        code = np.where(self.depth == 0, _NOTHING, np.where(self.depth == n_layers, _COMPLETE, _PARTIAL))
        code = np.where(self.offline, _OFFLINE, code)
        return np.where(self.nonfinite, _NONFINITE, code)
