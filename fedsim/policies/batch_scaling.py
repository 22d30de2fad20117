"""ADEL-FL's per-device batch scaling (arXiv 2505.23973): each participant's batch fits the time it has.

The authors' code gives user u the batch `round(m * P_u * (T0 - B_u) / T0)`, where P_u is the batch u can
process in the time T0, B_u the time u cannot spend computing and m a global factor. fedsim computes the same
numbers from the timing model, per round: T is the round's deadline, P_u = T / s_u with s_u the seconds of one
sample's forward and whole backward on device u in this round (its speed and slowdown; its `layer_time` draws
are not known in advance and count as 1), B_u its download (and, unless the upload mode is `ideal`, the upload
of every layer's update), m = `policy.batch_fraction`. So a participant's planned compute ends about m of the
way from its download to the deadline (the batch is rounded to the nearest integer). A batch of 0 (no time
left) is raised to 1: the device still takes part and is cut like any straggler; a batch is at most the
samples the device holds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsim.policies.sync import RoundContext
from fedsim.spec.scenario import UploadMode

__all__ = ["scaled_batches"]


def scaled_batches(ctx: RoundContext, deadline_s: float, fraction: float) -> np.ndarray:
    """Each participant's batch: round(m P_u (T - B_u) / T), at least 1, at most what it holds (int64)."""
    n = len(ctx.devices)
    one = replace(ctx, layer_time=None).plan(samples=np.ones(n, dtype=np.int64), steps=np.ones(n, dtype=np.int64))
    per_sample_s = one.forward_s + one.backward_s.sum(axis=1)            # s_u
    busy_s = one.download_s.copy()                                      # B_u
    if ctx.upload_mode is not UploadMode.IDEAL:
        busy_s += one.upload_s.sum(axis=1)
    capacity = deadline_s / per_sample_s                                # P_u: samples u computes in T
    batch = np.rint(fraction * capacity * np.maximum(deadline_s - busy_s, 0.0) / deadline_s).astype(np.int64)
    held = ctx.samples if ctx.held is None else ctx.held
    return np.minimum(np.maximum(batch, 1), np.maximum(held, 1))
