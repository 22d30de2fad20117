"""The reference model of the phone compute measurements: the LeNet the MNN benchmark trains (see
`fedsim.world.measurements`), and the FLOPs of one training sample of a model as fedsim counts them. A phone's
effective FLOP/s is one measured batch of this model's FLOPs divided by the measured time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.learn.models import materialise
from fedsim.learn.profile import Granularity, build_profile

__all__ = ["MnnLeNet", "train_flops_per_sample"]


class MnnLeNet(nn.Module):
    """The benchmark's LeNet (see the module docstring). Parameter-free steps that FlopCounterMode counts
    as zero are left out: dropout (it would also draw from torch's global RNG) and the final softmax."""

    flops_in_submodules = True      # forward calls only its layers and parameter-free functions (learn.profile)

    def __init__(self, train_conv2: bool = False):
        super().__init__()
        # Built on the meta device then zero-filled: weights do not matter for FLOPs, the global RNG does.
        self.conv1 = nn.Conv2d(1, 20, 5, device="meta")
        self.conv2 = nn.Conv2d(20, 50, 5, device="meta")
        self.ip1 = nn.Linear(800, 400, device="meta")
        self.ip2 = nn.Linear(400, 10, device="meta")
        materialise(self)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        self.conv2.requires_grad_(train_conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.ip1(torch.flatten(x, 1)))
        return self.ip2(x)


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Forward + backward FLOPs of one sample, as `fedsim.learn.profile` counts them for any simulated model."""
    profile = build_profile(model, input_shape, Granularity.MODULE)
    return profile.fwd_flops_per_sample + profile.bwd_flops_per_sample
