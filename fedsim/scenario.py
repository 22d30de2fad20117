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

from fedsim.calibration import DvfsSpec, MeasuredSpec, read_dvfs, read_measured, resolve_traces_dir
from fedsim.churn import ChurnSpec, read_availability_file, read_churn_spec
from fedsim.distributions import Dist, DistKind, read_dist
from fedsim.errors import ScenarioError
from fedsim.fields import Fields
from fedsim.network_spec import AccessKind, TopologySpec, read_network_spec
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
    on_nonfinite: str = "stop"   # NaN/Inf in a loss or gradient: "stop" the run, or "drop" that device's update


@dataclass(frozen=True)
class DeviceClassSpec:
    name: str
    count: int
    speed_flops: Dist | None     # effective FLOP/s of the device, drawn once per device (None: measured)
    slowdown: Dist               # per-round multiplier (>= 1 typical) on compute durations
    downlink_bps: Dist | None    # drawn once per device (None: from FLASH, or a wireless/ideal access)
    uplink_bps: Dist | None
    latency_s: float             # one-way latency of every transfer
    power_compute_w: float       # with `dvfs`, kappa * f^3
    power_tx_w: float
    power_rx_w: float
    power_idle_w: float
    measured: MeasuredSpec | None = None     # compute calibrated from a phone's measured training time
    flash_bandwidth: bool = False            # link rates from the FLASH per-user measurements
    availability: ChurnSpec | None = None    # alternating online/offline periods
    dvfs: DvfsSpec | None = None


@dataclass(frozen=True)
class FleetSpec:
    classes: tuple[DeviceClassSpec, ...]
    participants: int | None         # None: every online device takes part in every round
    traces_dir: Path | None = None   # folder of measurement files (time tables, FLASH, AI-Benchmark)
    availability_file: Path | None = None   # online intervals per device (CSV or Parquet)

    @property
    def n_devices(self) -> int:
        return sum(c.count for c in self.classes)


@dataclass(frozen=True)
class NetworkSpec:
    upload_mode: UploadMode
    topology: TopologySpec


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
    fleet = _read_fleet(root.sub("fleet"), base_dir)
    network = _read_network(root.sub("network", default_empty=True), fleet)
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
        directory = f.existing_path("dir", base_dir, kind="dir", what="dataset directory")
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
        on_nonfinite=f.choice("on_nonfinite", ["stop", "drop"], "stop"),
    )
    f.finish()
    return spec


def _read_device_class(f: Fields, index: int, traces_dir: Path | None) -> DeviceClassSpec:
    measured = read_measured(f, "measured", traces_dir)
    dvfs = read_dvfs(f, "dvfs")
    flash = f.boolean("flash_bandwidth", False)
    if flash and traces_dir is None:
        raise f.error("flash_bandwidth", "needs fleet.traces_dir (the folder of the measurement files)")
    speed_given = f.has("speed_flops")
    if measured is not None and speed_given:
        raise f.error("speed_flops", "give either speed_flops or measured, not both")
    if measured is None and dvfs is None and not speed_given:
        raise f.error("speed_flops", "missing required field (or give measured = {...} or dvfs = {...})")
    if dvfs is not None and f.has("power_compute_w"):
        raise f.error("power_compute_w", "is kappa * freq_hz^3 with dvfs; give one of them")
    for key in ("downlink_bps", "uplink_bps"):
        if flash and f.has(key):
            raise f.error(key, "comes from the FLASH measurements with flash_bandwidth = true; remove it")
    speed = read_dist(f, "speed_flops") if speed_given else (
        Dist(DistKind.FIXED, dvfs.speed_flops) if measured is None else None)
    spec = DeviceClassSpec(
        name=f.string("name", f"class{index}"),
        count=f.integer("count", low=1, high=MAX_DEVICES),
        speed_flops=speed,
        slowdown=read_dist(f, "slowdown", 1.0),
        downlink_bps=read_dist(f, "downlink_bps") if f.has("downlink_bps") else None,
        uplink_bps=read_dist(f, "uplink_bps") if f.has("uplink_bps") else None,
        latency_s=f.number("latency_s", 0.0, low=0.0),
        power_compute_w=dvfs.power_w if dvfs is not None else f.number("power_compute_w", 0.0, low=0.0),
        power_tx_w=f.number("power_tx_w", 0.0, low=0.0),
        power_rx_w=f.number("power_rx_w", 0.0, low=0.0),
        power_idle_w=f.number("power_idle_w", 0.0, low=0.0),
        measured=measured,
        flash_bandwidth=flash,
        availability=read_churn_spec(f, "availability"),
        dvfs=dvfs,
    )
    f.finish()
    return spec


def _read_fleet(f: Fields, base_dir: Path | None) -> FleetSpec:
    traces_dir = resolve_traces_dir(f, "traces_dir", base_dir)
    classes = tuple(_read_device_class(c, i, traces_dir) for i, c in enumerate(f.sub_list("classes")))
    names = [c.name for c in classes]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ScenarioError(f.source, f"fleet.classes[{i}].name", f"duplicate class name {name!r}")
    total = sum(c.count for c in classes)
    if total > MAX_DEVICES:
        raise f.error("classes", f"the fleet has {total} devices; at most {MAX_DEVICES} are supported")
    participants_raw = f.raw("participants", "all")
    participants = None if participants_raw == "all" else f.integer("participants", low=1)
    availability_file = read_availability_file(f, "availability_file", base_dir)
    if availability_file is not None and any(c.availability is not None for c in classes):
        raise f.error("availability_file", "give either per-class availability or an availability file, not both")
    f.finish()
    return FleetSpec(classes, participants, traces_dir, availability_file)


def _read_network(f: Fields, fleet: FleetSpec) -> NetworkSpec:
    mode = UploadMode(f.choice("upload_mode", [m.value for m in UploadMode], "ideal"))
    topology = read_network_spec(f, [c.name for c in fleet.classes], ignore=("upload_mode",))
    for i, (cls, net) in enumerate(zip(fleet.classes, topology.classes)):
        if net.access is AccessKind.FLEET and not cls.flash_bandwidth:
            for key in ("downlink_bps", "uplink_bps"):
                if getattr(cls, key) is None:
                    raise ScenarioError(f.source, f"fleet.classes[{i}].{key}",
                                        "missing required field (or flash_bandwidth = true, or a wireless access "
                                        "in network.classes)")
    return NetworkSpec(mode, topology)
