"""The scenario: frozen dataclasses, loaded from TOML and validated once.

`load_scenario(path, overrides)` is the only entry point. Every problem raises `ScenarioError` naming the
file, the dotted field path and the bad value. The `[policy]` table is read by the policy's own module
(see `fedsim.strategies`), so a new policy adds its fields without touching this file.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.distributions import Dist, read_dist
from fedsim.errors import ScenarioError
from fedsim.fields import Fields
from fedsim.overrides import apply_overrides

__all__ = [
    "Scenario", "RunSpec", "ModelSpec", "DataSpec", "TrainingSpec", "DeviceClassSpec", "FleetSpec",
    "NetworkSpec", "UploadMode", "load_scenario", "parse_scenario", "MAX_DEVICES",
]

MAX_DEVICES = 10_000_000   # beyond this the per-device index arrays alone would not fit in memory
MAX_ROUNDS = 100_000_000


class UploadMode(enum.Enum):
    IDEAL = "ideal"                  # the paper: whatever is computed by the deadline counts
    AFTER_COMPUTE = "after_compute"  # stop backward early enough to upload before the deadline
    STREAMING = "streaming"          # each finished layer is queued on the uplink at once


@dataclass(frozen=True)
class RunSpec:
    name: str
    seed: int
    rounds: int
    eval_every: int


@dataclass(frozen=True)
class ModelSpec:
    name: str               # "mlp", "cnn" or "package.module:function"
    granularity: str        # "module" or "tensor"
    dtype: str              # "float32" or "float64"


@dataclass(frozen=True)
class DataSpec:
    name: str                        # "mnist" or "synthetic"
    dir: Path | None                 # mnist: directory of the IDX files
    partition: str                   # "iid" or "dirichlet"
    dirichlet_alpha: float
    samples_per_device: int
    synthetic_alpha: float
    synthetic_beta: float
    test_samples_per_device: int


@dataclass(frozen=True)
class TrainingSpec:
    batch_size: int
    lr: float
    momentum: float
    local_steps: int
    grad_path: str           # "auto", "grouped", "vmap" or "loop" (see fedsim/grads.py)


@dataclass(frozen=True)
class DeviceClassSpec:
    name: str
    count: int
    speed_flops: Dist        # effective FLOP/s of the device, drawn once per device
    slowdown: Dist           # per-round multiplier (>= 1 typical) on compute durations
    downlink_bps: Dist       # drawn once per device
    uplink_bps: Dist
    latency_s: float         # one-way latency of every transfer
    power_compute_w: float
    power_tx_w: float
    power_rx_w: float
    power_idle_w: float


@dataclass(frozen=True)
class FleetSpec:
    classes: tuple[DeviceClassSpec, ...]
    participants: int | None         # None: every device takes part in every round

    @property
    def n_devices(self) -> int:
        return sum(c.count for c in self.classes)


@dataclass(frozen=True)
class NetworkSpec:
    upload_mode: UploadMode


@dataclass(frozen=True)
class Scenario:
    source: str              # file name, for messages
    text: str                # the TOML text as written, stored in trace metadata
    overrides: tuple[str, ...]   # the --set overrides applied on top of `text`
    run: RunSpec
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    fleet: FleetSpec
    network: NetworkSpec
    policy: Any              # a frozen policy config from fedsim.strategies


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(source, "", "no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(source, "", f"cannot read the file: {exc}") from None
    return parse_scenario(text, source, overrides, base_dir=path.parent)


def parse_scenario(text: str, source: str = "<scenario>", overrides=(), base_dir: Path | None = None) -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"malformed TOML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw, overrides, source)
    root = Fields(raw, source, "")
    run = _read_run(root.sub("run"))
    model = _read_model(root.sub("model"))
    data = _read_data(root.sub("data"), base_dir)
    training = _read_training(root.sub("training"))
    fleet = _read_fleet(root.sub("fleet"))
    network = _read_network(root.sub("network", default_empty=True))
    from fedsim.strategies import read_policy   # late import: strategies import scenario types

    policy = read_policy(root.sub("policy"), training)
    root.finish()
    _check_memory(source, data, fleet)
    if fleet.participants is not None and fleet.participants > fleet.n_devices:
        raise ScenarioError(source, "fleet.participants",
                            f"must be at most the number of devices ({fleet.n_devices}), got {fleet.participants}")
    scn = Scenario(source, text, tuple(overrides), run, model, data, training, fleet, network, policy)
    policy.check(scn)
    return scn


MAX_DATA_BYTES = 8 * 2**30


def _check_memory(source: str, data: DataSpec, fleet: FleetSpec) -> None:
    """Refuse sizes that could only end in an out-of-memory crash, before anything is allocated."""
    n = fleet.n_devices
    if data.name == "synthetic":
        need = n * (data.samples_per_device + data.test_samples_per_device) * (60 + 1) * 4
    else:
        need = n * data.samples_per_device * 8          # the partition's int64 sample indices
    if need > MAX_DATA_BYTES:
        raise ScenarioError(source, "data.samples_per_device",
                            f"{n} devices x {data.samples_per_device} samples would need {need / 2**30:.0f} GiB "
                            f"(limit {MAX_DATA_BYTES // 2**30} GiB)")


def _read_run(f: Fields) -> RunSpec:
    spec = RunSpec(
        name=f.string("name"),
        seed=f.integer("seed", low=0, high=2**63 - 1),
        rounds=f.integer("rounds", low=1, high=MAX_ROUNDS),
        eval_every=f.integer("eval_every", 1, low=1),
    )
    if any(ch in spec.name for ch in "/\\") or spec.name.startswith("."):
        raise f.error("name", f"must be a plain name usable as a directory, got {spec.name!r}")
    f.finish()
    return spec


def _read_model(f: Fields) -> ModelSpec:
    spec = ModelSpec(
        name=f.string("name"),
        granularity=f.choice("granularity", ["module", "tensor"], "module"),
        dtype=f.choice("dtype", ["float32", "float64"], "float32"),
    )
    if spec.name not in ("mlp", "cnn") and ":" not in spec.name:
        raise f.error("name", f"must be mlp, cnn or a factory 'package.module:function'; got {spec.name!r}")
    f.finish()
    return spec


def _read_data(f: Fields, base_dir: Path | None) -> DataSpec:
    name = f.choice("name", ["mnist", "synthetic"])
    directory = None
    if name == "mnist":
        directory = Path(f.string("dir"))
        if not directory.is_absolute() and not directory.exists() and base_dir is not None:
            # relative to the scenario file as a fallback, so shipped scenarios run from any cwd
            candidate = base_dir / directory
            directory = candidate if candidate.exists() else directory
        if not directory.is_dir():
            raise f.error("dir", f"dataset directory does not exist, got {str(directory)!r}")
    elif f.has("dir"):
        f.raw("dir")
    spec = DataSpec(
        name=name,
        dir=directory,
        partition=f.choice("partition", ["iid", "dirichlet"], "iid"),
        dirichlet_alpha=f.number("dirichlet_alpha", 0.5, low=0.0, low_open=True),
        samples_per_device=f.integer("samples_per_device", low=1, high=10_000_000),
        synthetic_alpha=f.number("synthetic_alpha", 1.0, low=0.0),
        synthetic_beta=f.number("synthetic_beta", 1.0, low=0.0),
        test_samples_per_device=f.integer("test_samples_per_device", 20, low=1, high=1_000_000),
    )
    f.finish()
    return spec


def _read_training(f: Fields) -> TrainingSpec:
    spec = TrainingSpec(
        batch_size=f.integer("batch_size", low=1, high=65_536),
        lr=f.number("lr", low=0.0, low_open=True),
        momentum=f.number("momentum", 0.0, low=0.0, high=1.0),
        local_steps=f.integer("local_steps", 1, low=1, high=10_000),
        grad_path=f.choice("grad_path", ["auto", "grouped", "vmap", "loop"], "auto"),
    )
    f.finish()
    return spec


def _read_device_class(f: Fields, index: int) -> DeviceClassSpec:
    spec = DeviceClassSpec(
        name=f.string("name", f"class{index}"),
        count=f.integer("count", low=1, high=MAX_DEVICES),
        speed_flops=read_dist(f, "speed_flops"),
        slowdown=read_dist(f, "slowdown", 1.0),
        downlink_bps=read_dist(f, "downlink_bps"),
        uplink_bps=read_dist(f, "uplink_bps"),
        latency_s=f.number("latency_s", 0.0, low=0.0),
        power_compute_w=f.number("power_compute_w", 0.0, low=0.0),
        power_tx_w=f.number("power_tx_w", 0.0, low=0.0),
        power_rx_w=f.number("power_rx_w", 0.0, low=0.0),
        power_idle_w=f.number("power_idle_w", 0.0, low=0.0),
    )
    f.finish()
    return spec


def _read_fleet(f: Fields) -> FleetSpec:
    classes = tuple(_read_device_class(c, i) for i, c in enumerate(f.sub_list("classes")))
    names = [c.name for c in classes]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ScenarioError(f.source, f"fleet.classes[{i}].name", f"duplicate class name {name!r}")
    total = sum(c.count for c in classes)
    if total > MAX_DEVICES:
        raise f.error("classes", f"the fleet has {total} devices; at most {MAX_DEVICES} are supported")
    participants_raw = f.raw("participants", "all")
    participants = None if participants_raw == "all" else f.integer("participants", low=1)
    f.finish()
    return FleetSpec(classes, participants)


def _read_network(f: Fields) -> NetworkSpec:
    spec = NetworkSpec(upload_mode=UploadMode(f.choice("upload_mode", [m.value for m in UploadMode], "ideal")))
    f.finish()
    return spec
