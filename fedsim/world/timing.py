"""Durations of one device-round, computed for all participants at once (pure numpy, no simulation).

The engine turns these durations into SimPy timeouts. Layers are handled in backward order (last layer
first) everywhere in this module: column k of `backward_s` is the k-th layer the backward pass finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:       # an annotation only: the policies read timing without importing torch
    from fedsim.learn.profile import ModelProfile

__all__ = ["RoundPlan", "plan_round", "plan_error", "max_depth_fitting", "merge_plans"]


@dataclass(frozen=True)
class RoundPlan:
    devices: np.ndarray          # int64 device ids, one row per participant
    samples: np.ndarray          # samples each participant processes per local step
    steps: np.ndarray            # local steps per participant
    download_s: np.ndarray       # model download, latency included
    forward_s: np.ndarray        # forward pass(es) over every local step but the last's backward
    backward_s: np.ndarray       # (n, L): backward duration of each layer, in backward order
    upload_s: np.ndarray         # (n, L): transfer time of each layer's gradient, in backward order
    layer_order: tuple[int, ...]  # forward index of the k-th layer in backward order
    upload_bytes: np.ndarray     # (n, L) int64: bytes of each layer's update, in backward order
    download_bytes: np.ndarray   # (n,) int64: bytes of the model each device downloads
    target_depth: np.ndarray     # layers each device intends to deliver (after_compute plans ahead)

    @property
    def n(self) -> int:
        return int(self.devices.shape[0])


def plan_round(profile: ModelProfile, devices: np.ndarray, speed_flops: np.ndarray, slowdown: np.ndarray,
               samples: np.ndarray, steps: np.ndarray, downlink_bps: np.ndarray, uplink_bps: np.ndarray,
               latency_s: np.ndarray, fwd_flops_scale: np.ndarray | None = None,
               layer_time: np.ndarray | None = None, step_overhead_s: np.ndarray | None = None) -> RoundPlan:
    """Durations for each participant from the model profile and the device's speed in this round.

    `layer_time` (n, L), in backward order: a multiplier on each layer's backward duration in this round
    (`fleet.classes[i].layer_time`); None is 1 everywhere.

    `step_overhead_s` (n,): fixed seconds of every local step besides its FLOPs (`fleet.classes[i].
    step_overhead_s`), so a step costs `slowdown * (step_overhead_s + FLOPs / speed)`: affine in the work. The
    overhead of every step is charged to the forward phase (`forward_s`); the per-layer backward durations are
    the FLOPs' only. None (or 0) adds nothing.

    With several local steps, every step but the last is a whole forward+backward counted into
    `forward_s`; only the last step's backward is split per layer, because only it produces the update
    that is delivered layer by layer.
    """
    order = profile.backward_order
    fwd = np.array([profile.layers[i].fwd_flops_per_sample for i in order])
    bwd = np.array([profile.layers[i].bwd_flops_per_sample for i in order])
    sizes = np.array([profile.layers[i].size_bytes for i in order], dtype=np.int64)
    scale = np.ones(len(devices)) if fwd_flops_scale is None else fwd_flops_scale
    sec_per_flop = slowdown * scale / speed_flops                  # (n,)
    per_sample = samples * sec_per_flop                             # (n,)
    full_step = (fwd.sum() + bwd.sum()) * per_sample
    forward_s = fwd.sum() * per_sample + (steps - 1) * full_step
    if step_overhead_s is not None:
        forward_s = forward_s + steps * (slowdown * step_overhead_s)
    backward_s = per_sample[:, None] * bwd[None, :]
    if layer_time is not None:
        backward_s = backward_s * layer_time
    download_s = latency_s + profile.total_bytes * 8.0 / downlink_bps
    upload_s = latency_s[:, None] + sizes[None, :] * 8.0 / uplink_bps[:, None]
    n_layers = len(order)
    return RoundPlan(
        devices=devices, samples=samples, steps=steps, download_s=download_s, forward_s=forward_s,
        backward_s=backward_s, upload_s=upload_s, layer_order=tuple(order),
        upload_bytes=np.broadcast_to(sizes, (len(devices), n_layers)),
        download_bytes=np.full(len(devices), int(profile.total_bytes), dtype=np.int64),
        target_depth=np.full(len(devices), n_layers, dtype=np.int64),
    )


def plan_error(plan: RoundPlan, n_layers: int) -> str | None:
    """What is wrong with a plan (a policy's), or None: durations finite and >= 0, bytes whole numbers, target
    depths in 0..n_layers, one row per participant."""
    n = plan.n
    for name in ("download_s", "forward_s", "backward_s", "upload_s"):
        values = np.asarray(getattr(plan, name))
        if values.shape[:1] != (n,):
            return f"RoundPlan.{name} has {values.shape[:1]} rows for {n} participants"
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            return f"RoundPlan.{name} holds {float(values[bad].flat[0])!r} s; durations are finite and >= 0"
    for name in ("upload_bytes", "download_bytes", "target_depth", "samples", "steps"):
        values = np.asarray(getattr(plan, name))
        if values.dtype.kind not in "iu":
            return f"RoundPlan.{name} is {values.dtype}; it holds whole numbers"
    depth = np.asarray(plan.target_depth)
    if depth.size and (depth.min() < 0 or depth.max() > n_layers):
        return f"RoundPlan.target_depth holds {int(depth.min())}..{int(depth.max())}; depths lie in 0..{n_layers}"
    return None


def max_depth_fitting(plan: RoundPlan, deadline_s: float, start_at: float = 0.0) -> np.ndarray:
    """Deepest k such that computing k layers and then uploading them one by one ends by the deadline.

    This is what an `after_compute` device plans from its known speed and nominal link rate. The times are
    summed exactly as the engine advances its clock (absolute time from the round's start `start_at`, one
    phase after another), so a plan that ends exactly at the deadline is found to fit, as it does in the
    engine (a phase ending at the deadline counts).
    """
    limit_at = start_at + deadline_s
    compute_end_at = (start_at + plan.download_s) + plan.forward_s
    n_layers = plan.backward_s.shape[1]
    fits = np.zeros((len(compute_end_at), n_layers), dtype=bool)
    for k in range(n_layers):
        compute_end_at = compute_end_at + plan.backward_s[:, k]
        upload_end_at = compute_end_at
        for j in range(k + 1):
            upload_end_at = upload_end_at + plan.upload_s[:, j]
        fits[:, k] = upload_end_at <= limit_at            # monotone in k: True then False
    return fits.sum(axis=1).astype(np.int64)


def merge_plans(plans: list[RoundPlan], rows: list[np.ndarray], n: int) -> RoundPlan:
    """One plan from plans computed for disjoint groups of participants (e.g. HeteroFL widths).

    `rows[g]` are the positions, in the merged plan, of the participants of `plans[g]`.
    """
    first = plans[0]
    out = {}
    for name in ("devices", "samples", "steps", "download_s", "forward_s", "target_depth", "download_bytes",
                 "backward_s", "upload_s", "upload_bytes"):
        ref = getattr(first, name)
        arr = np.empty((n,) + ref.shape[1:], dtype=ref.dtype)
        for plan, idx in zip(plans, rows):
            arr[idx] = getattr(plan, name)
        out[name] = arr
    return RoundPlan(layer_order=first.layer_order, **out)
