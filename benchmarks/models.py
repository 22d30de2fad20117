"""Models for the benchmarks, usable as scenario factories ("benchmarks.models:deep_mlp")."""

from __future__ import annotations

import math

from torch import nn


class DeepMLP(nn.Module):
    """Ten Linear layers (in -> 32 -> ... -> 32 -> classes): many layers, little compute per event."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, n_layers: int = 10):
        super().__init__()
        sizes = [in_features] + [hidden] * (n_layers - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = layer(x).relu()
        return self.layers[-1](x)


def deep_mlp(input_shape, num_classes):
    return DeepMLP(math.prod(input_shape), num_classes)
