"""A round's update when a participant's own update is not finite: named in an error, or dropped.

`aggregate_finite` runs the policy's aggregation; on NaN/Inf it checks each participant alone (the same
layers, local steps, sub-model and work as in the round, through the same gradient engine) and, by
`training.on_nonfinite`, stops with an error naming them or aggregates the others; when every participant is
finite alone but not their aggregate, training has diverged and the error says so.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fedsim.errors import NumericalError
from fedsim.policies.sync import RoundInputs, RoundUpdate, SyncPolicy
from fedsim.sim.health import devices_text, require_finite

__all__ = ["aggregate_finite"]


def aggregate_finite(policy: SyncPolicy, grads, inputs: RoundInputs, model: torch.nn.Module,
                     on_nonfinite: str) -> tuple[RoundUpdate, list[int], NumericalError | None]:
    """(update, dropped participants, error): the policy's update; on NaN/Inf, the participants whose own
    update is not finite are found, then named in the error (on_nonfinite = "stop") or dropped."""
    try:
        update = policy.aggregate(inputs, grads)
        require_finite(update)
        return update, [], None
    except NumericalError as exc:
        cause = str(exc)
    r = inputs.round
    bad, losses = _nonfinite_devices(policy, grads, inputs)
    ids = [int(inputs.devices[i]) for i in bad]
    nothing = RoundUpdate({n: None for n, _ in model.named_parameters()},
                          np.zeros(inputs.n_layers, dtype=np.int64), None)
    if bad and on_nonfinite == "stop":
        return nothing, bad, NumericalError(
            f"round {r}: non-finite loss or gradient in {devices_text(ids)} ({cause}); "
            "lower training.lr, or set training.on_nonfinite = \"drop\"")
    if bad:
        depths = inputs.depths.copy()
        depths[bad] = 0
        try:
            update = policy.aggregate(replace(inputs, depths=depths), grads)
            require_finite(update)
            return update, bad, None
        except NumericalError as exc:
            cause = str(exc)
    # every remaining device is finite alone but not their aggregate: training has diverged
    live = inputs.depths > 0
    live[bad] = False
    worst = max(losses, key=losses.get) if losses else None
    largest = "" if worst is None else (f"; the largest loss, {losses[worst]:.3g}, is device "
                                        f"{int(inputs.devices[worst])}'s")
    return nothing, bad, NumericalError(
        f"round {r}: non-finite aggregate of {devices_text(inputs.devices[live])}, although "
        f"each one's update is finite alone ({cause}{largest}): training has diverged; lower training.lr")


def _nonfinite_devices(policy: SyncPolicy, grads, inputs: RoundInputs) -> tuple[list[int], dict[int, float]]:
    """Participants (positions) whose own update is not finite, and each other one's training loss."""
    bad, losses = [], {}
    for i in np.flatnonzero(inputs.depths > 0):
        depths = np.zeros_like(inputs.depths)
        depths[i] = inputs.depths[i]
        try:
            alone = policy.aggregate(replace(inputs, depths=depths), grads)
            require_finite(alone)
        except NumericalError:
            bad.append(int(i))
            continue
        if alone.train_loss is not None:
            losses[int(i)] = alone.train_loss
    return bad, losses
