"""`policy.deadline_s = { optimize = "adel", total_s = T, min_s = t }`: ADEL-FL's per-round deadlines.

Before round 0 the R = `run.rounds` deadlines are chosen by minimising SALF's unrolled convergence bound under
the time budget (`fedsim.policies.adel_bound`). P_l(T), the probability that a participant has not finished
the l-th layer from the output by T, comes from the scenario's own timing model: a Monte Carlo sample of
device-rounds (a device drawn uniformly from the fleet, its slowdown and per-layer `layer_time` multipliers
drawn from its class, durations from `fedsim.world.timing.plan_round` at `training.batch_size`; the
`adel` component stream of the seed), or exactly, `gammaincc`, when the scenario is ADEL-FL's model: every
class's `layer_time` exponential with one mean, fixed slowdowns, and every device with the same download and
forward time and the same backward time for every layer. Uploads are not in P_l (the paper's ideal mode).
With salf's `batch_scaling` the deadlines are chosen the same way (at `training.batch_size`); each round then
scales the batches to its deadline (`fedsim.policies.batch_scaling`). With `training.lr_schedule` the bound's
steps follow the schedule's shape (`adel_bound.step_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import ScenarioError
from fedsim.policies.adel_bound import allocate_deadlines, empirical_miss, erlang_miss, feasible
from fedsim.policies.schedules import DeadlineSchedule
from fedsim.policies.sync import RunContext
from fedsim.seeds import component_rng
from fedsim.spec.distributions import DistKind
from fedsim.spec.fields import Fields
from fedsim.spec.scenario import Scenario
from fedsim.world.timing import RoundPlan, plan_round

__all__ = ["AdelSchedule", "miss_model", "read_adel_schedule"]

AUTHORS_KAPPA = 1.0 / 0.3      # rho_s / rho_c of the authors' configuration (rho_s = 1, rho_c = 0.3)


@dataclass(frozen=True)
class AdelSchedule(DeadlineSchedule):
    total_s: float
    min_s: float
    kappa: float = AUTHORS_KAPPA
    samples: int = 4096

    def check(self, scenario: Scenario) -> None:
        rounds = scenario.run.rounds
        if not feasible(self.total_s, rounds, self.min_s):
            raise ScenarioError(scenario.source, "policy.deadline_s.total_s",
                                f"{self.total_s:g} s cannot give run.rounds = {rounds} rounds at least min_s = "
                                f"{self.min_s:.12g} s each (needs >= {rounds * self.min_s:.12g} s)")

    def resolve(self, run: RunContext, rounds: int) -> tuple[float, ...]:
        fleet = run.fleet
        participants = run.scenario.fleet.participants or fleet.n_devices
        miss = miss_model(run, self.samples)
        t = run.scenario.training
        shape = None
        if t.lr_schedule is not None:           # the bound's steps follow the run's own schedule
            rates = np.array(t.lr_schedule.rates(t.lr, rounds))
            shape = rates / rates[0]
        return tuple(allocate_deadlines(rounds, self.total_s, self.min_s, miss, participants, self.kappa,
                                        shape).tolist())

    def __str__(self) -> str:
        return f"adel (total {self.total_s:g} s, min {self.min_s:g} s)"


def read_adel_schedule(table: Fields) -> AdelSchedule:
    table.choice("optimize", ["adel"])
    return AdelSchedule(total_s=table.number("total_s", low=0.0, low_open=True),
                        min_s=table.number("min_s", low=0.0, low_open=True),
                        kappa=table.number("kappa", AUTHORS_KAPPA, low=0.0, low_open=True, high=1e6),
                        samples=table.integer("samples", 4096, low=16, high=10_000_000))


def _finish_times(plan: RoundPlan) -> np.ndarray:
    """(n, L): when each device finishes the l-th layer from the output (column l-1), from the round's start."""
    return (plan.download_s + plan.forward_s)[:, None] + np.cumsum(plan.backward_s, axis=1)


def miss_model(run: RunContext, samples: int):
    """P_l(T) of this scenario: exact (Erlang) for ADEL-FL's model, else a seeded Monte Carlo estimate."""
    scn, fleet, profile = run.scenario, run.fleet, run.profile
    t = scn.training
    classes = fleet.classes
    n_layers = profile.n_layers

    def plan_for(devices, slowdown, layer_time):
        n = len(devices)
        return plan_round(profile, devices, fleet.speed_flops[devices], slowdown,
                          np.full(n, t.batch_size, dtype=np.int64), np.full(n, t.local_steps, dtype=np.int64),
                          fleet.downlink_bps[devices], fleet.uplink_bps[devices], fleet.latency_s[devices],
                          layer_time=layer_time, step_overhead_s=fleet.step_overhead_s(devices))

    means = {c.layer_time.a for c in classes if c.layer_time.kind is DistKind.EXPONENTIAL}
    exponential = len(means) == 1 and all(c.layer_time.kind is DistKind.EXPONENTIAL for c in classes)
    if exponential and all(c.slowdown.kind is DistKind.FIXED for c in classes):
        devices = np.arange(fleet.n_devices)
        slowdown = np.array([classes[c].slowdown.a for c in fleet.class_of])
        plan = plan_for(devices, slowdown, None)
        start = plan.download_s + plan.forward_s
        if np.all(start == start[0]) and np.all(plan.backward_s == plan.backward_s[0, 0]):
            unit_s = float(plan.backward_s[0, 0]) * means.pop()
            return lambda deadlines: erlang_miss(deadlines, n_layers, float(start[0]), unit_s)
    rng = component_rng(scn.run.seed, "adel")
    devices = rng.integers(0, fleet.n_devices, samples)
    slowdown = fleet.sample_slowdown(devices, rng)
    layer_time = fleet.sample_layer_time(devices, n_layers, rng)
    return empirical_miss(_finish_times(plan_for(devices, slowdown, layer_time)))
