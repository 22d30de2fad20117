"""ADEL-FL's deadline allocation: the bound's pieces against naive float64 oracles, the optimiser's
constraints and optimality condition, P_l from the scenario's timing model, and the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import BASE_TOML, run, scenario, table
from fedsim.cli import main
from fedsim.policies.adel import miss_model
from fedsim.policies.adel_bound import (allocate_deadlines, bound_terms, empirical_miss, erlang_miss, objective,
                                        step_weights)
from fedsim.policies.sync import RunContext
from fedsim.sim.build import build_components
from test_timing import TEXT


@pytest.mark.parametrize("kappa", [0.05, 1.0, 1 / 0.3])
def test_step_weights_are_the_unrolled_products(kappa):
    rounds = 12
    gamma = max(8 * kappa, 1) - 1
    rho_c = 0.3
    eta = [1 / (rho_c * (t + gamma)) for t in range(1, rounds + 1)]
    naive = []
    for t in range(rounds):
        p = 1.0
        for s in range(t + 1, rounds):
            p *= 1 - rho_c * eta[s]
        naive.append((rho_c * eta[t]) ** 2 * p)
    assert np.allclose(step_weights(rounds, kappa), naive, rtol=1e-13, atol=0)
    if gamma > 0:     # the products telescope: w_t = 1 / ((t + gamma)(R + gamma))
        closed = [1 / ((t + gamma) * (rounds + gamma)) for t in range(1, rounds + 1)]
        assert np.allclose(step_weights(rounds, kappa), closed, rtol=1e-12, atol=0)


def test_erlang_miss_is_the_erlang_survival_function():
    T = np.array([0.0, 0.3, 1.0, 2.5, 7.0])
    got = erlang_miss(T + 0.5, 4, start_s=0.5, unit_s=1.0)
    for i, x in enumerate(T):
        for l in range(1, 5):
            naive = sum(math.exp(-x) * x**k / math.factorial(k) for k in range(l))
            assert got[i, l - 1] == pytest.approx(naive, rel=1e-12, abs=1e-15)
    assert np.all(erlang_miss(np.array([0.2]), 3, start_s=0.5) == 1.0)     # before the backward starts


def test_bound_terms_by_hand():
    miss = np.array([[0.5, 0.0], [1.0, 0.9]])
    h = bound_terms(miss, 2)
    assert h[0] == pytest.approx((1 + 0.25) / (1 - 0.25) + 1.0, rel=1e-15)
    assert np.isfinite(h[1]) and h[1] > 1e11          # P = 1 is kept finite


def test_empirical_miss_estimates_erlang():
    rng = np.random.default_rng(0)
    finish = np.cumsum(rng.exponential(1.0, (20000, 3)), axis=1)
    T = np.array([0.5, 1.0, 2.0, 4.0])
    assert np.abs(empirical_miss(finish)(T) - erlang_miss(T, 3)).max() < 4 * 0.5 / math.sqrt(20000)


def _hypoexp_survival(x: float, rates: list[float]) -> float:
    """P(sum of independent Exp(rate_i) > x), distinct rates."""
    if x <= 0:
        return 1.0
    out = 0.0
    for i, ri in enumerate(rates):
        c = 1.0
        for j, rj in enumerate(rates):
            if j != i:
                c *= rj / (rj - ri)
        out += c * math.exp(-ri * x)
    return out


def test_miss_model_monte_carlo_matches_the_hypoexponential_oracle():
    # the 3-device fleet, each layer's backward time x Exp(1): device d finishes the l-th layer from the output
    # after its forward plus a sum of exponentials of means (its per-layer durations)
    text = TEXT.replace("latency_s = 0.5\n", 'latency_s = 0.5\nlayer_time = { dist = "exponential", mean = 1.0 }\n')
    scn = scenario("run.rounds=2", text=text)
    comp = build_components(scn)
    miss = miss_model(RunContext(scn, comp.fleet, comp.profile, None), 20000)
    starts = {32: 20.0, 64: 10.75, 16: 38.5}
    T = np.array([30.0, 45.0, 60.0, 90.0])
    got = miss(T)
    for i, t in enumerate(T):
        for l in range(1, 4):
            means = {s: [b / s for b in (160, 64, 480)[:l]] for s in starts}
            oracle = np.mean([_hypoexp_survival(t - starts[s], [1 / m for m in means[s]]) for s in starts])
            assert abs(got[i, l - 1] - oracle) < 0.03, (t, l, got[i, l - 1], oracle)


def test_miss_model_is_exact_for_adel_fls_model(monkeypatch):
    # one class, fixed speed and slowdown, exponential layer times, and a profile whose layers all take the same
    # backward time: the exact Erlang path, no sampling
    scn = scenario("run.rounds=2", text=TEXT.replace("latency_s = 0.5\n",
                                                     'latency_s = 0.5\nlayer_time = { dist = "exponential", mean = 2.0 }\n'))
    comp = build_components(scn)
    fleet = comp.fleet
    from dataclasses import replace

    same = replace(fleet, speed_flops=np.full(fleet.n_devices, 32.0))
    prof = comp.profile
    layers = tuple(replace(l, bwd_flops_per_sample=64) for l in prof.layers)
    prof = replace(prof, layers=layers)
    miss = miss_model(RunContext(scn, same, prof, None), 16)
    T = np.array([19.0, 21.0, 25.0, 40.0])
    start = 1.5 + prof.fwd_flops_per_sample / 32.0
    assert np.array_equal(miss(T), erlang_miss(T, 3, start, 2.0 * 2.0))


def _erlang(T):
    return erlang_miss(T, 3, 0.0, 1.0)


@pytest.mark.parametrize("participants, total", [(2, 8.0), (3, 12.0), (5, 20.0)])
def test_allocation_is_feasible_better_than_equal_and_meets_the_kkt_condition(participants, total):
    rounds, min_s = 10, 0.2
    t = allocate_deadlines(rounds, total, min_s, _erlang, participants, 1.0)
    assert t.sum() <= total and t.min() >= min_s
    w = step_weights(rounds, 1.0)
    assert objective(t, w, _erlang, participants) <= objective(np.full(rounds, total / rounds), w, _erlang,
                                                               participants)
    # at the optimum every round above min_s has the same marginal value w_t h'(T_t) (the budget's multiplier)
    eps = 1e-6
    marginal = w * (bound_terms(_erlang(t + eps), participants) - bound_terms(_erlang(t - eps), participants)) / (2 * eps)
    free = t > min_s + 1e-6
    assert np.ptp(marginal[free]) <= 0.02 * np.abs(marginal[free]).max()
    assert np.all(np.diff(t) <= 1e-6)         # the weights decrease: earlier rounds get at least as long


def test_infeasible_budget_gives_the_equal_split_only_when_tight():
    t = allocate_deadlines(4, 0.8, 0.2, _erlang, 2, 1.0)
    assert np.array_equal(t, np.full(4, 0.2))
    with pytest.raises(ValueError):
        allocate_deadlines(4, 0.7, 0.2, _erlang, 2, 1.0)


def test_adel_schedule_in_a_run(tmp_path):
    out = run(tmp_path, "run.rounds=5", "fleet.participants=2",
              'policy.deadline_s={ optimize = "adel", total_s = 0.6, min_s = 0.02 }')
    d = table(out, "rounds")["deadline_s"]
    assert len(d) == 5 and sum(d) <= 0.6 and min(d) >= 0.02
    again = run(tmp_path / "b", "run.rounds=5", "fleet.participants=2",
                'policy.deadline_s={ optimize = "adel", total_s = 0.6, min_s = 0.02 }')
    assert table(again, "rounds")["deadline_s"] == d           # seeded


@pytest.mark.parametrize("value, words", [
    ('{ optimize = "adel", total_s = 0.5, min_s = 0.2 }', ["policy.deadline_s.total_s", "0.5", "min_s = 0.2"]),
    ('{ optimize = "salf", total_s = 6, min_s = 0.02 }', ["policy.deadline_s.optimize", "salf"]),
    ('{ optimize = "adel", total_s = nan, min_s = 0.02 }', ["policy.deadline_s.total_s", "nan"]),
    ('{ optimize = "adel", total_s = 6, min_s = -1 }', ["policy.deadline_s.min_s", "-1"]),
])
def test_bad_adel_tables_are_exit_2(tmp_path, capsys, value, words):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    assert main(["validate", str(path), "--set", "run.rounds=3", "--set", f"policy.deadline_s={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("rounds, total, min_s", [(11, 0.33, 0.03), (7, 3.43, 0.49), (3, 0.3, 0.1)])
def test_a_budget_of_exactly_r_minimums_ends_at_once_up_to_rounding(rounds, total, min_s):
    """rounds * min_s and the sum of rounds min_s round apart: every deadline is min_s (no endless shaving)."""
    t = allocate_deadlines(rounds, total, min_s, _erlang, 2, 1.0)
    assert np.array_equal(t, np.full(rounds, min_s))


def test_indifferent_rounds_take_whole_edges_heaviest_first():
    """At most one round ends inside a hull edge; with weights decreasing, deadlines do not increase."""
    t = allocate_deadlines(40, 12.0, 0.05, _erlang, 2, 1.0)
    assert t.sum() <= 12.0 and t.min() >= 0.05 and np.all(np.diff(t) <= 1e-12)
