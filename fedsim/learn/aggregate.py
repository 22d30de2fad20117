"""Aggregation math: pure functions over `dict[str, Tensor]`, no policy decisions.

A policy decides which devices count for which layer and by what to divide; these functions do the
arithmetic. Layers are indexed in forward order (0 = first layer).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["layer_update", "miss_probabilities", "unbiased_scales", "weighted_mean_of_slices"]


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


def weighted_mean_of_slices(deltas: list[dict[str, torch.Tensor]], weights: list[float],
                            shapes: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weighted mean of per-device tensors that may cover only the leading slice of each global tensor.

    Returns (mean, held): every entry is averaged over the devices whose tensor holds it (HeteroFL);
    `held` is False where no device held the entry (its mean is 0 there). With full-size tensors this
    is the plain weighted mean.
    """
    mean: dict[str, torch.Tensor] = {}
    held: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        total = None
        wsum = None
        for delta, w in zip(deltas, weights):
            d = delta[name]
            if total is None:
                total = torch.zeros(shape, dtype=d.dtype)
                wsum = torch.zeros(shape, dtype=d.dtype)
            index = tuple(slice(0, s) for s in d.shape)
            total[index] += w * d
            wsum[index] += w
        if total is None:
            continue
        mask = wsum > 0
        mean[name] = torch.where(mask, total / torch.where(mask, wsum, torch.ones_like(wsum)), torch.zeros_like(total))
        held[name] = mask
    return mean, held
