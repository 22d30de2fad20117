"""The worker side of sharded gradients: the tasks a Dask worker runs, and the run data it keeps.

A worker rebuilds the run's training data itself from the scenario and seed (`fedsim.sim.build.build_components`),
once, checked against the driver's by a fingerprint (`data_digest`), so no training data ever crosses the
network and any worker can compute any shard: one that joins, or takes over a dead one's tasks, builds the
data first. `fedsim.cluster.shards.ShardedGradientEngine` is the driver side.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.cluster.session import single_thread
from fedsim.errors import DataError
from fedsim.learn.grads import LayerSums
from fedsim.learn.rows import LazyRows

__all__ = ["RunSpec", "Weights", "add_sums", "data_digest", "forget_run", "hold", "load_run", "portable",
           "shard_layer_sums"]

# A long-lived cluster serves run after run: a worker keeps the data of this many runs at most.
_MAX_RUNS_PER_WORKER = 2
# A shard task runs its devices in passes of at most this many forward FLOPs (~500 rows of the paper CNN,
# ~2,900 of the MLP). GradientEngine's own bound (2e10) lets one CNN pass span ~67,000 rows, whose
# activations (over 1 GB) spill every cache: passes this small measured 2.5x faster per sample here on
# the CNN, 1.4-2x on the MLP. The split is fixed by the data, so results stay deterministic.
_PASS_FWD_FLOPS = 1.5e8


def data_digest(dataset, partition) -> str:
    """A fingerprint of the training data and partition: a worker checks it rebuilt what the driver has."""
    h = hashlib.blake2b(digest_size=16)
    for a in (dataset.x_train, dataset.y_train, partition.offsets, partition.indices):
        if isinstance(a, LazyRows):         # rows made on demand: what makes them
            h.update(f"{a!r} {a.source.describe()}".encode())
            continue
        arr = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def _absolute_paths(config):
    """A dataclass config (a data set's) with its `Path` fields made absolute; anything else as it is."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    paths = {f.name: _absolute(getattr(config, f.name)) for f in dataclasses.fields(config)
             if isinstance(getattr(config, f.name), Path)}
    return replace(config, **paths) if paths else config


def portable(scn):
    """The scenario with its file paths made absolute: workers need not share the driver's cwd."""
    return replace(scn, data=replace(scn.data, loader=_absolute_paths(scn.data.loader)),
                   fleet=replace(scn.fleet, traces_dir=_absolute(scn.fleet.traces_dir),
                                 availability_file=_absolute(scn.fleet.availability_file)))


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to rebuild the run's training data on its own (held by one Dask task)."""
    run_key: str         # one per engine: a worker's cache entry, freed by `close()`
    scenario: Any        # fedsim.spec.scenario.Scenario, paths absolute
    digest: str          # data_digest of the driver's data


@dataclass(frozen=True)
class Weights:
    """The global model's state of one round (parameters and buffers), sent once per round."""
    tensors: dict[str, torch.Tensor]
    training: bool


class _RunData:
    """Worker side: the run's training set (in the model's dtype) and gradient engines on it, one per
    task running at once (each has its own copy of the model, loaded with the round's weights)."""

    def __init__(self, spec: RunSpec):
        from fedsim.learn.loss import load_loss
        from fedsim.sim.build import build_components

        comp = build_components(spec.scenario)
        if data_digest(comp.dataset, comp.partition) != spec.digest:
            data = spec.scenario.data
            raise DataError(f"{spec.scenario.source}: a Dask worker rebuilt other training data than the driver "
                            f"has (data set {data.name!r}: {data.loader}); every worker must see the same files "
                            "at the same path and run the same fedsim and numpy versions")
        self.model, self.profile = comp.model, comp.profile
        self.x = comp.dataset.x_train.to(next(comp.model.parameters()).dtype)
        self.y = comp.dataset.y_train
        self.grad_path = spec.scenario.training.grad_path
        self.loss = load_loss(spec.scenario.training.loss, spec.scenario.source)
        self._idle: list = []
        self._made = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def engine(self):
        from fedsim.learn.grads import GradientEngine

        with self._lock:
            engine = self._idle.pop() if self._idle else None
            fresh = engine is None
            first = fresh and self._made == 0
            self._made += fresh
        if fresh:
            engine = GradientEngine(self.model if first else copy.deepcopy(self.model), self.profile, self.x,
                                    self.y, path=self.grad_path, loss=self.loss)
        try:
            yield engine
        finally:
            with self._lock:
                self._idle.append(engine)


class _RunSlot:
    def __init__(self):
        self.lock = threading.Lock()     # one build of the run's data per worker
        self.data: _RunData | None = None


# Worker-process state: run key -> the run's data. Built by the first task that needs it, so any worker
# can compute any shard (a worker that joins, or takes over a dead one's tasks, builds the data first).
_RUNS: OrderedDict[str, _RunSlot] = OrderedDict()
_RUNS_LOCK = threading.Lock()


def _run_data(spec: RunSpec) -> _RunData:
    with _RUNS_LOCK:
        slot = _RUNS.setdefault(spec.run_key, _RunSlot())
        _RUNS.move_to_end(spec.run_key)
        while len(_RUNS) > _MAX_RUNS_PER_WORKER:
            _RUNS.popitem(last=False)
    with slot.lock:
        if slot.data is None:
            slot.data = _RunData(spec)
        return slot.data


def hold(value):
    """Worker task: hold `value` (the run's RunSpec, a round's model) for the tasks that need it. Its input
    stays with the scheduler, so Dask re-runs it elsewhere if its worker dies: the value is sent again."""
    return value


def load_run(spec: RunSpec) -> int:
    """Worker task: build the run's data now (before round 0); returns its number of training rows."""
    single_thread()
    return int(len(_run_data(spec).y))


def forget_run(run_key: str) -> None:
    """Worker side of `ShardedGradientEngine.close()`: drop the run's data."""
    with _RUNS_LOCK:
        _RUNS.pop(run_key, None)


def shard_layer_sums(spec: RunSpec, shard: int, weights: Weights, rows: np.ndarray, sizes: np.ndarray,
                     depths: np.ndarray, device_weights: np.ndarray | None = None) -> LayerSums:
    """Worker task: the LayerSums of one shard's devices (rows: their mini-batches, concatenated, as
    training-set indices; sizes: each mini-batch's length; depths: what each delivered, all > 0;
    device_weights: each one's gradient weight, or None)."""
    single_thread()
    with _run_data(spec).engine() as engine:
        engine.model.load_state_dict(weights.tensors)
        engine.model.train(weights.training)
        batches = np.split(rows.astype(np.int64), np.cumsum(sizes)[:-1])
        # deepest first, as the engine groups them, so a pass mostly holds devices of one depth
        order = np.argsort(-np.asarray(depths), kind="stable")
        rows_per_pass = max(1, int(_PASS_FWD_FLOPS // max(engine.profile.fwd_flops_per_sample, 1.0)))
        first_row = np.cumsum(sizes[order]) - sizes[order]
        passes = np.split(order, np.flatnonzero(np.diff(first_row // rows_per_pass)) + 1)
        total = None
        for members in passes:
            total = add_sums(total, engine.layer_sums([batches[i] for i in members], depths[members],
                                                     None if device_weights is None else device_weights[members]))
        return total


def add_sums(total: LayerSums | None, part: LayerSums) -> LayerSums:
    """total + part, out of place (the engine may hand out the same tensor twice)."""
    if total is None:
        return part
    sums = dict(total.sums)
    for name, g in part.sums.items():
        sums[name] = sums[name] + g if name in sums else g
    return LayerSums(sums, total.counts + part.counts, total.loss_sum + part.loss_sum,
                     total.n_devices + part.n_devices)
