"""A round's mini-batches at the sizes the policy planned (`RoundPlan.samples`), which may differ per device."""

from __future__ import annotations

import numpy as np

from fedsim.errors import FedsimError
from fedsim.learn.data import Partition
from fedsim.policies import RoundContext
from fedsim.seeds import keyed_rng

__all__ = ["planned_batches"]


def planned_batches(partition: Partition, seed: int, round_: int, planned: np.ndarray, ctx: RoundContext,
                    drawn: list[list[np.ndarray]], who: str) -> list[list[np.ndarray]]:
    """Each participant's mini-batches (one per local step) at its planned size `planned[i]`: the drawn ones when
    the sizes agree, their first samples when it plans fewer (a uniform subset too: a draw is in random order),
    drawn anew at that size from round `round_`'s `batch` stream, in participant order, when it plans more.
    `who` names the policy in the error of a plan larger than what a device holds (`ctx.held`)."""
    if np.array_equal(planned, ctx.samples):          # the sizes drawn (`ctx.samples`, one per device)
        return drawn
    over = np.flatnonzero(planned > ctx.held)
    if len(over):
        i = int(over[0])
        raise FedsimError(f"{who} planned a batch of {int(planned[i])} samples for device {int(ctx.devices[i])} "
                          f"in round {round_}, which holds {int(ctx.held[i])}")
    rng = None
    out = []
    for i, steps in enumerate(drawn):
        n = int(planned[i])
        if n <= len(steps[0]):
            out.append(steps if n == len(steps[0]) else [b[:n] for b in steps])
            continue
        rng = rng if rng is not None else keyed_rng(seed, "batch", round_)
        out.append(partition.sample_batches(ctx.devices[i:i + 1], n, len(steps), rng)[0])
    return out
