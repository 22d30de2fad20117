"""Real gradients of exactly what each device delivered, computed in as few passes as exactness allows.

Devices that delivered the same depth d share one forward/backward over their concatenated mini-batches
(the gradient of a sum is the sum of the gradients), and autograd is asked only for the parameters of the
last d layers (truncated backward: the same values, less work). Devices that delivered nothing cost nothing.
Each device's loss is its own mini-batch mean, so per-sample weights are 1 / (its batch size).

This is the only module (with `profile.py`) that touches autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import NumericalError
from fedsim.profile import ModelProfile

__all__ = ["GradientEngine", "LayerSums"]


@dataclass(frozen=True)
class LayerSums:
    sums: dict[str, torch.Tensor]   # per parameter: sum over contributing devices of their gradients
    counts: np.ndarray              # per layer (forward order): number of contributing devices
    loss_sum: float                 # sum of the contributing devices' mini-batch mean losses
    n_devices: int                  # devices that contributed to at least one layer

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.n_devices if self.n_devices else None


class GradientEngine:
    """Gradients of the model's current parameters on devices' mini-batches."""

    def __init__(self, model: nn.Module, profile: ModelProfile, x_train: torch.Tensor, y_train: torch.Tensor,
                 path: str = "auto"):
        self.model = model
        self.path = path
        self.profile = profile
        dtype = next(model.parameters()).dtype
        self.x = x_train.to(dtype)
        self.y = y_train
        self.params = dict(model.named_parameters())
        self.layer_of_param = profile.layer_of_param()
        n = profile.n_layers
        # the parameters of the last d layers, for each depth d
        self._suffix_params = [
            [p for layer in profile.layers[n - d:] for p in layer.param_names] for d in range(n + 1)
        ]

    def _batch(self, batches: list[np.ndarray], members: np.ndarray):
        idx = np.concatenate([batches[i] for i in members])
        weights = np.concatenate([np.full(len(batches[i]), 1.0 / len(batches[i])) for i in members])
        x = self.x[torch.from_numpy(idx)]
        y = self.y[torch.from_numpy(idx)]
        return x, y, torch.from_numpy(weights).to(self.x.dtype)

    def layer_sums(self, batches: list[np.ndarray], depths: np.ndarray) -> LayerSums:
        """Sum of the gradients of device i's mini-batch mean loss over its last `depths[i]` layers."""
        n_layers = self.profile.n_layers
        depths = np.asarray(depths, dtype=np.int64)
        sums: dict[str, torch.Tensor] = {}
        counts = np.zeros(n_layers, dtype=np.int64)
        loss_sum = 0.0
        n_devices = 0
        for d in sorted(set(depths.tolist()) - {0}, reverse=True):
            members = np.flatnonzero(depths == d)
            x, y, w = self._batch(batches, members)
            losses = F.cross_entropy(self.model(x), y, reduction="none")
            loss = (losses * w).sum()
            if not torch.isfinite(loss):
                raise NumericalError(f"non-finite loss ({loss.item()}) in the mini-batches of devices at depth {d}")
            names = self._suffix_params[d]
            grads = torch.autograd.grad(loss, [self.params[p] for p in names])
            for name, g in zip(names, grads):
                sums[name] = sums[name] + g if name in sums else g
            counts[n_layers - d:] += len(members)
            loss_sum += float(loss.detach())
            n_devices += len(members)
        return LayerSums(sums, counts, loss_sum, n_devices)
