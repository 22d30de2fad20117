"""KeepFastest: a complete synchronous fedsim policy written outside the package.

Each round, the K participants expected to finish first are kept: the deadline is set to the K-th smallest
expected finish time (download, forward and backward at the device's speed in this round, plus the upload
unless the upload mode is `ideal`), and the server applies FedSGD over the full updates of the first K
participants to deliver every layer. Devices still working at the deadline are cut, their work discarded.

Run it on any scenario (fields other policies read, such as `policy.deadline_s`, are named in a notice):

    PYTHONPATH=docs/examples fedsim run scenarios/quickstart.toml --set policy.name=keep_fastest:KeepFastest

and choose K with `--set policy.k=8` (default 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedsim.learn.grads import GradientEngine
from fedsim.policies import RoundContext, RoundInputs, RoundUpdate, SyncPolicy
from fedsim.policies.layerwise import full_model_update
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec, UploadMode

# The deadline is the K-th expected finish plus this fraction of it, so that device finishes by the deadline
# despite the rounding of a sum of phase durations.
MARGIN = 1e-9


@dataclass(frozen=True)
class KeepFastest(SyncPolicy):
    name: ClassVar[str] = "keep_fastest"
    reads: ClassVar[frozenset[str]] = frozenset({"k"})
    k: int = 5

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "KeepFastest":
        return cls(k=fields.integer("k", 5, low=1))

    def deadline(self, round_: int, ctx: RoundContext) -> float | None:
        plan = ctx.plan()                        # the whole mini-batch, at this round's speeds
        finish_s = plan.download_s + plan.forward_s + plan.backward_s.sum(axis=1)
        if ctx.upload_mode is not UploadMode.IDEAL:
            finish_s = finish_s + plan.upload_s.sum(axis=1)
        kth_s = float(np.sort(finish_s)[min(self.k, len(finish_s)) - 1])
        return kth_s * (1.0 + MARGIN)

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        complete = [int(i) for i in inputs.done_order if inputs.depths[i] == inputs.n_layers]
        return full_model_update(inputs, grads, np.sort(np.array(complete[: self.k], dtype=np.int64)))

    def describe(self) -> str:
        return f"keep_fastest(k={self.k})"
