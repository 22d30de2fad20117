"""`fleet.depth_model`: the SALF authors' straggler model, which draws depths instead of times.

`depth_model = { stragglers = 0.9, depth = "uniform" }` (or `depth = N`): every round, each participant is a
straggler with probability `stragglers`; a straggler's backward pass stops after the last `d` layers, `d`
drawn uniformly from 1..L (`"uniform"`, as the authors' code draws it: never 0, sometimes every layer) or
fixed at `N` (0..L; 0: it delivers nothing). The other participants attempt every layer. The draw lives in
`fedsim.world.stragglers`; how it meets simulated time and the policies is documented there.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.spec.fields import Fields

__all__ = ["DepthModelSpec", "read_depth_model"]


@dataclass(frozen=True)
class DepthModelSpec:
    stragglers: float            # probability that a participant is a straggler in a round
    depth: int | None            # a straggler's depth in layers; None: uniform on 1..L

    def describe_depth(self) -> str:
        return "uniform" if self.depth is None else str(self.depth)


def read_depth_model(fields: Fields, key: str) -> DepthModelSpec | None:
    """`fleet.depth_model = { stragglers = p, depth = "uniform" | N }`; None when absent."""
    if fields.raw(key, None) is None:
        return None
    sub = fields.sub(key)
    stragglers = sub.number("stragglers", low=0.0, high=1.0)
    raw = sub.raw("depth", "uniform")
    if raw == "uniform":
        depth = None
    elif isinstance(raw, str):
        raise sub.error("depth", f"must be \"uniform\" or an integer >= 0 (a number of layers), got {raw!r}")
    else:
        depth = sub.integer("depth", low=0, high=32_767)
    sub.finish()
    return DepthModelSpec(stragglers, depth)
