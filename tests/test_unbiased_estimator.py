"""SALF's `unbiased` aggregation against the full-participation gradient, by Monte Carlo over straggler depths.

A fixed set of per-device, per-layer gradients (float64; fixed model and mini-batches), U devices and L layers.
Each trial draws every device's depth, builds SALF's update of each layer from the devices that reached it
(`fedsim.learn.aggregate.layer_update`; a layer nobody reached is 0, i.e. unchanged) and compares its mean
over trials with the full-participation mean. With depths i.i.d. across devices (exchangeable) and the exact
P_l, `unbiased` (scale 1 / (1 - P_l^U)) has no bias beyond the Monte Carlo error; `mean` is biased by exactly
-P_l^U times the full gradient; with persistent depths (each device always reaching the same depth, as
persistent device speeds make it) `unbiased` is biased: it averages only the devices fast enough for a layer.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.learn.aggregate import layer_update, unbiased_scales

U, L, DIM, TRIALS = 4, 3, 5, 15_000
DEPTH_P = np.array([0.3, 0.25, 0.2, 0.25])      # P(depth = d), d = 0..L (the last d layers delivered)


def setup():
    rng = np.random.default_rng(7)
    grads = rng.normal(1.0, 1.0, (U, L, DIM))        # device u's gradient of layer l (forward index)
    miss = np.array([DEPTH_P[: L - l].sum() for l in range(L)])   # reaches layer l iff depth >= L - l
    return rng, grads, miss


def salf(grads, depths, scales):
    """SALF's update of each layer from these depths (float64), through the library's layer_update."""
    reached = depths[:, None] >= (L - np.arange(L))[None, :]               # (U, L)
    sums = {f"l{l}": torch.from_numpy((grads[:, l] * reached[:, l, None]).sum(axis=0)) for l in range(L)
            if reached[:, l].any()}
    out = layer_update(sums, {f"l{l}": l for l in range(L)}, reached.sum(axis=0), scales)
    return np.stack([np.zeros(DIM) if out[f"l{l}"] is None else out[f"l{l}"].numpy() for l in range(L)])


def monte_carlo(grads, draw, scales, trials=TRIALS):
    updates = np.stack([salf(grads, draw(), scales) for _ in range(trials)])
    return updates.mean(axis=0), updates.std(axis=0, ddof=1) / np.sqrt(trials)


def test_unbiased_is_unbiased_for_exchangeable_depths_and_mean_is_not():
    rng, grads, miss = setup()
    full = grads.mean(axis=0)
    draw = lambda: rng.choice(L + 1, size=U, p=DEPTH_P)
    est, se = monte_carlo(grads, draw, unbiased_scales(miss, U))
    assert np.all(np.abs(est - full) <= 4.5 * se), np.abs(est - full) / se
    est_mean, se_mean = monte_carlo(grads, draw, None)
    expected_bias = -(miss ** U)[:, None] * full      # E[mean] = (1 - P_l^U) x full
    assert np.all(np.abs(est_mean - full - expected_bias) <= 4.5 * se_mean)
    # and that bias is measurable here in the first layer (P_0^U = 0.75^4 = 0.32)
    assert np.all(np.abs(expected_bias[0]) > 6 * se_mean[0])


def test_persistent_depths_bias_unbiased():
    rng, grads, miss = setup()
    depths = np.array([0, 1, 2, 3])                   # each device always reaches the same depth
    est, _ = monte_carlo(grads, lambda: depths, unbiased_scales(miss, U), trials=3)
    full = grads.mean(axis=0)
    # layer l is averaged over the devices with depth >= L - l only, whatever the scale
    expected = np.stack([grads[depths >= L - l, l].mean(axis=0) for l in range(L)])
    expected *= unbiased_scales(miss, U)[:, None]
    assert np.allclose(est, expected, rtol=1e-12, atol=1e-12)
    assert np.linalg.norm(est - full) / np.linalg.norm(full) > 0.05
