"""Less local work (FedProx/FLSim style): each device does as much of its work as fits the deadline.

With one local step a device processes the largest prefix of its mini-batch it can finish in time; with
several, as many whole steps as fit (or, if not even one fits, a prefix of one step's batch). A device
knows its speed in the round and its nominal link rates, so it plans exactly; with a non-ideal upload mode
the upload of the whole model is budgeted too. The server weights each update by the work it holds
(samples x steps), so with one step the update is the mean over every sample processed in the round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.fedavg import fedavg
from fedsim.policies.sync import RoundContext, RoundInputs, RoundUpdate
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec, UploadMode
from fedsim.world.timing import RoundPlan

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["Partial", "work_that_fits"]

_SAFETY = 1.0 - 1e-9     # planned work ends strictly before the deadline despite float rounding


def work_that_fits(ctx: RoundContext, deadline_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(samples per step, steps) each participant can finish before the deadline. A step costs its fixed
    overhead (`fleet.classes[i].step_overhead_s`, times the slowdown) plus its samples' FLOPs."""
    ones = np.ones(len(ctx.devices), dtype=np.int64)
    one = ctx.plan(samples=ones, steps=ones, step_overhead=False)
    per_sample_s = one.forward_s + one.backward_s.sum(axis=1)          # one forward+backward of one sample
    overhead_s = one.download_s.copy()
    if ctx.upload_mode is not UploadMode.IDEAL:
        overhead_s += one.upload_s.sum(axis=1)
    avail_s = np.maximum(deadline_s * _SAFETY - overhead_s, 0.0)
    batch = ctx.samples
    step_s = ctx.step_overhead_s()
    if step_s is None:
        whole_steps = np.floor(avail_s / (batch * per_sample_s)).astype(np.int64)
        prefix = np.floor(avail_s / per_sample_s)
    else:
        whole_steps = np.floor(avail_s / (step_s + batch * per_sample_s)).astype(np.int64)
        prefix = np.floor(np.maximum(avail_s - step_s, 0.0) / per_sample_s)
    steps = np.clip(whole_steps, 1, ctx.steps)
    samples = np.where(whole_steps >= 1, batch, np.minimum(batch, prefix)).astype(np.int64)
    return samples, steps


@dataclass(frozen=True)
class Partial(FixedDeadline):
    name: ClassVar[str] = "partial"
    reads: ClassVar[frozenset[str]] = frozenset({"deadline_s"})
    depth_model_refusal: ClassVar[str | None] = (
        "its stragglers process fewer samples, not fewer layers, so a drawn depth does not say what they deliver")

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Partial":
        return cls(deadline_s=cls.read_deadline_s(fields))

    def plan(self, ctx: RoundContext, deadline_s: float | None) -> RoundPlan:
        assert deadline_s is not None
        samples, steps = work_that_fits(ctx, deadline_s)
        plan = ctx.plan(samples=samples, steps=steps)
        return replace(plan, target_depth=np.where(samples > 0, plan.target_depth, 0))

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        members = np.flatnonzero((inputs.depths == inputs.n_layers) & (inputs.samples > 0))
        work = inputs.samples[members] * inputs.steps[members]
        return fedavg(inputs, members, work)
