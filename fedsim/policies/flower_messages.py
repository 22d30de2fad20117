"""The Flower side of the `flower` policy: a fedsim round as Flower messages.

This module imports `flwr` (the `fedsim[flower]` extra); `fedsim.policies.flower` imports it only when a
scenario names the flower policy, so fedsim itself imports without Flower.

What it provides: `FleetGrid`, the Flower `Grid` a strategy's `configure_train` sees (its nodes are the
devices online at the round's start, node id = `NODE_BASE` + device id); `call_strategy`, which runs a
strategy's hook with Python's and NumPy's global random generators seeded from the run's seed (Flower's
`sample_nodes` draws from `random`) and turns whatever it raises into one error naming the strategy and the
round; the conversion between the global model's parameters and an `ArrayRecord`; the reply messages
(a delivered device's arrays and `num-examples`, or an error reply for a device that did not deliver); and
`FlowerState`, the live strategy object as a `PolicyState` (pickled into the checkpoint's JSON as base64).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import pickle
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedsim.errors import FedsimError
from fedsim.policies.base import JSONValue, PolicyState
from fedsim.seeds import keyed_rng

__all__ = ["NODE_BASE", "FleetGrid", "FlowerRound", "FlowerState", "StrategyError", "call_strategy",
           "failure_reply", "is_strategy_class", "listed", "model_arrays", "record_tensors", "sent_config", "train_messages",
           "train_reply"]

NODE_BASE = 1_000_000        # device d is Flower node NODE_BASE + d (ids 0 and 1 are Flower's own)
_MAX_NODE_POLLS = 10         # get_node_ids calls in one configure_train: more is a strategy waiting for nodes
T = TypeVar("T")


class StrategyError(FedsimError):
    """A Flower strategy raised, returned something unusable, or asked for what fedsim cannot simulate."""


def is_strategy_class(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Strategy)


class FleetGrid(Grid):
    """The grid of one round: the online devices as nodes. fedsim sends the messages and simulates the
    replies itself, so a strategy that pushes or pulls messages on its own is refused."""

    def __init__(self, devices: np.ndarray, label: str, server_round: int):
        self._nodes = [NODE_BASE + int(d) for d in devices]
        self._label = label
        self._round = server_round
        self._polls = 0
        self._run = None

    @property
    def nodes(self) -> list[int]:
        """The node ids (without counting as a poll of get_node_ids)."""
        return list(self._nodes)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._polls += 1
        if self._polls > _MAX_NODE_POLLS:
            raise StrategyError(f"{self._label}: round {self._round}: configure_train asked for the nodes "
                                f"{self._polls} times, waiting for more than the {len(self._nodes)} online devices; "
                                "fedsim's grid does not grow while a strategy waits (lower its min_available_nodes)")
        return list(self._nodes)

    def _refuse(self, what: str):
        raise StrategyError(f"{self._label}: round {self._round}: the strategy called Grid.{what}; fedsim sends "
                            "the messages configure_train returns and simulates the replies itself")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._refuse("push_messages")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._refuse("pull_messages")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._refuse("send_and_receive")


@contextlib.contextmanager
def _seeded_and_quiet(seed: int, round_: int) -> Iterator[None]:
    """Python's and NumPy's global generators seeded for round `round_`, Flower's INFO log (a few lines per
    round and per reply) off, and the identity of a ServerApp task set (Flower's messages read it); all
    restored afterwards."""
    rng = keyed_rng(seed, "flower", round_)
    py_state, np_state = random.getstate(), np.random.get_state()
    logger = logging.getLogger("flwr")
    level = logger.level
    identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    random.seed(int(rng.integers(2**63)))
    np.random.seed(int(rng.integers(2**32)))
    logger.setLevel(max(level, logging.WARNING))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        logger.setLevel(level)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity


def call_strategy(label: str, hook: str, server_round: int, seed: int, function: Callable[[], T]) -> T:
    """`function()`, a call of the strategy's `hook`: seeded, and any exception an error naming both."""
    try:
        with _seeded_and_quiet(seed, server_round):
            return function()
    except FedsimError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        text = " ".join(str(exc).split())
        raise StrategyError(f"{label}: round {server_round}: {hook} raised {type(exc).__name__}: "
                            f"{text[:300]}") from None


def model_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The global model's parameters (not buffers) as an ArrayRecord, keyed by parameter name."""
    return ArrayRecord({n: p.detach().clone() for n, p in model.named_parameters()})


def record_tensors(record: ArrayRecord, model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """An ArrayRecord as the model's parameters (same names and shapes, the model's dtype); else an error
    naming `what` (the strategy, the round and the hook)."""
    params = dict(model.named_parameters())
    if not isinstance(record, ArrayRecord):
        raise StrategyError(f"{what} is not an ArrayRecord, got {type(record).__name__}")
    if set(record.keys()) != set(params):
        missing, extra = sorted(set(params) - set(record.keys())), sorted(set(record.keys()) - set(params))
        raise StrategyError(f"{what} does not hold the model's parameters (missing {missing}, unknown {extra})")
    out = {}
    for name, p in params.items():
        values = torch.from_numpy(np.array(record[name].numpy())).to(p.dtype)
        if values.shape != p.shape:
            raise StrategyError(f"{what}: {name} has shape {tuple(values.shape)}, the model's is {tuple(p.shape)}")
        out[name] = values
    return out


def train_reply(message: Message, local: dict[str, torch.Tensor], num_examples: int, loss: float) -> Message:
    """The reply of a device that delivered: its trained parameters and what Flower's FedAvg weighs by."""
    content = RecordDict({"arrays": ArrayRecord({n: t.detach() for n, t in local.items()}),
                          "metrics": MetricRecord({"num-examples": int(num_examples), "train_loss": float(loss)})})
    return Message(content, reply_to=message)


def failure_reply(message: Message, reason: str, offline: bool) -> Message:
    """The error reply of a device that did not deliver (as a Flower timeout or a lost node reports it)."""
    code = ErrorCode.NODE_UNAVAILABLE if offline else ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    return Message(Error(code=code, reason=reason), reply_to=message)


def sent_config(message: Message) -> ConfigRecord:
    """The config a train message carries (its ConfigRecords merged; empty if none)."""
    merged = ConfigRecord()
    for record in message.content.config_records.values():
        merged.update(record)
    return merged


def listed(value: object) -> object:
    """What configure_train returned, as a list if it is an iterable (a generator runs here), else as it is."""
    return list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else value


def train_messages(messages: object, grid: FleetGrid, label: str, server_round: int) -> dict[int, Message]:
    """What configure_train returned, checked, by device: train messages to distinct online nodes, each
    carrying one ArrayRecord."""
    what = f"{label}: round {server_round}: configure_train"
    if messages is None or not isinstance(messages, Iterable):
        raise StrategyError(f"{what} returned {type(messages).__name__}, not an iterable of Messages")
    online = set(grid.nodes)
    by_device: dict[int, Message] = {}
    for m in messages:
        if not isinstance(m, Message):
            raise StrategyError(f"{what} returned a {type(m).__name__} among its messages, not a Message")
        node = m.metadata.dst_node_id
        if m.metadata.message_type != MessageType.TRAIN:
            raise StrategyError(f"{what} returned a message of type {m.metadata.message_type!r} to node {node}; "
                                f"the flower policy runs {MessageType.TRAIN!r} messages")
        if node not in online:
            raise StrategyError(f"{what} sent a message to node {node}, which is not an online device's "
                                f"(nodes are {NODE_BASE} + device id)")
        if node - NODE_BASE in by_device:
            raise StrategyError(f"{what} sent two messages to node {node}")
        if len(m.content.array_records) != 1:
            raise StrategyError(f"{what} sent node {node} {len(m.content.array_records)} ArrayRecords; the "
                                "simulated client trains the one ArrayRecord it is sent")
        by_device[node - NODE_BASE] = m
    return by_device


@dataclass
class FlowerRound:
    """One round under way: the strategy after configure_train, its messages by device, and the strategy
    after each aggregation tried (keyed by the depths aggregated; the one the server applied is kept)."""
    configured: Strategy
    messages: dict[int, Message]
    aggregated: dict[bytes, Strategy] = field(default_factory=dict)


class FlowerState(PolicyState):
    """The live strategy object (it holds its own state: FedAdam's moments, say), the run's seed, and the
    round under way (None between rounds, when checkpoints are taken)."""

    def __init__(self, strategy: Strategy, seed: int, label: str, current: FlowerRound | None = None):
        self.strategy = strategy
        self.seed = seed
        self.label = label
        self.current = current

    def to_json(self) -> JSONValue:
        try:
            blob = pickle.dumps(self.strategy, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise StrategyError(f"{self.label}: its state cannot be saved in a checkpoint (pickling the strategy "
                                f"raised {type(exc).__name__}: {exc}); run without --checkpoint-every") from None
        return {"seed": self.seed, "strategy": base64.b64encode(blob).decode("ascii")}

    @classmethod
    def from_json(cls, data: JSONValue, label: str) -> "FlowerState":
        if not isinstance(data, dict) or not isinstance(data.get("strategy"), str) \
                or not isinstance(data.get("seed"), int):
            raise StrategyError(f"{label}: the checkpoint holds no saved strategy")
        try:
            strategy = pickle.loads(base64.b64decode(data["strategy"]))
        except Exception as exc:
            raise StrategyError(f"{label}: the strategy saved in the checkpoint cannot be loaded "
                                f"({type(exc).__name__}: {exc})") from None
        return cls(strategy, data["seed"], label)
