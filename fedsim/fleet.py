"""The device fleet: per-device parameters as flat numpy arrays (no per-device Python objects).

A fleet of 100,000 devices costs a handful of float arrays. Per-round quantities (slowdowns) are drawn
for the round's participants only, from the round's own random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.scenario import DeviceClassSpec, FleetSpec

__all__ = ["Fleet", "build_fleet"]


@dataclass(frozen=True)
class Fleet:
    classes: tuple[DeviceClassSpec, ...]
    class_of: np.ndarray        # int32, class index of each device
    speed_flops: np.ndarray     # float64, base effective FLOP/s of each device
    downlink_bps: np.ndarray
    uplink_bps: np.ndarray
    latency_s: np.ndarray

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


def build_fleet(spec: FleetSpec, rng: np.random.Generator) -> Fleet:
    class_of = np.concatenate([np.full(c.count, i, dtype=np.int32) for i, c in enumerate(spec.classes)])

    def per_device(attr: str) -> np.ndarray:
        return np.concatenate([getattr(c, attr).sample(rng, c.count) for c in spec.classes]).astype(np.float64)

    return Fleet(
        classes=spec.classes,
        class_of=class_of,
        speed_flops=per_device("speed_flops"),
        downlink_bps=per_device("downlink_bps"),
        uplink_bps=per_device("uplink_bps"),
        latency_s=np.concatenate([np.full(c.count, c.latency_s) for c in spec.classes]),
    )
