"""Full-model averaging of local updates (FedAvg): shared by wait, drop, partial, heterofl, overselect.

Each contributing device runs its local steps (`fedsim.learn.local.LocalTrainer`); the server forms the
weighted mean of their parameter changes and hands `mean_delta / lr` to its optimizer as a
pseudo-gradient, so with plain SGD the new model is the weighted mean of the local models, and with one
local step this is exactly FedSGD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedsim.policies.sync import RoundInputs, RoundUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["fedavg"]


def fedavg(inputs: RoundInputs, members: np.ndarray, weights: np.ndarray | None = None,
           submodels: dict[int, torch.nn.Module] | None = None) -> RoundUpdate:
    """Average the local updates of participants `members` (positions), weighted by `weights`."""
    from fedsim.learn.aggregate import weighted_mean_of_slices      # torch: imported at use

    trainer = inputs.trainer
    assert trainer is not None, "fedavg needs the server's LocalTrainer"
    n_layers = inputs.n_layers
    shapes = {n: p.shape for n, p in trainer.model.named_parameters()}
    if len(members) == 0:
        return RoundUpdate({n: None for n in shapes}, np.zeros(n_layers, dtype=np.int64), None)
    deltas, losses = [], []
    for i in members:
        steps = int(inputs.steps[i])
        batches = [b[: int(inputs.samples[i])] for b in inputs.step_batches[i][:steps]]
        sub = None if submodels is None else submodels.get(int(i))
        result = trainer.train(batches, sub, int(inputs.devices[i]))
        deltas.append(result.delta)
        losses.append(result.loss)
    w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=float)
    mean, held = weighted_mean_of_slices(deltas, list(w), shapes)
    grads = {n: mean[n] / trainer.lr for n in mean}
    frozen = {n: ~m for n, m in held.items() if not bool(m.all())}
    contributors = np.full(n_layers, len(members), dtype=np.int64)
    return RoundUpdate(grads, contributors, float(np.mean(losses)), frozen or None)
