"""The SALF authors' straggler model (`fleet.depth_model`): each round, which participants are stragglers and
the depth each one reaches.

The draw. Round r's draws come from their own stream (`fedsim.seeds.keyed_rng(seed, "depth_model", r)`), so
nothing else the run draws moves: first one uniform per participant (a straggler when it is below
`stragglers`), then, with `depth = "uniform"`, one depth per participant, uniform on 1..L (the authors'
`randint(1, L + 1)`: a straggler always delivers at least the last layer and may reach every one), of which
only the stragglers' are used. A fixed `depth = N` draws nothing more.

Simulated time. A straggler's drawn depth caps the depth it intends to deliver (`RoundPlan.target_depth`):
it downloads, runs the forward pass and the backward of its last `d` layers (and, outside `ideal` uploads, the
uploads of those layers) at the timing model's durations, then stops and idles until the round ends. The
other participants attempt every layer. The deadline still cuts whoever has not finished by it, so what a
device delivers is the smaller of its drawn depth and what its speed allows; with a deadline nobody reaches,
the depths delivered are exactly the depths drawn, and the round lasts until its last participant has
delivered what it intends (the timing model's time for what was delivered). Each straggler's round starts
with a `straggler` event whose `layer` is the deepest layer it will reach (the forward index of the `d`-th
layer in backward order; -1 for depth 0).

Policies. A policy declares whether a round of such stragglers is meaningful to it
(`PolicyBase.depth_model_refusal`, None when it is): salf aggregates each layer over the devices that reached
it, drop keeps only the devices that delivered every layer (a straggler that drew every layer counts).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.spec.depth_model import DepthModelSpec
from fedsim.world.timing import RoundPlan

__all__ = ["NOT_A_STRAGGLER", "draw_straggler_depths", "cap_target_depth", "deepest_layer", "deepest_layers",
           "check_depth_model"]

NOT_A_STRAGGLER = -1


def draw_straggler_depths(spec: DepthModelSpec, n: int, n_layers: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64: each participant's drawn depth if it is a straggler this round, else NOT_A_STRAGGLER."""
    straggler = rng.random(n) < spec.stragglers
    if spec.depth is None:
        depth = rng.integers(1, n_layers + 1, size=n, dtype=np.int64)
    else:
        depth = np.full(n, spec.depth, dtype=np.int64)
    return np.where(straggler, depth, NOT_A_STRAGGLER)


def cap_target_depth(plan: RoundPlan, drawn: np.ndarray) -> RoundPlan:
    """The plan with each straggler's target depth capped by its drawn depth (the others' unchanged)."""
    capped = np.where(drawn != NOT_A_STRAGGLER, np.minimum(plan.target_depth, drawn), plan.target_depth)
    return replace(plan, target_depth=capped.astype(np.int64))


def deepest_layer(plan: RoundPlan, depth: int) -> int:
    """The forward index of the deepest layer a device of depth `depth` reaches (-1 for depth 0)."""
    return plan.layer_order[depth - 1] if depth > 0 else -1


def deepest_layers(plan: RoundPlan, depths: np.ndarray) -> np.ndarray:
    """`deepest_layer` of each of `depths` (int64)."""
    order = np.asarray(plan.layer_order, dtype=np.int64)
    depths = np.asarray(depths, dtype=np.int64)
    return np.where(depths > 0, order[np.maximum(depths - 1, 0)], -1)


def check_depth_model(spec: DepthModelSpec | None, n_layers: int, source: str) -> None:
    """A fixed depth must be one the model has (checked once the model is built)."""
    if spec is not None and spec.depth is not None and spec.depth > n_layers:
        raise ScenarioError(source, "fleet.depth_model.depth", f"must be at most the model's {n_layers} layers "
                                                               f"(model.granularity), got {spec.depth}")
