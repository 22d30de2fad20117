"""ADEL-FL's deadline allocation (arXiv 2505.23973): the pure math, numpy and scipy only, no policy.

SALF's unrolled convergence bound after R rounds with step sizes eta_t and deadlines T_t is

    f(T_1..T_R) = prod_t (1 - rho_c eta_t) d_1 + sum_t eta_t^2 prod_{s>t} (1 - rho_c eta_s) (b + c(T_t)),
    c(T) = G^2 4U / (U - 1) * sum_{l=1..L} (1 + P_l(T)^U) / (1 - P_l(T)^U),

where P_l(T) is the probability that one device has not finished the backward of the l-th layer counted from
the output by the deadline T, and U the participants per round. With the step size the analysis assumes,
eta_t = 1 / (rho_c (t + gamma)), gamma = max(8 kappa, 1) - 1 (kappa = rho_s / rho_c), the first term and b do
not depend on T, and G^2 4U/(U-1) is a positive factor: the minimiser depends only on kappa, U and P_l. So

    minimise  sum_t w_t h(T_t),   w_t = (rho_c eta_t)^2 prod_{s>t} (1 - rho_c eta_s),
              h(T) = sum_l (1 + P_l(T)^U) / (1 - P_l(T)^U),
    subject to sum_t T_t <= T_total,  T_t >= T_min,

solved, as the authors do, with scipy's `trust-constr` (2-point gradients, SR1 Hessian) from the equal split
(the gradient's differences are taken for all rounds in one evaluation, the objective being separable).
When the run has its own learning-rate schedule (`training.lr_schedule`), the steps follow its shape instead:
rho_c eta_t = (eta_t / eta_1) / (1 + gamma), the analysis's first step decaying as the run's rate does (an
`inverse` schedule with b = 1 + gamma gives the analysis's steps exactly).
In the authors' model each layer's backward time is i.i.d. Exp(1), so finishing the last l layers takes an
Erlang(l, 1) time and P_l(T) = Q(l, T), the regularised upper incomplete gamma function (`gammaincc`).
"""

from __future__ import annotations

from typing import Callable

import warnings

import numpy as np

__all__ = ["allocate_deadlines", "bound_terms", "erlang_miss", "objective", "step_weights", "empirical_miss"]

MissFn = Callable[[np.ndarray], np.ndarray]     # deadlines (R,) -> P_l(T_t), shape (R, L)
_P_MAX = 1.0 - 1e-12                            # P_l^U = 1 makes the bound infinite: keep it finite


def step_weights(rounds: int, kappa: float, step_shape: np.ndarray | None = None) -> np.ndarray:
    """w_t = (rho_c eta_t)^2 prod_{s>t} (1 - rho_c eta_s) for t = 1..R, with rho_c eta_t = 1 / (t + gamma).

    `step_shape`: eta_t / eta_1 of the run's own learning-rate schedule (non-increasing, first 1); the steps
    are then rho_c eta_t = step_shape[t] / (1 + gamma): the analysis's first step, decaying as the schedule."""
    gamma = max(8.0 * kappa, 1.0) - 1.0
    if step_shape is None:
        a = 1.0 / (np.arange(1, rounds + 1, dtype=np.float64) + gamma)      # rho_c eta_t
    else:
        a = np.asarray(step_shape, dtype=np.float64) / (1.0 + gamma)
    later = np.concatenate([np.cumprod((1.0 - a)[::-1])[::-1][1:], [1.0]])  # prod over s > t
    return a * a * later


def erlang_miss(deadlines_s: np.ndarray, n_layers: int, start_s: float = 0.0, unit_s: float = 1.0) -> np.ndarray:
    """P_l(T) when the backward starts at `start_s` and each layer takes an i.i.d. exponential time of mean
    `unit_s`: Q(l, (T - start_s) / unit_s), l = 1..L (1 where T <= start_s)."""
    from scipy.special import gammaincc

    x = np.maximum(np.asarray(deadlines_s, dtype=np.float64) - start_s, 0.0) / unit_s
    layers = np.arange(1, n_layers + 1, dtype=np.float64)
    return gammaincc(layers[None, :], x[:, None])


def empirical_miss(finish_s: np.ndarray) -> MissFn:
    """P_l(T) from samples: `finish_s` (N, L) are the times at which sampled device-rounds finish the l-th
    layer from the output (column l-1). Each column's empirical distribution function is interpolated
    linearly between its sorted samples, so P_l is continuous in T (trust-constr differentiates it)."""
    cols = [np.sort(finish_s[:, l]) for l in range(finish_s.shape[1])]
    n = finish_s.shape[0]
    levels = np.arange(1, n + 1, dtype=np.float64) / n

    def miss(deadlines_s: np.ndarray) -> np.ndarray:
        t = np.asarray(deadlines_s, dtype=np.float64)
        return np.stack([1.0 - np.interp(t, c, levels, left=0.0, right=1.0) for c in cols], axis=1)

    return miss


def bound_terms(miss: np.ndarray, participants: int) -> np.ndarray:
    """h(T_t) = sum_l (1 + P_l^U) / (1 - P_l^U) for each row of `miss` (R, L)."""
    pu = np.minimum(miss, _P_MAX) ** participants
    return ((1.0 + pu) / (1.0 - pu)).sum(axis=1)


def objective(deadlines_s: np.ndarray, weights: np.ndarray, miss: MissFn, participants: int) -> float:
    """sum_t w_t h(T_t): the part of SALF's bound that the deadlines change."""
    return float(weights @ bound_terms(miss(np.asarray(deadlines_s, dtype=np.float64)), participants))


def allocate_deadlines(rounds: int, total_s: float, min_s: float, miss: MissFn, participants: int,
                       kappa: float, step_shape: np.ndarray | None = None) -> np.ndarray:
    """The R deadlines minimising the bound under sum T_t <= total_s and T_t >= min_s (float64).

    The result is made exactly feasible: trust-constr may leave the constraints violated by its tolerance,
    so values below min_s are raised to it and any excess over total_s is taken from the slack above min_s
    in proportion. An optimiser result worse than the equal split is replaced by the equal split.
    """
    from scipy.optimize import SR1, Bounds, LinearConstraint, minimize

    if total_s < rounds * min_s:
        raise ValueError(f"total_s {total_s} < rounds {rounds} x min_s {min_s}")
    weights = step_weights(rounds, kappa, step_shape)
    scale = float(weights.sum())
    equal = np.full(rounds, total_s / rounds)

    def f(t: np.ndarray) -> float:
        return objective(t, weights, miss, participants) / scale

    def jac(t: np.ndarray) -> np.ndarray:
        # the objective is a sum of one term per round: its 2-point forward differences, all rounds at once
        step = np.sqrt(np.finfo(np.float64).eps) * np.maximum(1.0, np.abs(t))
        here = bound_terms(miss(t), participants)
        there = bound_terms(miss(t + step), participants)
        return weights * (there - here) / ((t + step) - t) / scale

    if rounds == 1 or total_s == rounds * min_s:
        return equal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # SR1 on a locally flat objective: harmless
        res = minimize(f, equal, method="trust-constr", jac=jac, hess=SR1(),
                       constraints=[LinearConstraint(np.ones((1, rounds)), -np.inf, total_s)],
                       bounds=Bounds(np.full(rounds, min_s), np.full(rounds, np.inf)),
                       options={"maxiter": 2000, "gtol": 1e-10, "xtol": 1e-12})
    t = np.maximum(np.asarray(res.x, dtype=np.float64), min_s)
    excess = t.sum() - total_s
    if excess > 0:
        slack = t - min_s
        t = min_s + slack * (1.0 - excess / slack.sum())
    t = np.maximum(t, min_s)
    while t.sum() > total_s:                   # rounding of the rescaling: shave the largest
        i = int(np.argmax(t))
        t[i] = max(min_s, t[i] - (t.sum() - total_s) - np.spacing(t[i]))
    return t if f(t) <= f(equal) else equal
