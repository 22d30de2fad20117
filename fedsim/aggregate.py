"""Aggregation math: pure functions over `dict[str, Tensor]`, no policy decisions.

A policy decides which devices count for which layer and by what to divide; these functions do the
arithmetic. Layers are indexed in forward order (0 = first layer).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["layer_update", "miss_probabilities", "unbiased_scales"]


def layer_update(sums: dict[str, torch.Tensor], layer_of_param: dict[str, int], divisors: np.ndarray,
                 scales: np.ndarray | None = None) -> dict[str, torch.Tensor | None]:
    """`scale_l * sum_l / divisor_l` per parameter; None (leave unchanged) where nothing was summed."""
    out: dict[str, torch.Tensor | None] = {}
    for name, layer in layer_of_param.items():
        total = sums.get(name)
        if total is None or divisors[layer] <= 0:
            out[name] = None
            continue
        factor = 1.0 / float(divisors[layer])
        if scales is not None:
            factor *= float(scales[layer])
        out[name] = total * factor
    return out


def miss_probabilities(depth_counts: np.ndarray) -> np.ndarray:
    """P_l, the probability that a device does not reach layer l, from a histogram of depths.

    `depth_counts[d]` counts device-rounds that delivered exactly the last d layers (d = 0..L).
    A device reaches layer l (forward index) iff its depth >= L - l.
    """
    n_layers = len(depth_counts) - 1
    total = depth_counts.sum()
    if total == 0:
        return np.zeros(n_layers)
    below = np.cumsum(depth_counts)            # below[d] = devices with depth <= d
    return np.array([below[n_layers - l - 1] / total for l in range(n_layers)])


def unbiased_scales(miss_prob: np.ndarray, n_participants: int, max_scale: float = 1e3) -> np.ndarray:
    """1 / (1 - P_l^U): makes the expected update equal the full-participation update."""
    reach_any = 1.0 - np.power(miss_prob, n_participants)
    return np.minimum(1.0 / np.maximum(reach_any, 1.0 / max_scale), max_scale)
