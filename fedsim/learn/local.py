"""Local training on devices: several SGD steps (FedAvg), fewer samples (partial), sub-models (HeteroFL).

Each device starts from the global parameters (or the leading slice of them for a narrower sub-model),
takes its local SGD steps on its own mini-batches (on the training loss, fedsim.learn.loss), and returns the
change of its parameters. The loop runs one device at a time with `torch.func.functional_call`, so no model
is copied per device; it is exact for every model (BatchNorm included). Like `grads.py`, this module sits at
the torch edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedsim.errors import NumericalError
from fedsim.learn.loss import CROSS_ENTROPY, Loss
from fedsim.learn.rows import take_rows

__all__ = ["LocalTrainer", "LocalResult", "leading_slice"]


def leading_slice(shape: torch.Size) -> tuple[slice, ...]:
    """The index of a sub-model tensor of `shape` inside the global tensor: its leading entries."""
    return tuple(slice(0, s) for s in shape)


@dataclass(frozen=True)
class LocalResult:
    delta: dict[str, torch.Tensor]   # global (slice) minus local parameters after the local steps
    loss: float                      # mean mini-batch loss of the first step


class LocalTrainer:
    """Runs devices' local steps from the current global model."""

    def __init__(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, lr: float,
                 loss: Loss = CROSS_ENTROPY):
        self.model = model
        self.loss = loss
        self.x = x_train.to(next(model.parameters()).dtype)
        self.y = y_train
        self.lr = lr

    def train(self, step_batches: list[np.ndarray], submodel: nn.Module | None = None,
              device: int = -1, start: dict[str, torch.Tensor] | None = None,
              prox_mu: float = 0.0) -> LocalResult:
        """Local SGD over `step_batches` (one index array per step); returns the parameter change.

        `start`: the parameters to start from (default: the global model's); `prox_mu` > 0 adds FedProx's
        proximal term `prox_mu / 2 * ||w - start||^2` to every step's loss."""
        net = self.model if submodel is None else submodel
        if start is None:
            start = {}
            for name, p in self.model.named_parameters():
                shape = dict(net.named_parameters())[name].shape
                start[name] = p.detach()[leading_slice(shape)]
        params = {n: t.clone().requires_grad_(True) for n, t in start.items()}
        first_loss = float("nan")
        for s, idx in enumerate(step_batches):
            x, y = take_rows(self.x, self.y, idx)
            loss = self.loss.mean(functional_call(net, params, (x,)), y)
            if prox_mu > 0:
                loss = loss + prox_mu / 2 * sum(((p - start[n]) ** 2).sum() for n, p in params.items())
            if not torch.isfinite(loss):
                raise NumericalError(f"non-finite loss ({loss.item()}) on device {device}, local step {s}")
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                params = {n: (p - self.lr * g).requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
            if s == 0:
                first_loss = float(loss.detach())
        with torch.no_grad():
            delta = {n: start[n] - params[n].detach() for n in start}
        return LocalResult(delta, first_loss)
