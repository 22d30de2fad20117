"""Real device measurements (`shared/traces`): loaders, and calibration of the compute and network models.

Compute model `measured`: a device's effective speed is fixed so that the simulator's time for one training
batch of a *reference* model equals the time measured on a real phone, `speed = FLOPs(batch) / time`.
A simulated model then costs `its FLOPs / speed`: the measured time scaled by the ratio of training FLOPs.
FLOPs are those `fedsim.learn.profile` counts (matmuls and convolutions, forward + backward), so everything the
counter does not see (pooling, activations, the loss, the SGD update, framework overhead) is folded into
the effective speed, as for any simulated model.

The reference is the LeNet of the benchmark that produced the time tables (Benchmark-On-Device-Training,
`tools/train/source/models/Lenet.cpp`): conv 1->20 5x5, max-pool 2, conv 20->50 5x5, max-pool 2, linear
800->400, ReLU, dropout, linear 400->10, softmax, on 1x28x28 MNIST images. Its constructor registers
`conv1, ip1, ip2, dropout` but not `conv2`, so MNN trains no conv2 weights: the measured step computes
conv2's input gradient but not its weight gradient, and `fedsim.world.lenet.MnnLeNet` freezes conv2
likewise by default. That model has 349,980 parameters (the traces README's "about 3.2K" matches no variant of that source) and
9.496 MFLOP per sample (4.424 forward, 5.072 backward).

Spread across phone models: AI-Benchmark CPU_F scores relative to the reference phone (the time tables'
`XIAOMI` is a Snapdragon 855 / SM8150 phone per its benchmark log: "Xiaomi Mi 9" in the score list).
Network: FLASH per-user bandwidth (mean, sd in kbit/s) -> per-round draws in bit/s.
"""

from __future__ import annotations

import csv
import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from fedsim.spec.distributions import Dist, DistKind
from fedsim.errors import DataError, FedsimError

if TYPE_CHECKING:       # the reference model (torch) is imported only when a speed is calibrated
    from torch import nn

__all__ = [
    "load_time_table", "find_time_tables", "PhoneScore", "AiBenchmark", "load_ai_benchmark", "FlashBandwidth",
    "load_flash_bandwidth", "MNIST_SHAPE", "LENET_TRAIN_FLOPS_PER_SAMPLE", "effective_speed_flops",
    "measured_speed_flops", "REFERENCE_PHONES", "phone_speeds_flops", "sample_phone_speeds_flops",
    "BandwidthShape", "lognormal_from_moments", "sample_bandwidth_bps", "flash_bandwidth_bps",
]

MNIST_SHAPE = (1, 28, 28)
KBIT = 1000.0   # FLASH reports kbit/s

# Time-table device directory -> its phone model in the AI-Benchmark list (from the benchmark's cpuinfo log).
REFERENCE_PHONES = {"XIAOMI": "Xiaomi Mi 9"}


# -- time tables -----------------------------------------------------------------------------------------------

def load_time_table(path: str | Path) -> dict[int, float]:
    """`{batch size: expr_train ms}` (one training step: forward + backward + update on one batch)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the time table: {exc}") from None
    except csv.Error as exc:      # a NUL character, a field too large
        raise DataError(f"{path}: malformed CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path}: empty file, expected a header with batchsize and expr_train")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("batchsize", "expr_train") if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} in the header {header}")
    ib, it = header.index("batchsize"), header.index("expr_train")
    table: dict[int, float] = {}
    for i, row in enumerate(rows[1:]):
        where = f"{path}: row {i + 1} (line {i + 2})"
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
        try:
            batch = int(row[ib])
        except ValueError:
            raise DataError(f"{where}: batchsize: not an integer, got {row[ib]!r}") from None
        try:
            ms = float(row[it])
        except ValueError:
            raise DataError(f"{where}: expr_train: not a number, got {row[it]!r}") from None
        if batch < 1:
            raise DataError(f"{where}: batchsize: must be positive, got {batch}")
        if not (math.isfinite(ms) and ms > 0):
            raise DataError(f"{where}: expr_train: must be a positive number of ms, got {row[it]!r}")
        if batch in table:
            raise DataError(f"{where}: batchsize: {batch} appears twice")
        table[batch] = ms
    if not table:
        raise DataError(f"{path}: no rows")
    return table


def find_time_tables(root: str | Path) -> dict[str, dict[str, Path]]:
    """`{device: {model: path}}` for `root/DEVICE/time_table_MODEL.csv`."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(root).glob("*/time_table_*.csv")):
        found.setdefault(path.parent.name, {})[path.stem.removeprefix("time_table_")] = path
    return found


# -- AI-Benchmark scores ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhoneScore:
    model: str
    cpu: str
    year: int | None
    cpu_f_ai_score: float


@dataclass(frozen=True)
class AiBenchmark:
    phones: tuple[PhoneScore, ...]
    skipped_rows: tuple[int, ...]   # 0-based indices of rows without a usable CPU_F_AI_Score

    def scores(self) -> np.ndarray:
        return np.array([p.cpu_f_ai_score for p in self.phones])

    def find(self, model: str) -> PhoneScore:
        for phone in self.phones:
            if phone.model == model:
                return phone
        raise FedsimError(f"no phone named {model!r} in the AI-Benchmark list")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, ValueError) as exc:      # UnicodeDecodeError is a ValueError
        raise DataError(f"{path}: cannot read the {what}: {exc}") from None
    except RecursionError:
        raise DataError(f"{path}: cannot read the {what}: JSON nested too deeply") from None


def _positive_float(value) -> float | None:
    try:
        x = float(str(value).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) and x > 0 else None


def load_ai_benchmark(path: str | Path) -> AiBenchmark:
    """Phones with a numeric CPU_F_AI_Score; rows whose score does not parse are skipped and counted."""
    path = Path(path)
    rows = _read_json(path, "AI-Benchmark list")
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of phone objects, got {type(rows).__name__}")
    phones, skipped = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        model = row.get("Model")
        if not isinstance(model, str) or not model.strip():
            raise DataError(f"{path}: row {i}: Model: missing or not a non-empty string, got {model!r}")
        score = _positive_float(row.get("CPU_F_AI_Score"))
        if score is None:
            skipped.append(i)
            continue
        year = str(row.get("Year", "")).strip()
        phones.append(PhoneScore(model.strip(), str(row.get("CPU", "")).strip(),
                                 int(year) if year.isascii() and year.isdigit() else None, score))
    if not phones:
        raise DataError(f"{path}: no row has a usable CPU_F_AI_Score")
    return AiBenchmark(tuple(phones), tuple(skipped))


# -- FLASH bandwidth ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlashBandwidth:
    user_ids: tuple[str, ...]
    down_mean_kbps: np.ndarray
    down_sigma_kbps: np.ndarray
    up_mean_kbps: np.ndarray
    up_sigma_kbps: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


_FLASH_FIELDS = ("down_u", "down_sigma", "up_u", "up_sigma")


def load_flash_bandwidth(path: str | Path) -> FlashBandwidth:
    """FLASH `speed_distri.json`: user id -> {down_u, down_sigma, up_u, up_sigma} in kbit/s."""
    path = Path(path)
    users = _read_json(path, "FLASH bandwidth file")
    if not isinstance(users, dict) or not users:
        raise DataError(f"{path}: expected a non-empty JSON object of users, got {type(users).__name__}")
    values = np.empty((len(users), 4))
    for i, (user, entry) in enumerate(users.items()):
        where = f"{path}: row {i} (user {user!r})"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        for j, key in enumerate(_FLASH_FIELDS):
            x = entry.get(key)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise DataError(f"{where}: {key}: missing or not a finite number, got {x!r}")
            if x < 0 or (x == 0 and key.endswith("_u")):
                raise DataError(f"{where}: {key}: must be {'positive' if key.endswith('_u') else '>= 0'}, got {x!r}")
            values[i, j] = x
    return FlashBandwidth(tuple(users), *(values[:, j].copy() for j in range(4)))


# -- compute calibration ---------------------------------------------------------------------------------------------

def effective_speed_flops(ref_train_ms: float, ref_flops_per_batch: float) -> float:
    """The FLOP/s at which one batch of the reference model takes exactly the measured time."""
    if not (ref_train_ms > 0 and math.isfinite(ref_train_ms)):
        raise FedsimError(f"ref_train_ms must be a positive time, got {ref_train_ms!r}")
    if not (ref_flops_per_batch > 0 and math.isfinite(ref_flops_per_batch)):
        raise FedsimError(f"ref_flops_per_batch must be positive, got {ref_flops_per_batch!r}")
    return ref_flops_per_batch / (ref_train_ms / 1000.0)


# `train_flops_per_sample(MnnLeNet(), MNIST_SHAPE)` (fedsim.world.lenet; tests/test_measurements.py counts it
# again): kept as a number so that calibrating a fleet imports no torch.
LENET_TRAIN_FLOPS_PER_SAMPLE = 9_496_000.0


def measured_speed_flops(time_table: str | Path, batch_size: int = 16, model: nn.Module | None = None,
                         input_shape: tuple[int, ...] = MNIST_SHAPE) -> float:
    """Effective speed of the phone behind `time_table` (default reference: `MnnLeNet` on MNIST)."""
    table = load_time_table(time_table)
    if batch_size not in table:
        raise DataError(f"{time_table}: no row for batchsize {batch_size} (rows: {sorted(table)})")
    if model is None and tuple(input_shape) == MNIST_SHAPE:
        per_sample = LENET_TRAIN_FLOPS_PER_SAMPLE
    else:
        from fedsim.world.lenet import MnnLeNet, train_flops_per_sample

        per_sample = train_flops_per_sample(MnnLeNet() if model is None else model, input_shape)
    return effective_speed_flops(table[batch_size], per_sample * batch_size)


def phone_speeds_flops(ref_speed_flops: float, ref_score: float, scores: np.ndarray) -> np.ndarray:
    """Speeds of other phones, in proportion to their CPU_F AI score (the compute-bound assumption)."""
    return ref_speed_flops * np.asarray(scores, dtype=np.float64) / ref_score


def sample_phone_speeds_flops(benchmark: AiBenchmark, ref_speed_flops: float, ref_score: float, n: int,
                              rng: np.random.Generator) -> np.ndarray:
    """`n` devices, each a phone model drawn uniformly from the benchmark list."""
    scores = benchmark.scores()
    return phone_speeds_flops(ref_speed_flops, ref_score, scores[rng.integers(0, len(scores), n)])


# -- network calibration ---------------------------------------------------------------------------------------------

class BandwidthShape(enum.Enum):
    LOGNORMAL = "lognormal"                  # matches the user's mean and sd; always positive
    TRUNCATED_NORMAL = "truncated_normal"    # normal(mean, sd) redrawn until > 0 (mean shifts up a little)


def lognormal_from_moments(mean: float, sd: float) -> Dist:
    """The lognormal `Dist` (median, sigma) with the given mean and standard deviation."""
    sigma2 = math.log1p((sd / mean) ** 2)
    return Dist(DistKind.LOGNORMAL, mean / math.sqrt(1.0 + (sd / mean) ** 2), math.sqrt(sigma2))


def sample_bandwidth_bps(mean_kbps: np.ndarray, sigma_kbps: np.ndarray, rng: np.random.Generator,
                         shape: BandwidthShape = BandwidthShape.LOGNORMAL) -> np.ndarray:
    """One draw per element (a device in a round) from its user's distribution, in bit/s."""
    mean = np.asarray(mean_kbps, dtype=np.float64)
    sd = np.asarray(sigma_kbps, dtype=np.float64)
    if shape is BandwidthShape.LOGNORMAL:
        sigma2 = np.log1p((sd / mean) ** 2)
        return KBIT * mean * np.exp(np.sqrt(sigma2) * rng.standard_normal(mean.shape) - 0.5 * sigma2)
    out = rng.normal(mean, sd)
    bad = out <= 0
    while bad.any():   # acceptance >= 1/2 per draw since every mean is > 0
        out[bad] = rng.normal(mean[bad], sd[bad])
        bad = out <= 0
    return KBIT * out


def flash_bandwidth_bps(flash: FlashBandwidth, users: np.ndarray, rng: np.random.Generator,
                        shape: BandwidthShape = BandwidthShape.LOGNORMAL) -> tuple[np.ndarray, np.ndarray]:
    """(downlink, uplink) bit/s for devices mapped to FLASH users (`users`: index into `flash.user_ids`)."""
    users = np.asarray(users, dtype=np.int64)
    down = sample_bandwidth_bps(flash.down_mean_kbps[users], flash.down_sigma_kbps[users], rng, shape)
    up = sample_bandwidth_bps(flash.up_mean_kbps[users], flash.up_sigma_kbps[users], rng, shape)
    return down, up
