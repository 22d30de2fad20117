"""The affine step-time model fitted to a phone's time table: `time = overhead + slope * batch`.

A time table (`ondevice_training/DEVICE/time_table_MODEL.csv`) holds the measured time of one training step at
several batch sizes. A least-squares line through every row splits it into a fixed cost per step (framework
overhead, the optimizer update, kernel launches: `overhead_ms`) and a cost per sample (`slope_ms`). The
device's effective speed is then the reference model's training FLOPs of one sample over the slope, and its
`step_overhead_s` is the intercept, so a simulated step costs `step_overhead_s + FLOPs(batch) / speed`
(`fedsim.world.timing.plan_round`). `measured.fit = "affine"` uses it; the default, `"point"`, divides one
row's time by its FLOPs (no overhead), which charges the whole overhead in proportion to the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.errors import DataError
from fedsim.world.measurements import LENET_TRAIN_FLOPS_PER_SAMPLE, load_time_table

__all__ = ["AffineStepFit", "fit_step_time", "affine_calibration"]


@dataclass(frozen=True)
class AffineStepFit:
    overhead_ms: float          # intercept: ms of every step whatever its batch
    slope_ms: float             # ms per sample
    r2: float                   # coefficient of determination of the fit
    batches: tuple[int, ...]    # the batch sizes fitted

    def predict_ms(self, batch: int) -> float:
        return self.overhead_ms + self.slope_ms * batch


def fit_step_time(table: dict[int, float], where: str = "time table") -> AffineStepFit:
    """Ordinary least squares of `expr_train` ms on the batch size, over every row of `table` (float64)."""
    if len(table) < 2:
        raise DataError(f"{where}: an affine fit needs at least two batch sizes, got {sorted(table)}")
    batches = sorted(table)
    x = np.array(batches, dtype=np.float64)
    y = np.array([table[b] for b in batches], dtype=np.float64)
    x_mean, y_mean = x.mean(), y.mean()
    slope = float(((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    overhead = float(y_mean - slope * x_mean)
    residual = y - (overhead + slope * x)
    total = float(((y - y_mean) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    if not (slope > 0 and math.isfinite(slope)):
        raise DataError(f"{where}: the step time does not grow with the batch (fitted slope {slope:g} ms per "
                        "sample); an affine fit cannot give a speed")
    if overhead < 0:
        raise DataError(f"{where}: the affine fit has a negative overhead ({overhead:g} ms per step); use "
                        "fit = \"point\"")
    return AffineStepFit(overhead, slope, r2, tuple(batches))


def affine_calibration(time_table: str | Path) -> tuple[float, float]:
    """(effective FLOP/s, step overhead in seconds) of the phone behind `time_table`, the reference model
    being the benchmark's LeNet (`fedsim.world.lenet.MnnLeNet`) on MNIST, its FLOPs per sample a constant."""
    fit = fit_step_time(load_time_table(time_table), str(time_table))
    return LENET_TRAIN_FLOPS_PER_SAMPLE / (fit.slope_ms / 1000.0), fit.overhead_ms / 1000.0
