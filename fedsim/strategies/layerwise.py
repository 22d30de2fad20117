"""FedSGD aggregation layer by layer over nested contributor sets: shared by salf, drop and wait."""

from __future__ import annotations

import numpy as np

from fedsim.aggregate import layer_update, miss_probabilities, unbiased_scales
from fedsim.strategies.base import Aggregation, RoundInputs, RoundUpdate

__all__ = ["layerwise_fedsgd"]


def layerwise_fedsgd(inputs: RoundInputs, grads, counted_depths: np.ndarray, aggregation: Aggregation) -> RoundUpdate:
    """Each device contributes its gradient to the last `counted_depths[i]` layers; aggregate per layer."""
    sums = grads.layer_sums(inputs.batches, counted_depths)
    contributors = sums.counts
    if aggregation is Aggregation.ALL:
        divisors = np.where(contributors > 0, len(inputs.devices), 0)
    else:
        divisors = contributors
    scales = None
    if aggregation is Aggregation.UNBIASED:
        scales = unbiased_scales(miss_probabilities(inputs.depth_counts), len(inputs.devices))
    update = layer_update(sums.sums, grads.layer_of_param, divisors, scales)
    return RoundUpdate(update, contributors, sums.mean_loss)
