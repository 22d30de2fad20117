"""Static network structure: routes over the infrastructure graph, access-link rates (Shannon, path loss,
Rayleigh fading). Max-min fair rates: fedsim.world.sharing; the flows in time: fedsim.world.network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.spec.network import AccessKind, Direction, Fading, TopologySpec, WirelessSpec, routes

__all__ = ["Topology", "build_topology", "shannon_rate_bps", "path_gain", "rayleigh_power_gain"]


def path_gain(distance_m, *, reference_gain: float, reference_distance_m: float, exponent: float):
    """g = g0 * (d0 / d)^exponent; distances below d0 are clamped to d0 (the far-field law would
    give a gain above g0, unbounded as d -> 0)."""
    d = np.maximum(np.asarray(distance_m, dtype=np.float64), reference_distance_m)
    return reference_gain * (reference_distance_m / d) ** exponent


def shannon_rate_bps(bandwidth_hz, tx_power_w, gain, noise_psd_w_per_hz):
    """B * log2(1 + P * g / (N0 * B)); vectorised over any argument."""
    snr = np.asarray(tx_power_w, dtype=np.float64) * gain / (noise_psd_w_per_hz * bandwidth_hz)
    return bandwidth_hz * np.log2(1.0 + snr)


def rayleigh_power_gain(rng: np.random.Generator, n: int) -> np.ndarray:
    """|h|^2 of a unit-power Rayleigh channel: exponential with mean 1."""
    return rng.exponential(1.0, n)


# -- the built topology (pure, no simulation) ---------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    spec: TopologySpec
    class_of: np.ndarray          # int, class index of each device
    link_bps: np.ndarray          # (2, n_links): row Direction.value
    device_route: tuple[tuple[int, ...], ...]   # per class: link indices from its attach node to the server
    access_bps: np.ndarray        # (2, n_devices) nominal private-link capacity (inf: no private link)
    latency_s: np.ndarray         # per device: its own latency_s + its route's link latencies
    distance_m: np.ndarray        # per device (nan unless wireless)

    @property
    def n_devices(self) -> int:
        return int(self.class_of.shape[0])

    def route_of(self, device: int) -> tuple[int, ...]:
        return self.device_route[int(self.class_of[device])]

    def access_rates_bps(self, devices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(2, len(devices)) private-link capacities for one round: wireless devices draw fresh Rayleigh
        fading (one |h|^2 per device for both directions: a reciprocal channel), class by class."""
        devices = np.asarray(devices, dtype=np.int64)
        out = self.access_bps[:, devices].copy()
        cls = self.class_of[devices]
        for c, spec in enumerate(self.spec.classes):
            w = spec.wireless
            mask = cls == c
            if w is None or w.fading is Fading.NONE or not mask.any():
                continue
            gain = self._gain(w, devices[mask]) * rayleigh_power_gain(rng, int(mask.sum()))
            out[0, mask] = shannon_rate_bps(w.bandwidth_hz, w.down_tx_power_w, gain, w.noise_psd_w_per_hz)
            out[1, mask] = shannon_rate_bps(w.bandwidth_hz, w.up_tx_power_w, gain, w.noise_psd_w_per_hz)
        return out

    def _gain(self, w: WirelessSpec, devices: np.ndarray) -> np.ndarray:
        return path_gain(self.distance_m[devices], reference_gain=w.reference_gain,
                         reference_distance_m=w.reference_distance_m, exponent=w.path_loss_exponent)

    def nominal_rate_bps(self, devices: np.ndarray, direction: Direction) -> np.ndarray:
        """Rate of a lone transfer (no sharing, no fading): the narrowest capacity on the path."""
        devices = np.asarray(devices, dtype=np.int64)
        route_min = np.array([min((self.link_bps[direction.value, i] for i in r), default=math.inf)
                              for r in self.device_route])
        return np.minimum(self.access_bps[direction.value, devices], route_min[self.class_of[devices]])


def build_topology(spec: TopologySpec, *, class_of: np.ndarray, downlink_bps: np.ndarray, uplink_bps: np.ndarray,
                   latency_s: np.ndarray, rng: np.random.Generator) -> Topology:
    """Per-device access links and routes; `rng` draws wireless distances (class by class, in order)."""
    class_of = np.asarray(class_of, dtype=np.int64)
    n = class_of.shape[0]
    route_map = routes(spec.nodes, spec.links, spec.route_by)
    device_route = tuple(route_map[c.attach] for c in spec.classes)
    link_bps = np.array([[link.down_bps for link in spec.links], [link.up_bps for link in spec.links]],
                        dtype=np.float64).reshape(2, len(spec.links))
    link_latency = np.array([link.latency_s for link in spec.links], dtype=np.float64)
    route_latency = np.array([float(link_latency[list(r)].sum()) for r in device_route])
    access = np.stack([np.asarray(downlink_bps, dtype=np.float64), np.asarray(uplink_bps, dtype=np.float64)])
    distance = np.full(n, np.nan)
    for c, cspec in enumerate(spec.classes):
        mask = class_of == c
        if cspec.access is AccessKind.NONE:
            access[:, mask] = math.inf
        elif cspec.access is AccessKind.WIRELESS:
            w = cspec.wireless
            distance[mask] = w.distance_m.sample(rng, int(mask.sum()))
            gain = path_gain(distance[mask], reference_gain=w.reference_gain,
                             reference_distance_m=w.reference_distance_m, exponent=w.path_loss_exponent)
            # Without fading the nominal rate is the one at |h|^2 = 1 (above the mean rate: Jensen).
            access[0, mask] = shannon_rate_bps(w.bandwidth_hz, w.down_tx_power_w, gain, w.noise_psd_w_per_hz)
            access[1, mask] = shannon_rate_bps(w.bandwidth_hz, w.up_tx_power_w, gain, w.noise_psd_w_per_hz)
    return Topology(spec=spec, class_of=class_of, link_bps=link_bps, device_route=device_route,
                    access_bps=access, latency_s=np.asarray(latency_s, dtype=np.float64) + route_latency[class_of],
                    distance_m=distance)
