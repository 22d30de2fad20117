"""The FL server of a synchronous run: selects participants, plans their round, aggregates at the deadline.

The server implements the two callbacks of `fedsim.engine.serve_rounds`. It owns the global model and the
server-side optimizer (SGD with momentum applied to the aggregated gradient). Every random draw of round
r comes from the stream `SeedSequence(seed, spawn_key=(ROUND_STREAM, r))`, so a round's randomness does
not depend on how the run got there (resume, sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import simpy
import torch
import torch.nn.functional as F

from fedsim.engine import DeviceOutcome, RoundSetup
from fedsim.fleet import Fleet
from fedsim.grads import GradientEngine
from fedsim.profile import ModelProfile
from fedsim.scenario import Scenario, UploadMode
from fedsim.strategies import Policy, RoundInputs
from fedsim.timing import max_depth_fitting, plan_round
from fedsim.trace import TraceWriter

__all__ = ["Server", "Evaluation", "evaluate", "round_rng", "ROUND_STREAM"]

ROUND_STREAM = 7


def round_rng(seed: int, round_: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ROUND_STREAM, round_)))


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> Evaluation:
    loss_sum = 0.0
    correct = 0
    for start in range(0, len(y), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return Evaluation(loss_sum / len(y), correct / len(y))


class Server:
    def __init__(self, scenario: Scenario, model: torch.nn.Module, profile: ModelProfile, fleet: Fleet,
                 partition, dataset, trace: TraceWriter):
        self.scenario = scenario
        self.policy: Policy = scenario.policy
        self.model = model
        self.profile = profile
        self.fleet = fleet
        self.partition = partition
        self.trace = trace
        dtype = next(model.parameters()).dtype
        self.x_test = dataset.x_test.to(dtype)
        self.y_test = dataset.y_test
        self.grads = GradientEngine(model, profile, dataset.x_train, dataset.y_train,
                                    path=scenario.training.grad_path)
        t = scenario.training
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
        self.current_round = 0
        self.depth_counts = np.zeros(profile.n_layers + 1, dtype=np.int64)
        self.last_eval: Evaluation | None = None
        self._batches: list[np.ndarray] = []
        self._slowdown = np.empty(0)

    # -- engine callbacks -------------------------------------------------------------------------
    def select(self, rng: np.random.Generator) -> np.ndarray:
        k = self.scenario.fleet.participants
        n = self.fleet.n_devices
        if k is None or k >= n:
            return np.arange(n, dtype=np.int64)
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    def setup_round(self, round_: int, env: simpy.Environment) -> RoundSetup:
        rng = round_rng(self.scenario.run.seed, round_)
        devices = self.select(rng)
        batch = self.scenario.training.batch_size
        self._batches = [self.partition.sample_batch(int(d), batch, rng) for d in devices]
        self._slowdown = self.fleet.sample_slowdown(devices, rng)
        samples = np.array([len(b) for b in self._batches], dtype=np.int64)
        fleet = self.fleet
        plan = plan_round(
            self.profile, devices, fleet.speed_flops[devices], self._slowdown, samples,
            np.full(len(devices), self.scenario.training.local_steps, dtype=np.int64),
            fleet.downlink_bps[devices], fleet.uplink_bps[devices], fleet.latency_s[devices],
        )
        mode = self.scenario.network.upload_mode
        if mode is UploadMode.AFTER_COMPUTE and self.policy.deadline_s is not None:
            plan = replace(plan, target_depth=max_depth_fitting(plan, self.policy.deadline_s))
        powers = [fleet.classes[c] for c in fleet.class_of[devices]]
        return RoundSetup(round_, plan, self.policy.deadline_s, mode, powers)

    def finish_round(self, setup: RoundSetup, start_at: float, end_at: float,
                     outcomes: list[DeviceOutcome]) -> None:
        plan = setup.plan
        n_layers = self.profile.n_layers
        depths = np.array([o.depth for o in outcomes], dtype=np.int64)
        self.depth_counts += np.bincount(depths, minlength=n_layers + 1)
        inputs = RoundInputs(setup.round, n_layers, plan.devices, depths, self.depth_counts.copy(), self._batches)
        update = self.policy.aggregate(inputs, self.grads)
        self._apply(update.grads)
        if self._eval_due(setup.round):
            self.last_eval = evaluate(self.model, self.x_test, self.y_test)
            evaluation = self.last_eval
        else:
            evaluation = None
        energy_j = self._write_devices(setup, end_at, outcomes)
        self.trace.rounds.append({
            "round": setup.round, "policy": self.policy.describe(), "start_s": start_at, "end_s": end_at,
            "duration_s": end_at - start_at, "participants": plan.n,
            "delivered_any": int((depths > 0).sum()), "completed": int((depths == n_layers).sum()),
            "contributors": update.contributors.astype(np.int32).tolist(), "train_loss": update.train_loss,
            "test_loss": None if evaluation is None else evaluation.loss,
            "test_accuracy": None if evaluation is None else evaluation.accuracy,
            "energy_j": energy_j,
        })
        self.trace.end_round()

    # -- helpers ----------------------------------------------------------------------------------
    def _eval_due(self, round_: int) -> bool:
        run = self.scenario.run
        return (round_ + 1) % run.eval_every == 0 or round_ + 1 == run.rounds

    def _apply(self, grads: dict[str, torch.Tensor | None]) -> None:
        for name, p in self.model.named_parameters():
            p.grad = grads.get(name)
        self.optimizer.step()
        for p in self.model.parameters():
            p.grad = None

    def _write_devices(self, setup: RoundSetup, end_at: float, outcomes: list[DeviceOutcome]) -> float:
        plan = setup.plan
        n_layers = self.profile.n_layers
        total_j = 0.0
        rows = {name: [] for name in self.trace.devices.columns}
        for i, o in enumerate(outcomes):
            spec = setup.powers[i]
            idle_s = max(0.0, end_at - o.active_until_at)
            e_down = spec.power_rx_w * o.download_s
            e_comp = spec.power_compute_w * o.compute_s
            e_up = spec.power_tx_w * o.upload_s
            e_idle = spec.power_idle_w * idle_s
            energy = e_down + e_comp + e_up + e_idle
            total_j += energy
            device = int(plan.devices[i])
            for name, value in (
                ("round", setup.round), ("device", device), ("class", spec.name),
                ("status", o.status(n_layers).value), ("depth", o.depth), ("layers_computed", o.layers_computed),
                ("samples", int(plan.samples[i])),
                ("speed_flops", float(self.fleet.speed_flops[device] / self._slowdown[i])),
                ("download_s", o.download_s), ("compute_s", o.compute_s), ("upload_s", o.upload_s),
                ("idle_s", idle_s), ("energy_download_j", e_down), ("energy_compute_j", e_comp),
                ("energy_upload_j", e_up), ("energy_idle_j", e_idle), ("energy_j", energy),
            ):
                rows[name].append(value)
        self.trace.devices.extend(**rows)
        return total_j
