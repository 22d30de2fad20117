"""flower: run a Flower server strategy (message API, `flwr.serverapp.strategy.Strategy`) on the simulated fleet.

    [policy]
    name = "flower"
    strategy = "flwr.serverapp.strategy:FedAvg"     # any import path of a Strategy subclass
    strategy_args = { fraction_train = 0.5 }        # passed to its constructor
    deadline_s = 0.2                                # optional: the round's timeout in simulated seconds

Each round (Flower's `server_round` = fedsim's round + 1):

1. `select_round`: the strategy's `configure_train(server_round, arrays, ConfigRecord(), grid)` on a copy of
   the strategy; the grid's nodes are the devices online at the round's start (node id = 1,000,000 + device
   id) and `arrays` the global model's parameters. The devices it sends a train message to take part.
2. The engine simulates their round (download, forward, backward, upload) with the fleet's timing model; the
   round ends when all have delivered or at `deadline_s`.
3. `aggregate`: every device that delivered its whole model trains for real (fedsim's local trainer:
   `training.local_steps` SGD steps at `training.lr` on its mini-batches, from the arrays it was sent, with
   FedProx's proximal term when the config carries `proximal-mu`); its reply holds its parameters and
   `num-examples` (samples it trained on). The others get an error reply (a Flower timeout). The replies,
   in simulated arrival order and the failures last, go to `aggregate_train` on a copy of the configured
   strategy; the ArrayRecord it returns becomes the new global model (`RoundUpdate.weights`; None keeps the
   model, as Flower's own loop does).
4. `observe`: the strategy that aggregated the applied update is the state for the next round.

fedsim evaluates centrally (`run.eval_every`): `configure_evaluate`/`aggregate_evaluate` are not called. The
strategy is the server optimizer, so the scenario's `training.momentum` must be 0, and it chooses the
participants, so `fleet.participants` must be "all". Flower is imported only here, when the policy is read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedsim.errors import FedsimError, ScenarioError
from fedsim.policies.base import JSONValue, PolicyState
from fedsim.policies.sync import RoundContext, RoundInputs, RoundUpdate, RunContext, SyncPolicy
from fedsim.spec.fields import Fields
from fedsim.spec.plugins import call_plugin, load_plugin
from fedsim.spec.scenario import Scenario, TrainingSpec
from fedsim.world.candidates import Candidates

if TYPE_CHECKING:
    import torch

    from fedsim.learn.grads import GradientEngine

__all__ = ["Flower"]

INSTALL = 'pip install "fedsim[flower]"'


def _flower(source: str, field: str):
    """The module fedsim.policies.flower_messages (which imports flwr), or a ScenarioError saying what to install."""
    try:
        from fedsim.policies import flower_messages
    except ImportError as exc:
        raise ScenarioError(source, field, f"the flower policy needs Flower ({INSTALL}): "
                                           f"{type(exc).__name__}: {exc}") from None
    return flower_messages


@dataclass(frozen=True)
class Flower(SyncPolicy):
    name: ClassVar[str] = "flower"
    reads: ClassVar[frozenset[str]] = frozenset({"strategy", "strategy_args", "deadline_s"})
    strategy: str                       # import path of the Strategy subclass
    strategy_args: str = "{}"           # its constructor's keyword arguments, as canonical JSON text
    deadline_s: float | None = None

    @classmethod
    def read(cls, fields: Fields, training: TrainingSpec) -> "Flower":
        path = fields.string("strategy")
        args = fields.sub("strategy_args", default_empty=True).table
        try:
            args_json = json.dumps(args, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise fields.error("strategy_args", f"must hold numbers, strings, booleans, arrays and tables ({exc})")
        deadline_s = fields.optional_number("deadline_s", low=0.0, low_open=True)
        policy = cls(path, args_json, deadline_s)
        policy._new_strategy(fields.source)            # the class and its arguments, checked before the run
        return policy

    def _strategy_class(self, source: str) -> type:
        fm = _flower(source, "policy.name")
        return load_plugin(self.strategy, group=None, builtins={}, source=source, field="policy.strategy",
                           kind="Flower strategy", form="package.module:Class", check=fm.is_strategy_class,
                           expected="a subclass of flwr.serverapp.strategy.Strategy (Flower's message API; "
                                    "the legacy flwr.server.strategy API is not supported)")

    def _new_strategy(self, source: str):
        klass = self._strategy_class(source)
        args = json.loads(self.strategy_args)
        return call_plugin(lambda: klass(**args), source=source, field="policy.strategy_args",
                           label=f"Flower strategy {self.strategy!r}")

    @property
    def label(self) -> str:
        return f"policy.strategy {self.strategy!r}"

    def check(self, scenario: Scenario) -> None:
        t = scenario.training
        if t.momentum != 0:
            raise ScenarioError(scenario.source, "training.momentum",
                                "the flower policy's strategy is the server optimizer (its result replaces the "
                                f"global model), so the server's momentum is not used; set it to 0, got {t.momentum:g}")
        if scenario.fleet.participants is not None:
            raise ScenarioError(scenario.source, "fleet.participants",
                                "the Flower strategy chooses the participants (FedAvg's fraction_train, "
                                f"min_train_nodes); set it to \"all\", got {scenario.fleet.participants}")

    def describe(self) -> str:
        return f"flower({self.strategy.rsplit(':', 1)[-1].rsplit('.', 1)[-1]})"

    # -- state -----------------------------------------------------------------------------------
    def start(self, run: RunContext) -> PolicyState | None:
        fm = _flower(run.scenario.source, "policy.name")
        return fm.FlowerState(self._new_strategy(run.scenario.source), run.scenario.run.seed, self.label)

    def restore(self, data: JSONValue) -> PolicyState | None:
        fm = _flower("<checkpoint>", "policy.name")
        return fm.FlowerState.from_json(data, self.label)

    # -- a round ---------------------------------------------------------------------------------
    def select_round(self, round_: int, candidates: Candidates, k: int | None, rng: np.random.Generator,
                     state: PolicyState | None, model: torch.nn.Module) -> tuple[np.ndarray, PolicyState | None]:
        fm = _flower("<run>", "policy.name")
        assert isinstance(state, fm.FlowerState), "flower's state is made by its start"
        server_round = round_ + 1
        configured = copy.deepcopy(state.strategy)
        grid = fm.FleetGrid(candidates.ids(), self.label, server_round)
        self._enough_nodes(configured, len(candidates), server_round)
        arrays = fm.model_arrays(model)
        messages = fm.call_strategy(self.label, "configure_train", server_round, state.seed,
                                    lambda: fm.listed(configured.configure_train(server_round, arrays,
                                                                                 fm.ConfigRecord(), grid)))
        by_device = fm.train_messages(messages, grid, self.label, server_round)
        if not by_device:
            raise FedsimError(f"{self.label}: round {server_round}: configure_train chose no node of the "
                              f"{len(candidates)} online devices; fedsim's rounds need participants")
        devices = np.array(sorted(by_device), dtype=np.int64)
        return devices, fm.FlowerState(state.strategy, state.seed, self.label, fm.FlowerRound(configured, by_device))

    def _enough_nodes(self, strategy: object, online: int, server_round: int) -> None:
        """FedAvg and its kind wait (sleeping, in wall time) for `min_available_nodes`: refuse that at once."""
        need = max(int(getattr(strategy, "min_available_nodes", 0) or 0),
                   int(getattr(strategy, "min_train_nodes", 0) or 0))
        if online < need:
            raise FedsimError(f"{self.label}: round {server_round}: {online} devices are online, the strategy "
                              f"waits for {need} (min_available_nodes / min_train_nodes); lower them in "
                              "policy.strategy_args")

    def deadline(self, round_: int, ctx: RoundContext) -> float | None:
        return self.deadline_s

    def aggregate(self, inputs: RoundInputs, grads: GradientEngine) -> RoundUpdate:
        fm = _flower("<run>", "policy.name")
        state = inputs.state
        assert isinstance(state, fm.FlowerState) and state.current is not None
        trainer = inputs.trainer
        assert trainer is not None, "flower needs the server's LocalTrainer"
        server_round = inputs.round + 1
        current = state.current
        delivered = [int(i) for i in inputs.done_order if inputs.depths[i] == inputs.n_layers]
        replies, losses, starts = [], [], {}
        for i in delivered:
            message = current.messages[int(inputs.devices[i])]
            record = next(iter(message.content.array_records.values()))
            if id(record) not in starts:
                starts[id(record)] = fm.record_tensors(record, trainer.model, f"{self.label}: round {server_round}: "
                                                                              "the arrays configure_train sent")
            mu = fm.sent_config(message).get("proximal-mu", 0.0)
            steps = int(inputs.steps[i])
            batches = [b[: int(inputs.samples[i])] for b in inputs.step_batches[i][:steps]]
            start = starts[id(record)]
            result = trainer.train(batches, None, int(inputs.devices[i]), start=start, prox_mu=float(mu))
            local = {n: start[n] - result.delta[n] for n in start}
            replies.append(fm.train_reply(message, local, sum(len(b) for b in batches), result.loss))
            losses.append(result.loss)
        for i in np.flatnonzero(inputs.depths < inputs.n_layers):
            device = int(inputs.devices[i])
            replies.append(fm.failure_reply(current.messages[device], self._missed(device, server_round),
                                            offline=self.deadline_s is None))
        strategy = copy.deepcopy(current.configured)
        result = fm.call_strategy(self.label, "aggregate_train", server_round, state.seed,
                                  lambda: strategy.aggregate_train(server_round, list(replies)))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise FedsimError(f"{self.label}: round {server_round}: aggregate_train returned "
                              f"{type(result).__name__}, not a tuple (ArrayRecord or None, MetricRecord or None)")
        current.aggregated[inputs.depths.tobytes()] = strategy
        arrays = result[0]
        params = [n for n, _ in trainer.model.named_parameters()]
        contributors = np.full(inputs.n_layers, len(delivered), dtype=np.int64)
        train_loss = float(np.mean(losses)) if losses else None
        if arrays is None:           # as in Flower's own loop: the model stays
            return RoundUpdate({n: None for n in params}, np.zeros_like(contributors), train_loss)
        weights = fm.record_tensors(arrays, trainer.model, f"{self.label}: round {server_round}: what "
                                                           "aggregate_train returned")
        return RoundUpdate({n: None for n in params}, contributors, train_loss, weights=weights)

    def _missed(self, device: int, server_round: int) -> str:
        if self.deadline_s is None:
            return f"fedsim: device {device} went offline in round {server_round}"
        return (f"fedsim: device {device} did not deliver by round {server_round}'s deadline of {self.deadline_s:g} s "
                "(or went offline)")

    def observe(self, state: PolicyState | None, inputs: RoundInputs) -> PolicyState | None:
        fm = _flower("<run>", "policy.name")
        assert isinstance(state, fm.FlowerState) and state.current is not None
        strategy = state.current.aggregated.get(inputs.depths.tobytes())
        assert strategy is not None, "observe follows the aggregation the server applied"
        return fm.FlowerState(strategy, state.seed, self.label)
