"""Device classes calibrated from real measurements, and the DVFS energy form: the calculations behind
the `measured`, `flash_bandwidth` and `dvfs` fields (their meaning is described in fedsim.spec.calibration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.errors import DataError, FedsimError, ScenarioError, ScenarioFileError
from fedsim.spec.calibration import FLASH_FILE, MeasuredSpec
from fedsim.spec.fields import printable
from fedsim.world.measurements import (flash_bandwidth_bps, load_ai_benchmark, load_flash_bandwidth,
                                       measured_speed_flops, sample_phone_speeds_flops)
from fedsim.world.step_fit import affine_calibration

__all__ = ["measured_speeds_flops", "measured_step_overhead_s", "flash_rates_bps"]


def measured_step_overhead_s(spec: MeasuredSpec, source: str, field: str) -> float:
    """The step overhead `spec` calibrates: the affine fit's intercept, or 0 with `fit = "point"`."""
    if spec.fit != "affine":
        return 0.0
    try:
        return affine_calibration(spec.time_table)[1]
    except DataError as exc:
        raise ScenarioFileError(source, f"{field}.time_table", printable(str(exc))) from None


def measured_speeds_flops(spec: MeasuredSpec, n: int, rng: np.random.Generator, source: str, field: str) -> np.ndarray:
    """Effective FLOP/s of `n` devices calibrated from `spec` (see the module docstring)."""
    try:
        if spec.fit == "affine":
            ref_speed = affine_calibration(spec.time_table)[0]
        else:
            ref_speed = measured_speed_flops(spec.time_table, spec.batch_size)
    except DataError as exc:
        key = "batch_size" if "no row for batchsize" in str(exc) else "time_table"
        raise ScenarioFileError(source, f"{field}.{key}", printable(str(exc))) from None
    if spec.spread == "none":
        return np.full(n, ref_speed)
    try:
        bench = load_ai_benchmark(spec.benchmark_file)
    except DataError as exc:
        raise ScenarioFileError(source, f"{field}.benchmark_file", printable(str(exc))) from None
    try:
        phone = bench.find(spec.reference_phone)
    except FedsimError:
        raise ScenarioError(source, f"{field}.reference_phone",
                            f"no phone of that name in {spec.benchmark_file}, got {spec.reference_phone!r}") from None
    return sample_phone_speeds_flops(bench, ref_speed, phone.cpu_f_ai_score, n, rng)


def flash_rates_bps(traces_dir: Path, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(downlink, uplink) bit/s of `n` devices, each mapped to a FLASH user drawn uniformly."""
    flash = load_flash_bandwidth(traces_dir / FLASH_FILE)
    users = rng.integers(0, len(flash.user_ids), n)
    return flash_bandwidth_bps(flash, users, rng)
