"""SALF (Lang, Cohen, Shlezinger, arXiv 2403.18375): every layer aggregated over the devices that reached it.

Backpropagation runs from the last layer to the first, so a device stopped by the deadline still holds the
gradients of its last `depth` layers and sends them. Layer l is updated with the average over its own
contributor set U_l; a layer nobody reached stays unchanged. One local step (FedSGD), as in the paper.
With `aggregation = "unbiased"` each layer is also scaled by 1 / (1 - P_l^U), where P_l, the probability
that a device misses layer l, is estimated online from every device-round so far (the policy's state).
With `batch_scaling = true` each participant's batch is scaled to the time it has before the deadline
(ADEL-FL, `fedsim.policies.batch_scaling`), and with `weighting = "samples"` (the default then) each layer's
average weights a device by its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.policies.batch_scaling import scaled_batches
from fedsim.policies.base import Aggregation, JSONValue, PolicyState
from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.layerwise import layerwise_fedsgd
from fedsim.policies.sync import RoundContext, RoundInputs, RoundUpdate, RunContext
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import TrainingSpec
from fedsim.world.timing import RoundPlan

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["DepthHistogram", "Salf"]


@dataclass(frozen=True)
class DepthHistogram(PolicyState):
    """How many device-rounds so far delivered exactly the last d layers, d = 0..L."""
    counts: tuple[int, ...]

    def to_json(self) -> JSONValue:
        return list(self.counts)

    def after(self, depths: np.ndarray) -> np.ndarray:
        """The histogram with one more round's depths counted."""
        return np.asarray(self.counts, dtype=np.int64) + np.bincount(depths, minlength=len(self.counts))


@dataclass(frozen=True)
class Salf(FixedDeadline):
    name: ClassVar[str] = "salf"
    reads: ClassVar[frozenset[str]] = frozenset({"deadline_s", "aggregation", "batch_scaling", "batch_fraction",
                                                 "weighting"})
    depth_model_refusal: ClassVar[str | None] = None     # each layer over the devices that reached it
    aggregation: Aggregation = Aggregation.MEAN
    batch_scaling: bool = False      # each participant's batch fits its time before the deadline (ADEL-FL)
    batch_fraction: float = 1.0      # ADEL-FL's m: the share of that time the planned batch takes
    weighting: str = "devices"       # each layer's average: every device alike, or by its batch ("samples")

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Salf":
        if training.local_steps != 1:
            raise fields.error("name", "salf uses one local step per round (FedSGD), as in the paper; "
                                       f"set training.local_steps = 1, got {training.local_steps}")
        scaling = fields.boolean("batch_scaling", False)
        fraction = fields.number("batch_fraction", 1.0, low=0.0, low_open=True, high=1.0)
        if fields.has("batch_fraction") and not scaling:
            raise fields.error("batch_fraction", f"scales the batches of batch_scaling = true; got {fraction:g} with "
                                                 "batch_scaling = false")
        return cls(
            deadline_s=cls.read_deadline_s(fields),
            aggregation=Aggregation(fields.choice("aggregation", [a.value for a in Aggregation], "mean")),
            batch_scaling=scaling, batch_fraction=fraction,
            weighting=fields.choice("weighting", ["devices", "samples"], "samples" if scaling else "devices"),
        )

    def start(self, run: RunContext) -> DepthHistogram:
        return DepthHistogram((0,) * (run.profile.n_layers + 1))

    def restore(self, data: JSONValue) -> DepthHistogram:
        return DepthHistogram(tuple(int(c) for c in data))

    def plan(self, ctx: RoundContext, deadline_s: float | None) -> RoundPlan:
        if not self.batch_scaling:
            return ctx.plan()
        assert deadline_s is not None
        return ctx.plan(samples=scaled_batches(ctx, deadline_s, self.batch_fraction))

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        state = inputs.state
        assert isinstance(state, DepthHistogram)
        weights = None
        if self.weighting == "samples":
            weights = np.array([len(b) for b in inputs.batches], dtype=np.float64)
        return layerwise_fedsgd(inputs, grads, inputs.depths, self.aggregation, state.after(inputs.depths), weights)

    def observe(self, state: PolicyState | None, inputs: RoundInputs) -> DepthHistogram:
        assert isinstance(state, DepthHistogram)
        return DepthHistogram(tuple(int(c) for c in state.after(inputs.depths)))

    def describe(self) -> str:
        extra = (f", batches x{self.batch_fraction:g}" if self.batch_scaling else "") + \
            (", by samples" if self.weighting == "samples" else "")
        return f"salf({self.aggregation.value}{extra})"
