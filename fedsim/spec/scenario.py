"""The scenario: frozen dataclasses, loaded from TOML and validated once.

`load_scenario(path, overrides)` is the only entry point. Every problem raises `ScenarioError` naming the
file, the dotted field path and the bad value. The `[policy]` table is read by the policy's own module
(see `fedsim.policies`), so a new policy adds its fields without touching this file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsim.spec.calibration import DvfsSpec, MeasuredSpec, read_dvfs, read_measured, resolve_traces_dir
from fedsim.spec.availability import ChurnSpec, check_availability_file, read_availability_file, read_churn_spec
from fedsim.spec.data import DataSpec, check_data_memory, read_data
from fedsim.spec.depth_model import DepthModelSpec, read_depth_model
from fedsim.spec.distributions import Dist, DistKind, read_dist
from fedsim.errors import ScenarioError
from fedsim.spec.fields import Fields, printable
from fedsim.spec.lr_schedule import LrSchedule, read_lr_schedule
from fedsim.spec.network import AccessKind, TopologySpec, read_network_spec
from fedsim.spec.overrides import apply_overrides
from fedsim.spec.plugins import check_plugin_name
from fedsim.spec.policy import PolicyConfig, read_policy
from fedsim.spec.toml_text import MAX_DEPTH, MAX_SCENARIO_BYTES, parse_toml, too_deep

__all__ = [
    "TIME_RTOL", "Scenario", "RunSpec", "ModelSpec", "DataSpec", "TrainingSpec", "DeviceClassSpec", "FleetSpec",
    "NetworkSpec", "UploadMode", "load_scenario", "parse_scenario", "MAX_DEVICES", "MAX_CLASSES", "MODEL_GROUP",
    "MODEL_PATHS", "LOSS_PATHS",
]

MAX_DEVICES = 10_000_000   # beyond this the per-device index arrays alone would not fit in memory
MAX_ROUNDS = 100_000_000
MAX_CLASSES = 10_000       # the server loops over classes for every round's draws
MAX_RUN_NAME_BYTES = 200   # a directory name: most filesystems allow 255 bytes

# model.name: the built-in models (fedsim.learn.models), or a factory registered in MODEL_GROUP or named by path
MODEL_GROUP = "fedsim.models"
MODEL_PATHS: dict[str, str] = {"mlp": "fedsim.learn.models:MLP", "cnn": "fedsim.learn.models:CNN"}
# training.loss: the built-in loss (fedsim.learn.loss), or a function named by path
LOSS_PATHS: dict[str, str] = {"cross_entropy": "fedsim.learn.loss:cross_entropy_rows"}


class UploadMode(enum.Enum):
    IDEAL = "ideal"                  # the paper: whatever is computed by the deadline counts
    AFTER_COMPUTE = "after_compute"  # stop backward early enough to upload before the deadline
    STREAMING = "streaming"          # each finished layer is queued on the uplink at once


# sums of simulated durations within this relative distance of a time limit are within it: three deadlines of
# 0.1 s add up to 0.30000000000000004 s, and a budget of 0.3 s holds them (run.time_budget_s, ADEL-FL's total_s)
TIME_RTOL = 1e-9


@dataclass(frozen=True)
class RunSpec:
    name: str
    seed: int
    rounds: int
    eval_every: int
    time_budget_s: float | None = None   # simulated seconds: no round may end after it


@dataclass(frozen=True)
class ModelSpec:
    name: str               # "mlp", "cnn" or "package.module:function"
    granularity: str        # "module" or "tensor"
    dtype: str              # "float32" or "float64"


@dataclass(frozen=True)
class TrainingSpec:
    batch_size: int
    lr: float
    momentum: float
    local_steps: int
    grad_path: str           # "auto", "grouped", "vmap" or "loop" (see fedsim/learn/grads.py)
    on_nonfinite: str = "stop"   # NaN/Inf in a loss or gradient: "stop" the run, or "drop" that device's update
    divergence_factor: float = 10.0   # the run fails when the training loss stays this many times its start
    loss: str = "cross_entropy"       # or "package.module:function" (fedsim.learn.loss)
    lr_schedule: LrSchedule | None = None   # the rate of each round (fedsim.spec.lr_schedule); None: lr always

    def lr_at(self, round_: int, rounds: int) -> float:
        """The learning rate of synchronous round `round_` of `rounds`."""
        return self.lr if self.lr_schedule is None else self.lr_schedule.rate(self.lr, round_, rounds)


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
    layer_time: Dist = Dist(DistKind.FIXED, 1.0)   # multiplier on each layer's backward, per device, round, layer
    step_overhead_s: float = 0.0             # fixed seconds of every local step, besides its FLOPs (0: none)

    @property
    def layer_time_varies(self) -> bool:
        """False for the default multiplier 1 (fixed): then nothing is drawn."""
        return not (self.layer_time.kind is DistKind.FIXED and self.layer_time.a == 1.0)


@dataclass(frozen=True)
class FleetSpec:
    classes: tuple[DeviceClassSpec, ...]
    participants: int | None         # None: every online device takes part in every round
    traces_dir: Path | None = None   # folder of measurement files (time tables, FLASH, AI-Benchmark)
    availability_file: Path | None = None   # online intervals per device (CSV or Parquet)
    depth_model: DepthModelSpec | None = None   # the SALF authors' stragglers (drawn depths); None: timing only

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
    policy: PolicyConfig     # a frozen policy from fedsim.policies (or a plugin)
    ignored: tuple[str, ...] = ()    # [policy] fields given but not read by this scenario's policy

    @property
    def notices(self) -> tuple[str, ...]:
        """One line per section whose given fields have no effect here (the data set's, the policy's)."""
        out = []
        for who, fields in ((self.data.name, self.data.ignored), (self.policy.name, self.ignored)):
            if fields:
                out.append(f"{who} ignores {', '.join(fields)}")
        return tuple(out)

    @property
    def all_ignored(self) -> tuple[str, ...]:
        """Every field given that has no effect on the run (a sweep runs points differing only in these once)."""
        return self.data.ignored + self.ignored


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    path = Path(path)
    source = printable(str(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SCENARIO_BYTES + 1)
    except FileNotFoundError:
        raise ScenarioError(source, "", "no such scenario file") from None
    except IsADirectoryError:
        raise ScenarioError(source, "", "is a directory, expected a scenario TOML file") from None
    except OSError as exc:
        raise ScenarioError(source, "", f"cannot read the file: {exc.strerror or exc}") from None
    except ValueError as exc:          # e.g. a NUL character in the path
        raise ScenarioError(source, "", f"cannot read the file: {exc}") from None
    if len(data) > MAX_SCENARIO_BYTES:
        raise ScenarioError(source, "", f"larger than {MAX_SCENARIO_BYTES // 2**20} MiB; a scenario is a small "
                                        "TOML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ScenarioError(source, "", f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
                                        f"column {column}") from None
    return parse_scenario(text, source, overrides, base_dir=path.parent)


def parse_scenario(text: str, source: str = "<scenario>", overrides=(), base_dir: Path | None = None) -> Scenario:
    source = printable(source)
    raw = parse_toml(text, source)
    try:
        if overrides:
            try:
                raw = apply_overrides(raw, overrides, source)
            except RecursionError:
                raise ScenarioError(source, "--set", f"a value nested deeper than {MAX_DEPTH} levels") from None
            except ValueError as exc:    # an integer of more than 4300 digits
                raise ScenarioError(source, "--set", f"a number too long to read "
                                                     f"({printable(str(exc).split(';')[0])})") from None
            where = too_deep(raw)
            if where is not None:
                raise ScenarioError(source, where, f"--set: tables or lists nested deeper than {MAX_DEPTH} levels")
        return _read_scenario(raw, text, source, overrides, base_dir)
    except ScenarioError as exc:
        if exc.field.isprintable() and exc.message.isprintable():
            raise
        # a hostile key or value (a --set key with a newline, say) must not break the one-line message
        raise type(exc)(exc.source, printable(exc.field), printable(exc.message)) from None


def _read_scenario(raw: dict, text: str, source: str, overrides, base_dir: Path | None) -> Scenario:
    root = Fields(raw, source, "")
    run = _read_run(root.sub("run"))
    model = _read_model(root.sub("model"))
    data = read_data(root.sub("data"), base_dir)
    training = _read_training(root.sub("training"))
    fleet = _read_fleet(root.sub("fleet"), base_dir)
    network = _read_network(root.sub("network", default_empty=True), fleet)

    policy, ignored = read_policy(root.sub("policy"), training)
    root.finish()
    check_data_memory(source, data, fleet.n_devices)
    if fleet.participants is not None and fleet.participants > fleet.n_devices:
        raise ScenarioError(source, "fleet.participants",
                            f"must be at most the number of devices ({fleet.n_devices}), got {fleet.participants}")
    if training.lr_schedule is not None and policy.kind != "sync":
        raise ScenarioError(source, "training.lr_schedule", f"sets the rate of each synchronous round; policy.name = "
                                                            f"{policy.name} is asynchronous (no rounds): remove it")
    scn = Scenario(source, text, tuple(overrides), run, model, data, training, fleet, network, policy, ignored)
    refusal = getattr(policy, "depth_model_refusal", "it does not declare that it handles a depth model")
    if fleet.depth_model is not None and refusal is not None:
        raise ScenarioError(source, "fleet.depth_model", f"policy {policy.describe()} cannot run under the depth "
                                                         f"model: {refusal}")
    policy.check(scn)
    if fleet.availability_file is not None:
        # read now, not when the run starts: a bad file must fail before any output exists
        check_availability_file(root.sub("fleet"), "availability_file", fleet.availability_file, fleet.n_devices)
    return scn


def _read_run(f: Fields) -> RunSpec:
    spec = RunSpec(
        name=f.string("name"),
        seed=f.integer("seed", low=0, high=2**63 - 1),
        rounds=f.integer("rounds", low=1, high=MAX_ROUNDS),
        eval_every=f.integer("eval_every", 1, low=1),
        time_budget_s=f.optional_number("time_budget_s", low=0.0, low_open=True),
    )
    _check_run_name(f, spec.name)
    f.finish()
    return spec


def _check_run_name(f: Fields, name: str) -> None:
    """run.name names the run directory: one plain, printable directory name."""
    shown = printable(repr(name)) if len(name) <= 60 else printable(repr(name[:60])) + "..."
    if "\0" in name:
        raise f.error("name", f"must not contain a NUL character, got {shown}")
    if not name.isprintable():
        raise f.error("name", f"must not contain control or unprintable characters, got {shown}")
    if any(ch in name for ch in "/\\") or name.startswith("."):
        raise f.error("name", f"must be a plain name usable as a directory (no '/' or '\\', not starting "
                              f"with '.'), got {shown}")
    size = len(name.encode("utf-8"))
    if size > MAX_RUN_NAME_BYTES:
        raise f.error("name", f"must be at most {MAX_RUN_NAME_BYTES} bytes in UTF-8 (it names the run "
                              f"directory), got {size} bytes: {shown}")


def _read_model(f: Fields) -> ModelSpec:
    spec = ModelSpec(
        name=f.string("name"),
        granularity=f.choice("granularity", ["module", "tensor"], "module"),
        dtype=f.choice("dtype", ["float32", "float64"], "float32"),
    )
    check_plugin_name(spec.name, group=MODEL_GROUP, builtins=MODEL_PATHS, source=f.source, field=f.field("name"),
                      kind="model", form="package.module:function")
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
        divergence_factor=f.number("divergence_factor", 10.0, low=1.0, low_open=True),
        loss=f.string("loss", "cross_entropy"),
    )
    schedule = read_lr_schedule(f, spec.lr)
    if schedule is not None:
        spec = replace(spec, lr_schedule=schedule)
    check_plugin_name(spec.loss, group=None, builtins=LOSS_PATHS, source=f.source, field=f.field("loss"),
                      kind="loss", form="package.module:function")
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
        layer_time=read_dist(f, "layer_time", 1.0),
        step_overhead_s=_step_overhead_s(f, measured),
    )
    f.finish()
    return spec


def _step_overhead_s(f: Fields, measured: MeasuredSpec | None) -> float:
    """`step_overhead_s`: given, or 0; with `measured.fit = "affine"` the fit supplies it (fedsim.world.fleet)."""
    if measured is not None and measured.fit == "affine" and f.has("step_overhead_s"):
        raise f.error("step_overhead_s", "comes from the time table with measured.fit = \"affine\"; remove it")
    return f.number("step_overhead_s", 0.0, low=0.0)


def _read_fleet(f: Fields, base_dir: Path | None) -> FleetSpec:
    traces_dir = resolve_traces_dir(f, "traces_dir", base_dir)
    raw_classes = f.raw("classes")
    if isinstance(raw_classes, list) and len(raw_classes) > MAX_CLASSES:
        raise f.error("classes", f"at most {MAX_CLASSES} device classes are supported, got {len(raw_classes)}")
    classes = tuple(_read_device_class(c, i, traces_dir) for i, c in enumerate(f.sub_list("classes")))
    first: dict[str, int] = {}
    for i, c in enumerate(classes):
        if c.name in first:
            raise ScenarioError(f.source, f"fleet.classes[{i}].name",
                                f"duplicate class name {c.name!r} (also fleet.classes[{first[c.name]}].name)")
        first[c.name] = i
    total = sum(c.count for c in classes)
    if total > MAX_DEVICES:
        raise f.error("classes", f"the fleet has {total} devices; at most {MAX_DEVICES} are supported")
    participants_raw = f.raw("participants", "all")
    participants = None if participants_raw == "all" else f.integer("participants", low=1)
    availability_file = read_availability_file(f, "availability_file", base_dir)
    if availability_file is not None and any(c.availability is not None for c in classes):
        raise f.error("availability_file", "give either per-class availability or an availability file, not both")
    depth_model = read_depth_model(f, "depth_model")
    f.finish()
    return FleetSpec(classes, participants, traces_dir, availability_file, depth_model)


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
