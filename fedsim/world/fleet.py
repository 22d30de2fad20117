"""The device fleet: per-device parameters as flat numpy arrays (no per-device Python objects).

A fleet of 100,000 devices costs a handful of float arrays. Per-round quantities (slowdowns) are drawn
for the round's participants only, from the round's own random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import DataError, ScenarioError, ScenarioFileError
from fedsim.seeds import component_rng
from fedsim.spec.fields import printable
from fedsim.world.calibration import flash_rates_bps, measured_speeds_flops, measured_step_overhead_s
from fedsim.spec.scenario import DeviceClassSpec, FleetSpec, Scenario

__all__ = ["Fleet", "build_fleet", "scenario_fleet"]


@dataclass(frozen=True)
class Fleet:
    classes: tuple[DeviceClassSpec, ...]
    class_of: np.ndarray        # int32, class index of each device
    speed_flops: np.ndarray     # float64, base effective FLOP/s of each device
    downlink_bps: np.ndarray
    uplink_bps: np.ndarray
    latency_s: np.ndarray
    class_step_overhead_s: np.ndarray | None = None   # per class: fixed seconds of every local step (None: all 0)

    def step_overhead_s(self, devices: np.ndarray) -> np.ndarray | None:
        """Each device's fixed seconds per local step (before the round's slowdown); None when every class has 0."""
        if self.class_step_overhead_s is None:
            return None
        return self.class_step_overhead_s[self.class_of[devices]]

    @property
    def n_devices(self) -> int:
        return int(self.class_of.shape[0])

    def class_spec(self, device: int) -> DeviceClassSpec:
        return self.classes[int(self.class_of[device])]

    def sample_slowdown(self, devices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per-round duration multipliers for `devices`, drawn class by class in class order."""
        out = np.empty(len(devices))
        cls = self.class_of[devices]
        for c, spec in enumerate(self.classes):
            mask = cls == c
            if mask.any():
                out[mask] = spec.slowdown.sample(rng, int(mask.sum()))
        return out


    def sample_layer_time(self, devices: np.ndarray, n_layers: int, rng: np.random.Generator) -> np.ndarray | None:
        """(n, L) multipliers on each participant's per-layer backward durations (backward order), drawn class
        by class in class order, a device's row in backward order; None when every class has the default 1
        (nothing is drawn then)."""
        if not any(spec.layer_time_varies for spec in self.classes):
            return None
        out = np.ones((len(devices), n_layers))
        cls = self.class_of[devices]
        for c, spec in enumerate(self.classes):
            mask = cls == c
            if mask.any() and spec.layer_time_varies:
                out[mask] = spec.layer_time.sample(rng, int(mask.sum()) * n_layers).reshape(-1, n_layers)
        return out


def build_fleet(spec: FleetSpec, rng: np.random.Generator, source: str = "<scenario>") -> Fleet:
    """Per-device parameters, class by class in class order, each quantity from the same stream."""
    class_of = np.concatenate([np.full(c.count, i, dtype=np.int32) for i, c in enumerate(spec.classes)])
    speed, down, up, overhead = [], [], [], []
    for i, c in enumerate(spec.classes):
        overhead.append(c.step_overhead_s)
        if c.measured is not None:
            speed.append(measured_speeds_flops(c.measured, c.count, rng, source, f"fleet.classes[{i}].measured"))
            if c.measured.fit == "affine":
                overhead[-1] = measured_step_overhead_s(c.measured, source, f"fleet.classes[{i}].measured")
        else:
            speed.append(c.speed_flops.sample(rng, c.count))
        if c.flash_bandwidth:
            d, u = flash_rates_bps(spec.traces_dir, c.count, rng)
        else:
            # classes with a wireless or ideal access have no wired rates: the network supplies them
            d = c.downlink_bps.sample(rng, c.count) if c.downlink_bps is not None else np.full(c.count, np.inf)
            u = c.uplink_bps.sample(rng, c.count) if c.uplink_bps is not None else np.full(c.count, np.inf)
        down.append(d)
        up.append(u)
    return Fleet(
        classes=spec.classes,
        class_of=class_of,
        speed_flops=np.concatenate(speed).astype(np.float64),
        downlink_bps=np.concatenate(down).astype(np.float64),
        uplink_bps=np.concatenate(up).astype(np.float64),
        latency_s=np.concatenate([np.full(c.count, c.latency_s) for c in spec.classes]),
        class_step_overhead_s=np.array(overhead, dtype=np.float64) if any(o > 0 for o in overhead) else None,
    )


def scenario_fleet(scn: Scenario) -> Fleet:
    """The run's fleet, drawn from its fleet stream; unreadable FLASH measurements under `fleet.traces_dir` are
    a ScenarioFileError on that field (other problems already name their own)."""
    try:
        return build_fleet(scn.fleet, component_rng(scn.run.seed, "fleet"), scn.source)
    except ScenarioError:
        raise
    except DataError as exc:
        raise ScenarioFileError(scn.source, "fleet.traces_dir", printable(str(exc))) from None
