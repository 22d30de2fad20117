"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021): slow devices train a narrower sub-model sized to fit.

A device of width ratio r trains the model whose hidden layers keep their first ceil(r * h) units or
channels (inputs and outputs keep their full size), so its FLOPs and bytes come from that sub-model. The
server averages each parameter entry over the devices whose sub-model holds it; entries no device held
stay unchanged. Devices that do not finish by the deadline are dropped. Widths are set per device class
(`policy.widths = { phone = 0.5 }`, 1 for unnamed classes) or chosen automatically: the largest of
1, 1/2, 1/4, 1/8, 1/16 whose expected round time (mean speed, mean slowdown, mean link rates) fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.policies.base import JSONValue, PolicyState
from fedsim.policies.deadline import FixedDeadline
from fedsim.policies.fedavg import fedavg
from fedsim.policies.sync import RoundContext, RoundInputs, RoundUpdate, RunContext
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import DeviceClassSpec, Scenario, TrainingSpec, UploadMode
from fedsim.world.timing import RoundPlan, merge_plans

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["HeteroFL", "ClassWidths", "AUTO_WIDTHS"]

AUTO_WIDTHS = (1.0, 0.5, 0.25, 0.125, 0.0625)


@dataclass(frozen=True)
class ClassWidths(PolicyState):
    """The width ratio of every device class, in class order (given, or chosen before the first round)."""
    widths: tuple[float, ...]

    def to_json(self) -> JSONValue:
        return list(self.widths)

    def of(self, class_of: np.ndarray) -> np.ndarray:
        """The width of each device of classes `class_of`."""
        return np.asarray(self.widths)[class_of]


@dataclass(frozen=True)
class HeteroFL(FixedDeadline):
    name: ClassVar[str] = "heterofl"
    reads: ClassVar[frozenset[str]] = frozenset({"deadline_s", "widths"})
    depth_model_refusal: ClassVar[str | None] = "its stragglers train narrower sub-models, not fewer layers"
    widths: tuple[tuple[str, float], ...] | None = None     # None: automatic

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "HeteroFL":
        deadline = cls.read_deadline_s(fields)
        raw = fields.raw("widths", "auto")
        if raw == "auto":
            return cls(deadline_s=deadline)
        table = fields.sub("widths")
        widths = tuple((name, table.number(name, low=0.0, high=1.0, low_open=True)) for name in sorted(table.table))
        return cls(deadline_s=deadline, widths=widths)

    def check(self, scenario: Scenario) -> None:
        super().check(scenario)
        if scenario.model.name not in ("mlp", "cnn"):
            raise ScenarioError(scenario.source, "policy.name",
                                f"heterofl needs a model whose width can be scaled (mlp, cnn), got {scenario.model.name!r}")
        names = {c.name for c in scenario.fleet.classes}
        for name, _ in self.widths or ():
            if name not in names:
                raise ScenarioError(scenario.source, f"policy.widths.{name}",
                                    f"no device class of that name (classes: {', '.join(sorted(names))})")

    def start(self, run: RunContext) -> ClassWidths:
        classes = run.fleet.classes
        if self.widths is not None:
            given = dict(self.widths)
            return ClassWidths(tuple(float(given.get(c.name, 1.0)) for c in classes))
        return ClassWidths(tuple(self._auto_width(i, c, run) for i, c in enumerate(classes)))

    def restore(self, data: JSONValue) -> ClassWidths:
        return ClassWidths(tuple(float(w) for w in data))

    def _auto_width(self, index: int, spec: DeviceClassSpec, run: RunContext) -> float:
        def mean(dist, per_device: np.ndarray) -> float:
            """The class's expected value: its distribution's mean, or (measured phones, FLASH or wireless
            links, which have no distribution in the scenario) the mean over the class's devices."""
            return dist.mean if dist is not None else float(per_device[run.fleet.class_of == index].mean())

        down_bps = mean(spec.downlink_bps, run.fleet.downlink_bps)
        up_bps = mean(spec.uplink_bps, run.fleet.uplink_bps)
        speed_flops = mean(spec.speed_flops, run.fleet.speed_flops)
        training = run.scenario.training
        schedule = self.schedule(run)       # with deadlines that change: the widths fit the shortest one
        deadline_s = min(schedule) if schedule is not None else self.deadline_s
        for width in AUTO_WIDTHS:
            profile = run.submodel(width)[1]
            flops = (profile.fwd_flops_per_sample + profile.bwd_flops_per_sample) * training.batch_size * training.local_steps
            time_s = spec.latency_s + 8 * profile.total_bytes / down_bps
            time_s += flops * spec.slowdown.mean / speed_flops
            if run.scenario.network.upload_mode is not UploadMode.IDEAL:
                time_s += spec.latency_s + 8 * profile.total_bytes / up_bps
            if time_s <= deadline_s:
                return width
        return AUTO_WIDTHS[-1]

    def plan(self, ctx: RoundContext, deadline_s: float | None) -> RoundPlan:
        assert isinstance(ctx.state, ClassWidths)
        widths = ctx.state.of(ctx.fleet.class_of[ctx.devices])
        plans, rows = [], []
        for w in sorted(set(widths.tolist()), reverse=True):
            idx = np.flatnonzero(widths == w)
            plans.append(ctx.plan(idx, profile=ctx.submodel(w)[1]))
            rows.append(idx)
        return merge_plans(plans, rows, len(ctx.devices))

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        ctx = inputs.context
        assert isinstance(ctx.state, ClassWidths)
        widths = ctx.state.of(ctx.fleet.class_of[ctx.devices])
        members = np.flatnonzero(inputs.depths == inputs.n_layers)
        submodels = {int(i): ctx.submodel(float(widths[i]))[0] for i in members if widths[i] < 1.0}
        return fedavg(inputs, members, submodels=submodels)

    def describe(self) -> str:
        return "heterofl"
