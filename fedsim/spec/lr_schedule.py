"""`training.lr_schedule`: the learning rate of each synchronous round, a pure function of the round.

Absent, every round uses `training.lr`. Otherwise, for round r = 0, 1, ... of R = `run.rounds`:

    { kind = "inverse", a = 1, b = 1 }          eta_r = lr * a / (r + b)
    { kind = "step", every = N, factor = f }     eta_r = lr * f ^ floor(r / N)
    { kind = "cosine", min_lr = 0 }              eta_r = min_lr + (lr - min_lr) (1 + cos(pi r / R)) / 2

`inverse` is the form SALF's and ADEL-FL's analyses assume, eta_t = 1 / (rho_c (t + gamma)) for t = r + 1:
a = 1 / (rho_c lr) and b = gamma + 1. Every kind is non-increasing in r. The rate applies to the server's
optimizer step and to the devices' local steps of that round; being a function of the round only, a
resumed run uses the rate of the round it resumes at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsim.spec.fields import Fields

__all__ = ["LrSchedule", "read_lr_schedule"]


@dataclass(frozen=True)
class LrSchedule:
    kind: str                   # "inverse", "step" or "cosine"
    a: float = 1.0              # inverse: numerator
    b: float = 1.0              # inverse: offset of the round
    every: int = 1              # step: rounds between two decays
    factor: float = 0.5         # step: the decay
    min_lr: float = 0.0         # cosine: the rate approached at the last round

    def rate(self, lr: float, round_: int, rounds: int) -> float:
        """eta of round `round_` (0-based) of a run of `rounds`, starting from the base rate `lr`."""
        if self.kind == "inverse":
            return lr * self.a / (round_ + self.b)
        if self.kind == "step":
            return lr * self.factor ** (round_ // self.every)
        return self.min_lr + (lr - self.min_lr) * (1.0 + math.cos(math.pi * round_ / rounds)) / 2.0

    def rates(self, lr: float, rounds: int) -> list[float]:
        """eta of every round 0..rounds-1."""
        return [self.rate(lr, r, rounds) for r in range(rounds)]

    def describe(self) -> str:
        if self.kind == "inverse":
            return f"inverse (a {self.a:g}, b {self.b:g})"
        if self.kind == "step":
            return f"step (every {self.every}, factor {self.factor:g})"
        return f"cosine (min_lr {self.min_lr:g})"


def read_lr_schedule(f: Fields, lr: float) -> LrSchedule | None:
    """`training.lr_schedule` (None when absent); `lr` is `training.lr`, which `cosine`'s `min_lr` may not exceed."""
    if f.raw("lr_schedule", None) is None:
        return None
    t = f.sub("lr_schedule")
    kind = t.choice("kind", ["inverse", "step", "cosine"])
    if kind == "inverse":
        schedule = LrSchedule(kind, a=t.number("a", 1.0, low=0.0, low_open=True, high=1e12),
                              b=t.number("b", 1.0, low=0.0, low_open=True, high=1e12))
    elif kind == "step":
        schedule = LrSchedule(kind, every=t.integer("every", low=1, high=10_000_000),
                              factor=t.number("factor", low=0.0, low_open=True, high=1.0))
    else:
        schedule = LrSchedule(kind, min_lr=t.number("min_lr", 0.0, low=0.0, high=lr))
    t.finish()
    return schedule
