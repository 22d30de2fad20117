"""The `measured`, `flash_bandwidth` and `dvfs` fields of a device class (computed by fedsim.world.calibration).

* `measured` compute: a phone's measured training time of one batch of a reference model (the MNN
  benchmark's LeNet, `fedsim.world.lenet.MnnLeNet`) gives its effective FLOP/s; the simulated model's
  durations then follow from its own FLOPs (a compute-bound scaling by the FLOP ratio). Optionally each
  device is a phone model drawn from the AI-Benchmark list, its speed scaled by its CPU score relative
  to the measured reference phone. With `fit = "affine"` every row of the table is used: a least-squares
  line `time = overhead + slope * batch` gives the speed (the reference model's FLOPs of one sample over
  `slope`) and the class's `step_overhead_s` (`overhead`), instead of one row's time over its FLOPs.
* `flash_bandwidth`: each device is mapped to a FLASH user (uniformly) and draws its link rates once
  from a lognormal with that user's measured mean and deviation.
* `dvfs = { kappa, freq_hz, cycles_per_flop }`: energy `kappa * cycles * f^2` over `cycles / f`
  seconds is a compute power of `kappa * f^3`; the speed, unless given, is `f / cycles_per_flop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsim.spec.fields import Fields

__all__ = ["MeasuredSpec", "DvfsSpec", "read_measured", "read_dvfs", "resolve_traces_dir", "FLASH_FILE",
           "AI_BENCHMARK_FILE"]

FLASH_FILE = "flash/speed_distri.json"
AI_BENCHMARK_FILE = "flash/raw_ai_benchmark_list.json"


@dataclass(frozen=True)
class MeasuredSpec:
    time_table: Path             # an `ondevice_training/DEVICE/time_table_MODEL.csv` file
    batch_size: int              # the row of the table used (the reference batch)
    spread: str                  # "none" or "ai_benchmark"
    benchmark_file: Path | None
    reference_phone: str         # the AI-Benchmark entry of the measured phone
    fit: str = "point"           # "point": the `batch_size` row; "affine": overhead + slope * batch, every row


@dataclass(frozen=True)
class DvfsSpec:
    kappa: float                 # effective switched capacitance (J / (cycle * Hz^2))
    freq_hz: float
    cycles_per_flop: float

    @property
    def power_w(self) -> float:
        return self.kappa * self.freq_hz**3

    @property
    def speed_flops(self) -> float:
        return self.freq_hz / self.cycles_per_flop


def resolve_traces_dir(fields: Fields, key: str, base_dir: Path | None) -> Path | None:
    return fields.existing_path(key, base_dir, kind="dir", what="traces directory", default=None)


def _file(fields: Fields, key: str, traces_dir: Path | None, default: str | None = None) -> Path:
    if traces_dir is None:
        raise fields.error(key, "needs fleet.traces_dir (the folder of the measurement files)")
    path = traces_dir / fields.string(key, default) if default is not None else traces_dir / fields.string(key)
    if not path.is_file():
        raise fields.error(key, f"no such file under fleet.traces_dir, got {str(path)!r}")
    return path


def read_measured(fields: Fields, key: str, traces_dir: Path | None) -> MeasuredSpec | None:
    """`measured = { time_table = "ondevice_training/XIAOMI/time_table_Lenet.csv", batch_size = 16,
    spread = "none" | "ai_benchmark", reference_phone = "Xiaomi Mi 9", fit = "point" | "affine" }`."""
    if fields.raw(key, None) is None:
        return None
    sub = fields.sub(key)
    table = _file(sub, "time_table", traces_dir)
    batch = sub.integer("batch_size", 16, low=1)
    spread = sub.choice("spread", ["none", "ai_benchmark"], "none")
    bench = _file(sub, "benchmark_file", traces_dir, AI_BENCHMARK_FILE) if spread == "ai_benchmark" else None
    phone = sub.string("reference_phone", "Xiaomi Mi 9")
    fit = sub.choice("fit", ["point", "affine"], "point")
    sub.finish()
    return MeasuredSpec(table, batch, spread, bench, phone, fit)


def read_dvfs(fields: Fields, key: str) -> DvfsSpec | None:
    if fields.raw(key, None) is None:
        return None
    sub = fields.sub(key)
    spec = DvfsSpec(sub.number("kappa", low=0.0, low_open=True),
                    sub.number("freq_hz", low=0.0, low_open=True),
                    sub.number("cycles_per_flop", 1.0, low=0.0, low_open=True))
    sub.finish()
    return spec
