"""The naive reference: one model copy per device, full backward, keep the delivered layers (float64)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def per_device_grads(model, x, y, batches, loss_rows=None):
    """Full gradient of each device's mini-batch mean loss, in float64, one device at a time.

    `loss_rows(logits, targets)`: per-row losses (a `training.loss` function); None: cross-entropy."""
    out = []
    for idx in batches:
        m = copy.deepcopy(model).double()
        m.zero_grad()
        logits, target = m(x[torch.from_numpy(idx)].double()), y[torch.from_numpy(idx)]
        loss = F.cross_entropy(logits, target) if loss_rows is None else loss_rows(logits, target).mean()
        loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in m.named_parameters()})
    return out


def layerwise_update(model, profile, x, y, batches, depths, divisor="count", scales=None):
    """sum over devices reaching layer l of g_{u,l}, divided per layer; None where nobody reached."""
    n_layers = profile.n_layers
    grads = per_device_grads(model, x, y, batches)
    layer_of = profile.layer_of_param()
    update = {}
    for name, layer in layer_of.items():
        members = [i for i, d in enumerate(depths) if d >= n_layers - layer]
        if not members:
            update[name] = None
            continue
        total = sum(grads[i][name] for i in members)
        div = len(members) if divisor == "count" else len(depths)
        update[name] = total / div * (1.0 if scales is None else float(scales[layer]))
    return update


def unbiased_scales(depth_counts, n_participants):
    """SALF's unbiased factors per layer l (forward order): 1 / (1 - P_l^U) with U the participants and P_l the
    fraction of device-rounds so far that did not reach layer l, counted one device-round at a time (a device
    of depth d delivers the last d of the L layers, so it reaches layer l iff d >= L - l)."""
    n_layers = len(depth_counts) - 1
    device_rounds = [d for d in range(n_layers + 1) for _ in range(int(depth_counts[d]))]
    scales = []
    for layer in range(n_layers):
        missed = sum(1 for d in device_rounds if d < n_layers - layer)
        scales.append(1.0 / (1.0 - (missed / len(device_rounds)) ** n_participants))
    return scales


def round_inputs(profile, depths, batches, history=None):
    """`fedsim.policies.RoundInputs` of one FedSGD round of len(batches) devices 0..n-1 (no fleet, no trainer).

    `history`: the depth histogram of every device-round so far, this round included (SALF's unbiased
    aggregation); the policy state holds the rounds before, so this round's depths are taken out of it."""
    import numpy as np

    from fedsim.policies import RoundContext, RoundInputs
    from fedsim.policies.salf import DepthHistogram
    from fedsim.spec.scenario import UploadMode

    n = len(batches)
    depths = np.asarray(depths, dtype=np.int64)
    counts = np.zeros(profile.n_layers + 1, dtype=np.int64) if history is None else \
        np.asarray(history, dtype=np.int64) - np.bincount(depths, minlength=profile.n_layers + 1)
    assert (counts >= 0).all(), "the history must include this round's depths"
    samples = np.array([len(b) for b in batches], dtype=np.int64)
    ctx = RoundContext(0, profile, None, np.arange(n), np.ones(n), samples, np.ones(n, dtype=np.int64),
                       UploadMode.IDEAL, int(samples.max(initial=0)), None,
                       DepthHistogram(tuple(int(c) for c in counts)))
    return RoundInputs(ctx, depths, samples, np.ones(n, dtype=np.int64), [[np.asarray(b)] for b in batches],
                       np.arange(n), None, None)
