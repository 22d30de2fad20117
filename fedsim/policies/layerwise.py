"""FedSGD aggregation layer by layer over nested contributor sets (each device equally, or weighted, e.g. by its
batch size): shared by salf, drop, wait, overselect."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedsim.policies.base import Aggregation
from fedsim.policies.fedavg import fedavg
from fedsim.policies.sync import RoundInputs, RoundUpdate

if TYPE_CHECKING:
    from fedsim.learn.grads import GradientEngine

__all__ = ["layerwise_fedsgd", "full_model_update"]


def layerwise_fedsgd(inputs: RoundInputs, grads: GradientEngine, counted_depths: np.ndarray, aggregation: Aggregation,
                     depth_counts: np.ndarray | None = None, weights: np.ndarray | None = None) -> RoundUpdate:
    """Each device contributes its gradient to the last `counted_depths[i]` layers; aggregate per layer.

    `depth_counts` (for `Aggregation.UNBIASED`): the histogram of depths over every device-round so far.
    `weights` (e.g. each participant's batch size): layer l is sum_{U_l} w_i g_i / sum_{U_l} w_i (`all`: over
    the weights of every participant); when every participant's weight is the same this is the unweighted
    rule, which is then computed as such (bit for bit)."""
    if weights is not None and (len(weights) == 0 or bool(np.all(weights == weights[0]))):
        weights = None
    from fedsim.learn.aggregate import layer_update, miss_probabilities, unbiased_scales    # torch: at use

    sums = grads.layer_sums(inputs.batches, counted_depths) if weights is None else \
        grads.layer_sums(inputs.batches, counted_depths, weights)
    contributors = sums.counts
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        n_layers = len(contributors)
        reached = counted_depths[None, :] >= (n_layers - np.arange(n_layers))[:, None]    # (L, n), forward order
        divisors = np.where(contributors > 0, w.sum(), 0.0) if aggregation is Aggregation.ALL else reached @ w
    elif aggregation is Aggregation.ALL:
        divisors = np.where(contributors > 0, len(inputs.devices), 0)
    else:
        divisors = contributors
    scales = None
    if aggregation is Aggregation.UNBIASED:
        assert depth_counts is not None, "unbiased aggregation needs the depth histogram"
        scales = unbiased_scales(miss_probabilities(depth_counts), len(inputs.devices))
    update = layer_update(sums.sums, grads.layer_of_param, divisors, scales)
    return RoundUpdate(update, contributors, sums.mean_loss)


def full_model_update(inputs: RoundInputs, grads: GradientEngine, members: np.ndarray, aggregation: Aggregation = Aggregation.MEAN) -> RoundUpdate:
    """Whole-model updates of `members` (positions): FedSGD with one local step, FedAvg with several."""
    if len(members) and int(inputs.steps[members].max()) > 1:
        update = fedavg(inputs, members)
        if aggregation is Aggregation.ALL and len(members):
            scale = len(members) / len(inputs.devices)
            update = RoundUpdate({n: None if g is None else g * scale for n, g in update.grads.items()},
                                 update.contributors, update.train_loss, update.frozen)
        return update
    depths = np.zeros(len(inputs.devices), dtype=np.int64)
    depths[members] = inputs.n_layers
    return layerwise_fedsgd(inputs, grads, depths, aggregation)
