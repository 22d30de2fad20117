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

solved as the separable problem it is (the authors use scipy's `trust-constr`): a price on time, set by
bisection, and each round's best deadline at that price on the lower convex hull of h (`allocate_deadlines`).
When the run has its own learning-rate schedule (`training.lr_schedule`), the steps follow its shape instead:
rho_c eta_t = (eta_t / eta_1) / (1 + gamma), the analysis's first step decaying as the run's rate does (an
`inverse` schedule with b = 1 + gamma gives the analysis's steps exactly).
In the authors' model each layer's backward time is i.i.d. Exp(1), so finishing the last l layers takes an
Erlang(l, 1) time and P_l(T) = Q(l, T), the regularised upper incomplete gamma function (`gammaincc`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedsim.spec.scenario import TIME_RTOL

__all__ = ["allocate_deadlines", "feasible", "bound_terms", "erlang_miss", "objective", "step_weights", "empirical_miss"]

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
    linearly between its sorted samples, so P_l is continuous in T."""
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


def feasible(total_s: float, rounds: int, min_s: float) -> bool:
    """`rounds` deadlines of at least `min_s` fit `total_s`, up to the run's relative rounding tolerance
    (`TIME_RTOL`: three deadlines of 0.1 s fit 0.3 s)."""
    return total_s >= rounds * min_s * (1.0 - TIME_RTOL)


def _lower_hull(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of the points (xs increasing), left to right (Andrew's monotone chain)."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()          # b is on or above the chord from a to i
            else:
                break
        hull.append(i)
    return np.asarray(hull, dtype=np.int64)


def _grid(lo: float, hi: float, h: Callable[[np.ndarray], np.ndarray], points: int) -> np.ndarray:
    """Deadlines from lo to where h stops falling (every P_l^U about 0), at most hi: a coarse pass finds the end."""
    coarse = np.linspace(lo, hi, points)
    values = h(coarse)
    flat = np.flatnonzero(values <= values[-1] * (1.0 + 1e-12) + 1e-300)
    end = coarse[min(int(flat[0]) + 1, points - 1)] if len(flat) else hi
    return np.linspace(lo, end, points * 4)


def allocate_deadlines(rounds: int, total_s: float, min_s: float, miss: MissFn, participants: int,
                       kappa: float, step_shape: np.ndarray | None = None, grid_points: int = 4097) -> np.ndarray:
    """The R deadlines minimising the bound under sum T_t <= total_s and T_t >= min_s (float64).

    The problem is separable: with a price lam on time, round t takes the T minimising w_t h(T) + lam T, and
    lam is set (bisection) so that the deadlines use the budget. h is tabulated on a grid of deadlines from
    min_s to where it stops falling and replaced by its lower convex hull, so each round's choice is a hull
    vertex (exact when h is convex; otherwise the optimum of the convexified problem); rounds indifferent at
    the final price take the budget left, whole edges to the heaviest rounds first. Without a learning-rate
    schedule earlier rounds weigh more and get at least as long. The result is feasible to the last bit; if it is worse than the equal split on the bound itself,
    the equal split is returned.
    """
    if not feasible(total_s, rounds, min_s):
        raise ValueError(f"total_s {total_s} < rounds {rounds} x min_s {min_s}")
    weights = step_weights(rounds, kappa, step_shape)
    equal = np.full(rounds, total_s / rounds)
    if rounds == 1:
        return equal
    if total_s <= np.full(rounds, min_s).sum():      # no time above the minimum (up to rounding): all at min_s
        return np.full(rounds, min_s)

    def h(t: np.ndarray) -> np.ndarray:
        return bound_terms(miss(t), participants)

    grid = _grid(min_s, total_s - (rounds - 1) * min_s, h, grid_points)
    values = h(grid)
    hull = _lower_hull(grid, values)
    lowest = int(np.argmin(values[hull]))
    hull = hull[: lowest + 1]                        # past h's minimum, more time is never worth a price
    xs, ys = grid[hull], values[hull]
    slopes = np.diff(ys) / np.diff(xs)               # increasing, all < 0

    def vertex(price: float) -> np.ndarray:          # each round's hull vertex at this price of time
        with np.errstate(divide="ignore", invalid="ignore"):     # a round of weight 0 (a rate decayed to 0)
            return np.searchsorted(slopes, -price / weights, side="left")

    if xs[vertex(0.0)].sum() <= total_s:            # the budget buys every round all it can use
        t = xs[vertex(0.0)]
        t = t + (total_s - t.sum()) / rounds         # the rest is worth nothing to the bound: spread evenly
    else:
        lo, hi = 0.0, float(-slopes[0] * weights.max() * 2.0) if len(slopes) else 0.0
        for _ in range(200):                         # smallest price at which the deadlines fit the budget
            mid = 0.5 * (lo + hi)
            if xs[vertex(mid)].sum() <= total_s:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-15 * hi:
                break
        at, below = vertex(hi), vertex(lo)
        t = xs[at]
        room = xs[below] - t                         # how far each indifferent round's edge reaches
        left = total_s - t.sum()
        for i in np.argsort(-weights, kind="stable"):    # whole edges to the heaviest rounds first, so that at
            if left <= 0:                                # most one round stops inside an edge (where a
                break                                    # non-convex h may lie above the hull)
            give = min(room[i], left)
            t[i] += give
            left -= give
    t = np.maximum(t, min_s)
    while t.sum() > total_s and (t > min_s).any():   # rounding: shave the largest
        i = int(np.argmax(t))
        t[i] = max(min_s, t[i] - (t.sum() - total_s) - np.spacing(t[i]))
    better = objective(t, weights, miss, participants) <= objective(equal, weights, miss, participants)
    return t if better else equal
