"""The synchronous policy protocol: one hook per decision of a round.

`fedsim.sim.server.Server` asks, in this order, each round:

    select(candidates, k, rng)       which online devices take part (called by `select_round(round, candidates,
                                     k, rng, state, model)`, which may also update the state for the round);
                                     `candidates` is a `fedsim.world.candidates.Candidates`: its size, the ids
                                     at some positions (`take`), all of them (`ids()`, `np.asarray`)
    deadline(round, ctx)             the round's deadline in seconds from its start, or None (no deadline)
    plan(ctx, deadline_s)            the work each participant attempts (a `RoundPlan`)
    quorum(n_selected, k)            end the round once this many participants are done (None: never early)
    aggregate(inputs, grads)         the global update from what each participant delivered
    observe(state, inputs)           what the policy has learned from the round (its next `PolicyState`)

and `start(run)` and `schedule(run)` once, before the first round, for the initial state and the deadlines
chosen ahead for every round (handed to each round as `ctx.schedule`). Only `read` and `aggregate` must be
written; the other hooks default to a plain synchronous round (everyone selected, or `k` of them uniformly;
the whole mini-batch; no early end; no state). A policy is a frozen value: everything that changes during a
run is in `ctx.state` (`RoundContext`), which `observe` returns anew.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

from fedsim.policies.base import PolicyBase, PolicyState
from fedsim.spec.scenario import Scenario, UploadMode
from fedsim.world.candidates import Candidates
from fedsim.world.fleet import Fleet
from fedsim.world.timing import RoundPlan, plan_round

if TYPE_CHECKING:       # annotations only: describing the policies (`fedsim policies`) imports no torch
    import torch

    from fedsim.learn.grads import GradientEngine
    from fedsim.learn.local import LocalTrainer
    from fedsim.learn.profile import ModelProfile

__all__ = ["RunContext", "RoundContext", "RoundInputs", "RoundUpdate", "Submodel", "SyncPolicy"]

# width ratio -> the global architecture at that width and its profile (HeteroFL), built once per width
Submodel = Callable[[float], "tuple[torch.nn.Module, ModelProfile]"]


@dataclass(frozen=True)
class RunContext:
    """What a policy may use to set up its state before the first round."""
    scenario: Scenario
    fleet: Fleet                 # nominal link rates where a network topology is simulated
    profile: ModelProfile        # of the global model
    submodel: Submodel


@dataclass(frozen=True)
class RoundContext:
    """What a policy may use to choose a round's deadline and plan its participants' work."""
    round: int
    profile: ModelProfile        # of the global model
    fleet: Fleet
    devices: np.ndarray          # participant ids
    slowdown: np.ndarray         # each participant's duration multiplier in this round
    samples: np.ndarray          # samples per step each participant would process (its batch)
    steps: np.ndarray            # local steps each participant would run
    upload_mode: UploadMode
    batch_size: int
    submodel: Submodel
    state: PolicyState | None    # what the policy has learned before this round
    schedule: tuple[float, ...] | None = None   # every round's deadline, if chosen before the first round
    layer_time: np.ndarray | None = None   # (n, L) backward multipliers this round, backward order (None: 1)
    held: np.ndarray | None = None   # training samples each participant holds: the largest batch it can plan

    def plan(self, rows: np.ndarray | None = None, profile: ModelProfile | None = None,
             samples: np.ndarray | None = None, steps: np.ndarray | None = None,
             step_overhead: bool = True) -> RoundPlan:
        """`fedsim.world.timing.plan_round` for participants `rows` (all by default): the expected durations.
        `step_overhead` False leaves the fixed cost of each step out (the FLOPs' durations only)."""
        rows = np.arange(len(self.devices)) if rows is None else rows
        d = self.devices[rows]
        f = self.fleet
        return plan_round(profile or self.profile, d, f.speed_flops[d], self.slowdown[rows],
                          self.samples[rows] if samples is None else samples,
                          self.steps[rows] if steps is None else steps,
                          f.downlink_bps[d], f.uplink_bps[d], f.latency_s[d],
                          layer_time=None if self.layer_time is None else self.layer_time[rows],
                          step_overhead_s=f.step_overhead_s(d) if step_overhead else None)

    def step_overhead_s(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Each participant's fixed seconds per local step in this round (slowdown included); None: none."""
        rows = np.arange(len(self.devices)) if rows is None else rows
        overhead = self.fleet.step_overhead_s(self.devices[rows])
        return None if overhead is None else self.slowdown[rows] * overhead


@dataclass(frozen=True)
class RoundInputs:
    """What the server knows when the round ends."""
    context: RoundContext                    # what the round was planned from
    depths: np.ndarray                       # layers delivered by each participant (the last `depth` layers)
    samples: np.ndarray                      # samples per step each participant processed (its plan)
    steps: np.ndarray                        # local steps each participant ran (its plan)
    step_batches: list[list[np.ndarray]]     # training-sample indices of every local step's mini-batch
    done_order: np.ndarray                   # participants (positions) in the order they finished
    quorum: int | None                       # the round's quorum, if the policy set one
    trainer: LocalTrainer | None             # local training, for policies that average local updates

    @property
    def round(self) -> int:
        return self.context.round

    @property
    def n_layers(self) -> int:
        return self.context.profile.n_layers

    @property
    def devices(self) -> np.ndarray:
        return self.context.devices

    @property
    def batches(self) -> list[np.ndarray]:
        """Each participant's first mini-batch (the one FedSGD differentiates)."""
        return [b[0] for b in self.step_batches]

    @property
    def state(self) -> PolicyState | None:
        return self.context.state


@dataclass(frozen=True)
class RoundUpdate:
    grads: dict[str, torch.Tensor | None]   # applied by the server optimizer; None leaves a tensor unchanged
    contributors: np.ndarray                # devices aggregated into each layer (forward order)
    train_loss: float | None                # mean mini-batch loss over the contributing devices
    frozen: dict[str, torch.Tensor] | None = None   # entries no device held (HeteroFL): left unchanged
    # the new global parameters, assigned as they are instead of an optimizer step (the server's optimizer,
    # and so training.momentum, is not used for this round): policies that are their own server optimizer
    # (flower). Every parameter must be given; `grads` is then all None.
    weights: dict[str, torch.Tensor] | None = None


class SyncPolicy(PolicyBase):
    """Base class of every synchronous straggler policy (see the module docstring for the hooks' order)."""

    kind: ClassVar[str] = "sync"

    @abstractmethod
    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        """The global update from what each participant delivered."""

    def start(self, run: RunContext) -> PolicyState | None:
        """The state before the first round (None: the policy learns nothing)."""
        return None

    def schedule(self, run: RunContext) -> tuple[float, ...] | None:
        """Every round's deadline, chosen before the first round (None: `deadline` decides round by round)."""
        return None

    def select(self, candidates: Candidates, k: int | None, rng: np.random.Generator) -> np.ndarray:
        """Participants among the online `candidates`: all, or `k` sampled uniformly (positions drawn as
        `rng.choice(ids, k, replace=False)` draws them, without listing the ids)."""
        if k is None or k >= len(candidates):
            return candidates.ids()
        return np.sort(candidates.take(rng.choice(len(candidates), size=k, replace=False)))

    def select_round(self, round_: int, candidates: Candidates, k: int | None, rng: np.random.Generator,
                     state: PolicyState | None, model: torch.nn.Module) -> tuple[np.ndarray, PolicyState | None]:
        """The participants of round `round_` and the state the round is planned and aggregated with
        (`RoundContext.state`), given the global `model` (read only). The default is `select`, the state
        unchanged; a policy whose choice depends on what it has learned or on the model overrides this one
        (flower: the strategy's `configure_train`)."""
        return self.select(candidates, k, rng), state

    def deadline(self, round_: int, ctx: RoundContext) -> float | None:
        """Seconds from the round's start after which the server aggregates what arrived; None: no deadline."""
        return None

    def plan(self, ctx: RoundContext, deadline_s: float | None) -> RoundPlan:
        """The work each participant attempts; the default is the whole mini-batch on every local step.

        `RoundPlan.samples` is each participant's batch, at most `ctx.held`: fewer than `ctx.samples` takes the
        first samples of its drawn mini-batches, more draws them anew at that size (the server does both)."""
        return ctx.plan()

    def quorum(self, n_selected: int, k: int | None) -> int | None:
        """End the round once this many participants are done (None: wait for all or the deadline)."""
        return None

    def observe(self, state: PolicyState | None, inputs: RoundInputs) -> PolicyState | None:
        """The state after the round (`inputs`); called once the round's update is applied."""
        return state
