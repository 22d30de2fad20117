"""The FL server of a synchronous run: selects participants, plans their round, aggregates at the deadline.

The server implements the two callbacks of `fedsim.sim.engine.serve_rounds`. It owns the global model and the
server-side optimizer (SGD with momentum applied to the aggregated gradient). Every random draw of round
r comes from its own stream (`fedsim.seeds.keyed_rng(seed, "round", r)`), so a round's randomness does
not depend on how the run got there (resume, sweeps).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import simpy
import torch

from fedsim.world.churn import AlwaysOnline, build_availability, churn, load_availability_trace
from fedsim.world.candidates import Candidates
from fedsim.sim.engine import DeviceRound, RoundSetup, StopCause
from fedsim.sim.outcomes import RoundOutcomes
from fedsim.sim.round_setup import ParticipantClasses
from fedsim.errors import FedsimError, NumericalError
from fedsim.learn.evaluate import Evaluation, evaluate
from fedsim.world.network import Network, build_topology
from fedsim.spec.network import AccessKind, Direction, Preset
from fedsim.world.fleet import Fleet
from fedsim.learn.grads import GradientEngine
from fedsim.learn.profile import ModelProfile
from fedsim.learn.rows import full_tensor
from fedsim.spec.scenario import Scenario, UploadMode
from fedsim.learn.local import LocalTrainer
from fedsim.learn.loss import load_loss
from fedsim.policies import PolicyState, RoundContext, RoundInputs, RunContext, SyncPolicy
from fedsim.world.stragglers import cap_target_depth, draw_straggler_depths
from fedsim.world.timing import max_depth_fitting, plan_error
from fedsim.output.trace import TraceWriter
from fedsim.sim.finite_update import aggregate_finite
from fedsim.sim.health import NumericalHealth, devices_text
from fedsim.seeds import KEYED_STREAMS, component_rng, keyed_rng
from fedsim.sim.records import device_columns, round_row
from fedsim.sim.round_batches import planned_batches

__all__ = ["Server", "ServerBase", "round_rng", "ROUND_STREAM"]

ROUND_STREAM = KEYED_STREAMS["round"]


def _availability(scenario: Scenario, fleet: Fleet):
    spec = scenario.fleet
    if spec.availability_file is not None:
        return load_availability_trace(spec.availability_file, fleet.n_devices)
    return build_availability(fleet.class_of, [c.availability for c in spec.classes],
                              component_rng(scenario.run.seed, "churn"))


def _topology(scenario: Scenario, fleet: Fleet):
    """The network model, or None where every device has a plain private link (timeouts suffice)."""
    topo = scenario.network.topology
    if topo.preset is Preset.STAR and all(c.access is AccessKind.FLEET for c in topo.classes):
        return None
    return build_topology(topo, class_of=fleet.class_of, downlink_bps=fleet.downlink_bps,
                          uplink_bps=fleet.uplink_bps, latency_s=fleet.latency_s,
                          rng=component_rng(scenario.run.seed, "network"))


def round_rng(seed: int, round_: int) -> np.random.Generator:
    return keyed_rng(seed, "round", round_)


class ServerBase:
    """What every server holds: the scenario, the global model and its optimizer, the test set, the
    clock and the devices at work. `Server` (rounds) and `AsyncServer` (no rounds) build on it."""

    step_unit = "round"       # what a step is called in messages (asynchronous runs: "update")

    def __init__(self, scenario: Scenario, model: torch.nn.Module, profile: ModelProfile, fleet: Fleet,
                 partition, dataset, trace: TraceWriter | None):
        self.scenario = scenario
        self.policy = scenario.policy
        self.model = model
        self.profile = profile
        self.fleet = fleet
        self.partition = partition
        self.trace = trace
        self._test_set = (dataset.x_test.to(next(model.parameters()).dtype), dataset.y_test)
        self.input_shape = dataset.input_shape
        self.num_classes = dataset.num_classes
        self.availability = _availability(scenario, fleet)
        t = scenario.training
        self.loss = load_loss(t.loss, scenario.source)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
        self.current_round = 0       # rounds (or server updates) done
        self.clock_at = 0.0          # simulated time of the last one: the run's simulated time
        self.last_eval: Evaluation | None = None
        self.active: dict[int, DeviceRound] = {}    # device id -> its round under way
        self.health = NumericalHealth(t.divergence_factor, self.num_classes, self.step_unit)
        self.time_budget_s = scenario.run.time_budget_s
        self.ended_by: str | None = None       # "rounds", "time_budget_s" or "duration_s" once the run ends
        self.final_eval: Evaluation | None = None   # an evaluation made after the last row was written

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test inputs and labels; a test set made on demand (`fedsim.learn.rows`) is made when first asked
        for (the first evaluation)."""
        x, y = self._test_set
        if not isinstance(x, torch.Tensor):
            self._test_set = x, y = full_tensor(x), full_tensor(y)
        return x, y

    @property
    def x_test(self) -> torch.Tensor:
        return self.test_set()[0]

    @property
    def y_test(self) -> torch.Tensor:
        return self.test_set()[1]

    def last_row_values(self) -> dict:
        """What the last rounds.parquet row holds that is known only when the run has ended."""
        values: dict = {"ended_by": self.ended_by}
        if self.final_eval is not None:
            values.update(test_loss=self.final_eval.loss, test_accuracy=self.final_eval.accuracy)
        return values

    def warnings(self) -> dict:
        """What a run that completes should report (non-finite updates dropped, no update applied), as
        JSON-ready values; {} when there is nothing to report. See `NumericalHealth.warnings`."""
        return self.health.warnings()

    def weights_error(self, step: int, devices) -> NumericalError | None:
        """The error to end the run with if an update made the global weights non-finite, else None."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return None
        return NumericalError(f"{self.step_unit} {step}: training diverged: the update of {devices_text(devices)} "
                              f"made the weights non-finite ({', '.join(bad)}); lower training.lr")

    def stop_departed(self, devices: list[int], online: list[bool]) -> None:
        """Churn: end the rounds under way of the devices that went offline (`devices[i]` enters `online[i]`)."""
        for device, now_online in zip(devices, online):
            device_round = self.active.get(device)
            if not now_online and device_round is not None and device_round.is_alive:
                device_round.interrupt(StopCause.OFFLINE)


class Server(ServerBase):
    """The server of synchronous policies: one round after another."""

    def __init__(self, scenario: Scenario, model: torch.nn.Module, profile: ModelProfile, fleet: Fleet,
                 partition, dataset, trace: TraceWriter | None, grads=None):
        """`trace` None: a server that only sets rounds up (fedsim.sim.preview), writing nothing."""
        super().__init__(scenario, model, profile, fleet, partition, dataset, trace)
        self.topology = _topology(scenario, fleet)
        if self.topology is not None:
            # plans (after_compute, partial, heterofl) use the nominal rates; transfers use the network
            devices = np.arange(fleet.n_devices)
            self.fleet = replace(fleet, downlink_bps=self.topology.nominal_rate_bps(devices, Direction.DOWN),
                                 uplink_bps=self.topology.nominal_rate_bps(devices, Direction.UP),
                                 latency_s=self.topology.latency_s)
        self.network: Network | None = None
        self._watcher = None
        # `grads`: another engine with the same layer_sums, e.g. sharded on a Dask cluster (--cluster)
        self.grads = grads if grads is not None else GradientEngine(model, profile, dataset.x_train, dataset.y_train,
                                                                    path=scenario.training.grad_path, loss=self.loss)
        self.trainer = LocalTrainer(model, dataset.x_train, dataset.y_train, scenario.training.lr, loss=self.loss)
        self._submodels: dict[float, tuple[torch.nn.Module, ModelProfile]] = {}
        self.policy: SyncPolicy = scenario.policy
        # what the policy has learned so far: replaced after every round, saved in checkpoints
        run = RunContext(scenario, self.fleet, profile, self.submodel)
        self.policy_state: PolicyState | None = self.policy.start(run)
        self.schedule = self.policy.schedule(run)      # deadlines chosen before the first round, or None

    # -- engine callbacks -------------------------------------------------------------------------
    def candidates(self, now_at: float) -> Candidates:
        """Devices that can be selected at `now_at`: the online ones."""
        return self.availability.candidates(now_at)

    def offline_at(self, devices: np.ndarray, after_at: float) -> np.ndarray:
        """When each of `devices` next goes offline after `after_at` (inf: never); `after_at` itself for a device
        offline then (a policy may select one: the round then runs event by event, as churn dictates)."""
        switch_at, online = self.availability.next_switches(devices, after_at)
        return np.where(online, after_at, switch_at)

    def wait_for_devices(self, env: simpy.Environment):
        """If nobody is online, idle until the first device comes back (a round needs participants)."""
        while len(self.candidates(env.now)) == 0:
            switch_at, online = self.availability.next_switches(np.arange(self.fleet.n_devices), env.now)
            coming = switch_at[online]
            if len(coming) == 0 or not np.isfinite(coming.min()):
                raise FedsimError(self._nobody_online(env.now))
            yield env.timeout(float(coming.min()) - env.now)

    def _nobody_online(self, now_s: float) -> str:
        source = getattr(self.availability, "source", None)
        where = (f"fleet.availability_file: {source}" if source is not None
                 else "fleet.classes[*].availability")
        last = getattr(self.availability, "last_online_s", None)
        until = "" if last is None else f" (every interval ends by {last:g} s)"
        return (f"{self.scenario.source}: {where}: round {self.current_round}: no device is online at "
                f"t = {now_s:g} s and none comes back{until}")

    def watch(self, env: simpy.Environment, devices: np.ndarray) -> None:
        """Interrupt participants that go offline during the round (churn)."""
        if isinstance(self.availability, AlwaysOnline):
            return
        self._watcher = env.process(churn(env, self.availability, devices, self.stop_departed))

    def unwatch(self) -> None:
        if self._watcher is not None and self._watcher.is_alive:
            self._watcher.interrupt()
        self._watcher = None

    def setup_round(self, round_: int, env: simpy.Environment) -> RoundSetup:
        rng = round_rng(self.scenario.run.seed, round_)
        devices, self.policy_state = self.policy.select_round(round_, self.candidates(env.now),
                                                              self.scenario.fleet.participants, rng,
                                                              self.policy_state, self.model)
        devices = np.asarray(devices, dtype=np.int64)
        if hasattr(self.grads, "begin_round"):      # a sharded engine sends each device's work where its data is
            self.grads.begin_round(devices, round_=round_)
        t = self.scenario.training
        step_batches = self.partition.sample_batches(devices, t.batch_size, t.local_steps, rng)
        slowdown = self.fleet.sample_slowdown(devices, rng)
        held = self.partition.offsets[devices + 1] - self.partition.offsets[devices]
        samples = np.minimum(held, t.batch_size).astype(np.int64)        # each drawn batch's size
        mode = self.scenario.network.upload_mode
        ctx = RoundContext(round_, self.profile, self.fleet, devices, slowdown, samples,
                           np.full(len(devices), t.local_steps, dtype=np.int64), mode, t.batch_size,
                           self.submodel, self.policy_state, self.schedule,
                           self.fleet.sample_layer_time(devices, self.profile.n_layers,
                                                        keyed_rng(self.scenario.run.seed, "layer_time", round_)),
                           held)
        deadline_s = self.policy.deadline(round_, ctx)
        if deadline_s is not None and not (deadline_s > 0 and np.isfinite(deadline_s)):
            raise FedsimError(f"{self.scenario.source}: policy.name: {self.policy.describe()} set round "
                              f"{round_}'s deadline to {deadline_s!r} s; a deadline is a positive number of seconds "
                              "or None")
        plan = self.policy.plan(ctx, deadline_s)
        wrong = plan_error(plan, self.profile.n_layers)
        if wrong is not None:
            raise FedsimError(f"{self.scenario.source}: policy.name: {self.policy.describe()} planned round {round_} "
                              f"wrongly: {wrong}")
        step_batches = planned_batches(self.partition, self.scenario.run.seed, round_, plan.samples, ctx, step_batches,
                                       f"{self.scenario.source}: policy.name: {self.policy.describe()}")
        if mode is UploadMode.AFTER_COMPUTE and deadline_s is not None:
            fits = max_depth_fitting(plan, deadline_s, env.now)
            plan = replace(plan, target_depth=np.minimum(plan.target_depth, fits))
        drawn = None
        if self.scenario.fleet.depth_model is not None:      # the SALF authors' stragglers (fedsim.world.stragglers)
            drawn = draw_straggler_depths(self.scenario.fleet.depth_model, len(devices), self.profile.n_layers,
                                          keyed_rng(self.scenario.run.seed, "depth_model", round_))
            plan = cap_target_depth(plan, drawn)
        powers = ParticipantClasses(self.fleet.classes, self.fleet.class_of[devices])
        if self.topology is not None:
            if self.network is None or self.network.env is not env:
                self.network = Network(env, self.topology)
            self.network.begin_round(devices, rng)
        return RoundSetup(round_, plan, deadline_s, mode, powers,
                          self.policy.quorum(len(devices), self.scenario.fleet.participants), self.network,
                          ctx, step_batches, drawn)

    def finish_round(self, setup: RoundSetup, start_at: float, end_at: float,
                     outcomes: RoundOutcomes) -> None:
        plan = setup.plan
        assert setup.context is not None and setup.step_batches is not None
        self.clock_at = end_at
        if self.scenario.training.lr_schedule is not None:
            self._set_lr(self.scenario.training.lr_at(setup.round, self.scenario.run.rounds))
        n_layers = self.profile.n_layers
        depths = outcomes.depth
        inputs = RoundInputs(setup.context, depths, plan.samples, plan.steps, setup.step_batches,
                             outcomes.done_order(), setup.quorum, self.trainer)
        update, dropped, error = aggregate_finite(self.policy, self.grads, inputs, self.model,
                                                   self.scenario.training.on_nonfinite)
        outcomes.nonfinite[list(dropped)] = True
        if error is None:
            self._apply(update.grads, update.frozen, update.weights)
            live = depths > 0
            live[dropped] = False
            counted = plan.devices[live].tolist()
            error = self.weights_error(setup.round, counted)
        evaluation = None
        if error is None:
            if dropped:          # what the policy learns from: the round as aggregated
                kept = depths.copy()
                kept[dropped] = 0
                inputs = replace(inputs, depths=kept)
            self.policy_state = self.policy.observe(self.policy_state, inputs)
            if self._eval_due(setup.round):
                self.last_eval = evaluate(self.model, self.x_test, self.y_test, loss=self.loss)
                evaluation = self.last_eval
        energy_j = self._write_devices(setup, end_at, outcomes)
        self.trace.rounds.append(round_row(
            setup.round, self.policy.describe(), start_at, end_at, plan.n, int((depths > 0).sum()),
            int((depths == n_layers).sum()), update.contributors, update.train_loss, evaluation, energy_j,
            deadline_s=setup.deadline_s))
        self.trace.end_round()          # the round is in the trace even when it ends the run
        if error is not None:
            raise error
        self.health.record(setup.round, update.train_loss, [int(plan.devices[i]) for i in dropped])
        if setup.round + 1 >= self.scenario.run.rounds:
            self.health.finish(setup.round, evaluation)

    def out_of_time(self, round_: int, end_at: float) -> None:
        """Round `round_` would end at `end_at`, after run.time_budget_s: the run ends with the round before
        (evaluated now if it was not, the value going into its row when the trace is closed)."""
        if round_ == 0:
            raise FedsimError(f"{self.scenario.source}: run.time_budget_s: round 0 would end at {end_at:g} s, "
                              f"after the budget of {self.time_budget_s:g} s; no round fits")
        self.ended_by = "time_budget_s"
        last = round_ - 1
        if not self._eval_due(last):
            self.last_eval = self.final_eval = evaluate(self.model, self.x_test, self.y_test, loss=self.loss)
        self.health.finish(last, self.last_eval)

    def submodel(self, width: float):
        """The global architecture at `width` (HeteroFL) and its profile, built once per width."""
        if width not in self._submodels:
            from fedsim.learn.models import build_model
            from fedsim.learn.profile import build_profile

            sub = build_model(self.scenario.model.name, self.input_shape, self.num_classes,
                              generator=torch.Generator().manual_seed(0), width=width,
                              dtype=next(self.model.parameters()).dtype, source=self.scenario.source)
            self._submodels[width] = (sub, build_profile(sub, self.input_shape, self.profile.granularity))
        return self._submodels[width]

    # -- helpers ----------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        """The round's learning rate (training.lr_schedule): the server's step and the devices' local steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.trainer.lr = lr

    def _eval_due(self, round_: int) -> bool:
        run = self.scenario.run
        return (round_ + 1) % run.eval_every == 0 or round_ + 1 == run.rounds

    def _apply(self, grads: dict[str, torch.Tensor | None], frozen: dict[str, torch.Tensor] | None = None,
               weights: dict[str, torch.Tensor] | None = None) -> None:
        params = dict(self.model.named_parameters())
        if weights is not None:          # the policy is the server optimizer (RoundUpdate.weights)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name])
            return
        keep = {n: params[n].detach()[m].clone() for n, m in (frozen or {}).items()}
        for name, p in params.items():
            p.grad = grads.get(name)
        self.optimizer.step()
        with torch.no_grad():
            for name, values in keep.items():      # entries no device held stay exactly as they were
                params[name][frozen[name]] = values
        for p in params.values():
            p.grad = None

    def _write_devices(self, setup: RoundSetup, end_at: float, outcomes: RoundOutcomes) -> float:
        """The round's devices rows; returns the fleet's energy in the round (joules)."""
        plan = setup.plan
        assert setup.context is not None
        devices = plan.devices
        idle = end_at - outcomes.active_until_at
        speed_flops = self.fleet.speed_flops[devices] / setup.context.slowdown
        columns, total_j = device_columns(setup.round, devices, self.fleet.class_of[devices], self.fleet.classes,
                                          outcomes.statuses(self.profile.n_layers), plan.samples, speed_flops,
                                          outcomes, np.where(idle > 0.0, idle, 0.0))   # max(0.0, idle), as a row does
        self.trace.devices.extend_arrays(**columns)
        return total_j
