"""`fedsim run --cluster`: one run whose gradients are sharded over a Dask cluster.

The simulated clock, the SimPy engine, the policy and the trace stay in this (driver) process; only
`layer_sums` (the gradients of what the devices delivered) runs on the cluster, through
`ShardedGradientEngine`. The devices are cut into fixed shards of consecutive ids; a worker rebuilds the data
of its shards itself from the scenario and seed (`fedsim.sim.build.build_components`), once, so no training
data ever crosses the network. Per round the driver broadcasts the model once and sends each shard the
mini-batch rows (as positions in the shard's data) and depths of its participants; each shard returns one
`LayerSums` (per-parameter sums and per-layer counts), which the driver adds in shard order (0, 1, ...), so
the result does not depend on which worker ran what, or when. A shard whose worker dies is recomputed by
another worker, which rebuilds that shard's data first: the result is unchanged.

Only the one-step layer-wise policies use `layer_sums` (salf, drop, wait, overselect with
`training.local_steps = 1`); the others train per device (`fedsim.learn.local.LocalTrainer`) and are refused.

Dask is optional (`pip install "fedsim[dask]"`): nothing here imports it until a cluster is asked for.
See docs/DISTRIBUTED.md for clusters on Slurm and the cost model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fedsim.cluster.session import ClusterError, connect, single_thread
from fedsim.errors import DataError, FedsimError
from fedsim.learn.grads import LayerSums, check_depths

__all__ = ["ShardedGradientEngine", "ShardSpec", "DISTRIBUTED_POLICIES", "check_distributable", "cluster_gradients",
           "data_digest", "sharded_grads", "shard_layer_sums"]

DISTRIBUTED_POLICIES = ("salf", "drop", "wait", "overselect")
# Wall-clock limits of talking to the cluster (never the simulated clock, which lives in the engine).
WORKER_WAIT_S = 120
_SCATTER_ATTEMPTS = 3
# A long-lived cluster serves run after run: a worker keeps the shards of this many runs at most.
_MAX_RUNS_PER_WORKER = 2
# A shard task runs its devices in passes of at most this many forward FLOPs (~500 rows of the paper CNN,
# ~2,900 of the MLP). GradientEngine's own bound (2e10) lets one CNN pass span ~67,000 rows, whose
# activations (over 1 GB) spill every cache: passes this small measured 2.5x faster per sample here on
# the CNN, 1.4-2x on the MLP. The split is fixed by the data, so results stay deterministic.
_PASS_FWD_FLOPS = 1.5e8

# -- one run, sharded gradients ---------------------------------------------------------------------

def check_distributable(scn) -> None:
    """Refuse scenarios whose updates do not go through `layer_sums` (they would not use the cluster)."""
    name = scn.policy.name
    if name not in DISTRIBUTED_POLICIES:
        raise ClusterError(f"{scn.source}: --cluster shards the one-step gradients of "
                           f"{', '.join(DISTRIBUTED_POLICIES)}; policy.name = {name} trains each device "
                           "locally in one process: run it without --cluster")
    if scn.training.local_steps != 1:
        raise ClusterError(f"{scn.source}: --cluster shards one-step (FedSGD) gradients; training.local_steps = "
                           f"{scn.training.local_steps} trains each device locally in one process: set it to 1 "
                           "or run without --cluster")


def data_digest(dataset, partition) -> str:
    """A fingerprint of the training data and partition: a worker checks it rebuilt what the driver has."""
    h = hashlib.blake2b(digest_size=16)
    for a in (dataset.x_train, dataset.y_train, partition.offsets, partition.indices):
        arr = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def _portable(scn):
    """The scenario with its file paths made absolute: workers need not share the driver's cwd."""
    return replace(scn, data=replace(scn.data, dir=_absolute(scn.data.dir)),
                   fleet=replace(scn.fleet, traces_dir=_absolute(scn.fleet.traces_dir),
                                 availability_file=_absolute(scn.fleet.availability_file)))


@dataclass(frozen=True)
class ShardSpec:
    """Everything a worker needs to rebuild one shard's data on its own; small, so it goes with every task."""
    run_key: str         # one per engine: a worker's cache entry, freed by `close()`
    shard: int
    first_device: int    # the shard's devices are first_device .. end_device - 1
    end_device: int
    scenario: Any        # fedsim.spec.scenario.Scenario, paths absolute
    digest: str          # data_digest of the driver's data


@dataclass(frozen=True)
class _Weights:
    """The global model's state of one round (parameters and buffers), broadcast once per round."""
    tensors: dict[str, torch.Tensor]
    training: bool


class _Shard:
    """Worker side: one shard's training rows (sorted dataset indices), a model and a GradientEngine."""

    def __init__(self, spec: ShardSpec):
        from fedsim.sim.build import build_components
        from fedsim.learn.grads import GradientEngine

        comp = build_components(spec.scenario)
        if data_digest(comp.dataset, comp.partition) != spec.digest:
            raise DataError(f"{spec.scenario.source}: a Dask worker rebuilt other training data than the driver "
                            f"has (data.dir {spec.scenario.data.dir}); every worker must see the same files at "
                            "the same path and run the same fedsim and numpy versions")
        p = comp.partition
        self.rows = np.unique(p.indices[p.offsets[spec.first_device]:p.offsets[spec.end_device]])
        index = torch.from_numpy(self.rows)
        self.model = comp.model
        self.engine = GradientEngine(comp.model, comp.profile, comp.dataset.x_train[index],
                                     comp.dataset.y_train[index], path=spec.scenario.training.grad_path)

    def load(self, weights: _Weights) -> None:
        self.model.load_state_dict(weights.tensors)
        self.model.train(weights.training)


class _Slot:
    def __init__(self):
        self.lock = threading.Lock()     # one task at a time per shard: the shard's model is its state
        self.shard: _Shard | None = None


# Worker-process state: run key -> shard -> slot. Built lazily by the first task that needs it, so any
# worker can take over any shard (a task Dask re-runs after its worker died rebuilds the data first).
_SHARDS: OrderedDict[str, dict[int, _Slot]] = OrderedDict()
_SHARDS_LOCK = threading.Lock()


@contextlib.contextmanager
def _loaded(spec: ShardSpec) -> Iterator[_Shard]:
    with _SHARDS_LOCK:
        slots = _SHARDS.setdefault(spec.run_key, {})
        _SHARDS.move_to_end(spec.run_key)
        while len(_SHARDS) > _MAX_RUNS_PER_WORKER:
            _SHARDS.popitem(last=False)
        slot = slots.setdefault(spec.shard, _Slot())
    with slot.lock:
        if slot.shard is None:
            slot.shard = _Shard(spec)
        yield slot.shard


def load_shard(spec: ShardSpec) -> int:
    """Worker task: build the shard's data now (before round 0); returns its number of training rows."""
    single_thread()
    with _loaded(spec) as shard:
        return int(len(shard.rows))


def forget_run(run_key: str) -> None:
    """Worker side of `ShardedGradientEngine.close()`: drop the run's shards."""
    with _SHARDS_LOCK:
        _SHARDS.pop(run_key, None)


def shard_layer_sums(spec: ShardSpec, weights: _Weights, rows: np.ndarray, sizes: np.ndarray,
                     depths: np.ndarray) -> LayerSums:
    """Worker task: the LayerSums of one shard's participants (rows: their mini-batches, concatenated,
    as positions in the shard's data; sizes: each mini-batch's length)."""
    single_thread()
    with _loaded(spec) as shard:
        shard.load(weights)
        batches = np.split(rows.astype(np.int64), np.cumsum(sizes)[:-1])
        # deepest first, as the engine groups them, so a pass mostly holds devices of one depth
        order = np.argsort(-np.asarray(depths), kind="stable")
        rows_per_pass = max(1, int(_PASS_FWD_FLOPS // max(shard.engine.profile.fwd_flops_per_sample, 1.0)))
        first_row = np.cumsum(sizes[order]) - sizes[order]
        passes = np.split(order, np.flatnonzero(np.diff(first_row // rows_per_pass)) + 1)
        total = None
        for members in passes:
            total = _add(total, shard.engine.layer_sums([batches[i] for i in members], depths[members]))
        return total


def _add(total: LayerSums | None, part: LayerSums) -> LayerSums:
    """total + part, out of place (the engine may hand out the same tensor twice)."""
    if total is None:
        return part
    sums = dict(total.sums)
    for name, g in part.sums.items():
        sums[name] = sums[name] + g if name in sums else g
    return LayerSums(sums, total.counts + part.counts, total.loss_sum + part.loss_sum,
                     total.n_devices + part.n_devices)


def _counts(depths: np.ndarray, n_layers: int) -> np.ndarray:
    """Per layer (forward order): devices that reached it, i.e. of depth >= n_layers - layer."""
    at_least = np.cumsum(np.bincount(depths, minlength=n_layers + 1)[::-1])[::-1]
    return at_least[1:][::-1].astype(np.int64)


class ShardedGradientEngine:
    """`GradientEngine.layer_sums` with the work split over the workers of a Dask cluster by device shard.

    Same API as `fedsim.learn.grads.GradientEngine` for what policies use (`layer_sums`, `layer_of_param`),
    plus `begin_round(devices)`, through which the server says whose mini-batches a round's positions are.
    The shard count is fixed for the run (default: the cluster's worker threads at the start); the sums
    are added in shard order, so a run's result depends on the shard count (to rounding) but never on
    which worker computed what, on worker deaths or on timing.
    """

    # What each shard's task runs; tests replace it to inject worker deaths.
    task = staticmethod(shard_layer_sums)

    def __init__(self, client, scenario, model: torch.nn.Module, profile, partition, dataset,
                 shards: int | None = None):
        self.client = client
        self.model = model
        self.profile = profile
        self.layer_of_param = profile.layer_of_param()
        self._dataset = dataset
        self._x: torch.Tensor | None = None
        n_devices = partition.n_devices
        slots = self._slots()
        if shards is not None and (not isinstance(shards, int) or shards < 1):
            raise ClusterError(f"shards must be a positive integer, got {shards!r}")
        self.n_shards = min(n_devices, len(slots) if shards is None else shards)
        bounds = [k * n_devices // self.n_shards for k in range(self.n_shards + 1)]
        self._shard_of_device = np.repeat(np.arange(self.n_shards), np.diff(bounds))
        offsets, indices = partition.offsets, partition.indices
        # the sorted dataset rows of each shard: what its worker holds, and how a batch becomes positions
        self._rows = [np.unique(indices[offsets[lo]:offsets[hi]]) for lo, hi in zip(bounds, bounds[1:])]
        self._run_key = uuid.uuid4().hex
        portable, digest = _portable(scenario), data_digest(dataset, partition)
        self._specs = [ShardSpec(self._run_key, k, lo, hi, portable, digest)
                       for k, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
        self._owner = {k: slots[k % len(slots)] for k in range(self.n_shards)}
        self._devices: np.ndarray | None = None
        self._calls = 0
        self._closed = False
        try:
            self._warm_up()
        except BaseException:
            self.close()                    # shards that did load must not stay on a long-lived cluster
            raise

    # -- the GradientEngine API ---------------------------------------------------------------------
    def begin_round(self, devices: np.ndarray) -> None:
        """The round's participants: position i of every later `layer_sums` call is device `devices[i]`."""
        self._devices = np.asarray(devices, dtype=np.int64).copy()

    def layer_sums(self, batches: list[np.ndarray], depths: np.ndarray) -> LayerSums:
        """Sum of the gradients of device i's mini-batch mean loss over its last `depths[i]` layers."""
        depths = self._check(batches, depths)
        counts = _counts(depths, self.profile.n_layers)
        live = np.flatnonzero(depths)
        if live.size == 0:
            return LayerSums({}, counts, 0.0, 0)
        self._calls += 1
        self._place()
        weights = self._broadcast()
        shard_of = self._shard_of_device[self._devices[live]]
        futures = []
        for k in np.unique(shard_of):                              # ascending: the order of the sum
            k = int(k)
            members = live[shard_of == k]
            sizes = np.fromiter((len(batches[i]) for i in members), dtype=np.int64, count=len(members))
            rows = self._positions(k, np.concatenate([batches[i] for i in members]))
            futures.append(self.client.submit(
                self.task, self._specs[k], weights, rows, sizes, depths[members],
                key=f"fedsim-grads-{self._run_key[:8]}-{self._calls}-{k}", workers=[self._owner[k]],
                allow_other_workers=True))                          # a lost worker's shard goes elsewhere
        total = None
        for part in self._gather(futures):                         # shard order, whatever finished first
            total = _add(total, part)
        return LayerSums(total.sums, counts, total.loss_sum, total.n_devices)

    # The server's diagnosis of a non-finite round recomputes per-device losses locally on these.
    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = self._dataset.x_train.to(next(self.model.parameters()).dtype)
        return self._x

    @property
    def y(self) -> torch.Tensor:
        return self._dataset.y_train

    def close(self) -> None:
        """Free the shards' data on the workers (a long-lived cluster serves other runs)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.client.run(forget_run, self._run_key)

    # -- helpers ------------------------------------------------------------------------------------
    def _check(self, batches: list[np.ndarray], depths: np.ndarray) -> np.ndarray:
        if self._devices is None or len(self._devices) != len(batches):
            raise ValueError("ShardedGradientEngine: call begin_round(devices) with the round's participants, "
                             "one per mini-batch, before layer_sums (fedsim.sim.server.Server does)")
        return check_depths(batches, depths, self.profile.n_layers)

    def _positions(self, shard: int, idx: np.ndarray) -> np.ndarray:
        """Dataset indices -> positions in the shard's rows (what its worker holds)."""
        rows = self._rows[shard]
        pos = np.searchsorted(rows, idx)
        if not np.array_equal(rows[np.minimum(pos, len(rows) - 1)], idx):
            raise FedsimError(f"a mini-batch of shard {shard} holds samples its devices do not own")
        return pos.astype(np.int32 if len(rows) < 2**31 else np.int64)

    def _slots(self) -> list[str]:
        """One entry per worker thread of the live workers (sorted): where shards are placed."""
        threads = self._live()
        return [addr for addr in sorted(threads) for _ in range(max(1, threads[addr]))]

    def _live(self) -> dict[str, int]:
        threads = self.client.nthreads()
        if not threads:
            try:
                self.client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except (TimeoutError, OSError) as exc:
                raise ClusterError(f"the Dask cluster has no worker after {WORKER_WAIT_S} s ({exc}); "
                                   "start workers (docs/DISTRIBUTED.md)") from None
            threads = self.client.nthreads()
        return threads

    def _place(self) -> None:
        """Keep each shard on its worker (its data is loaded there); a shard whose worker left moves to
        the live worker with the fewest shards per thread, which rebuilds that shard's data on first use."""
        live = self._live()
        load = Counter(owner for owner in self._owner.values() if owner in live)
        for k in range(self.n_shards):
            if self._owner[k] not in live:
                best = min(sorted(live), key=lambda a: load[a] / max(1, live[a]))
                self._owner[k] = best
                load[best] += 1

    def _warm_up(self) -> None:
        """Load every shard on its worker now: data errors surface before the run writes anything, and
        round 0 is not charged with the loading."""
        futures = [self.client.submit(load_shard, self._specs[k], key=f"fedsim-load-{self._run_key[:8]}-{k}",
                                      workers=[self._owner[k]], allow_other_workers=True)
                   for k in range(self.n_shards)]
        self._gather(futures)

    def _broadcast(self):
        """The model of this round on every worker: one copy each, shared by all its shards' tasks."""
        weights = _Weights({n: t.detach().clone() for n, t in self.model.state_dict().items()}, self.model.training)
        for attempt in range(_SCATTER_ATTEMPTS):
            try:
                [future] = self.client.scatter([weights], broadcast=True, hash=False)
                return future
            except (OSError, TimeoutError) as exc:     # a worker died while receiving: try the live ones again
                if attempt + 1 == _SCATTER_ATTEMPTS:
                    raise ClusterError(f"cannot send the model to the Dask workers ({type(exc).__name__}: {exc})") from None
                self._live()

    def _gather(self, futures: list) -> list:
        try:
            return self.client.gather(futures)
        except FedsimError:
            raise                               # the worker's own message (bad data, non-finite loss, ...)
        except Exception as exc:
            raise ClusterError(f"a gradient shard task failed on the Dask cluster ({type(exc).__name__}: {exc}); "
                               "Dask retries tasks of lost workers, so this one kept failing") from exc


@contextlib.contextmanager
def sharded_grads(cluster, scn, comp, shards: int | None = None) -> Iterator[ShardedGradientEngine | None]:
    """The run's gradient engine on `cluster` (None: yield None and use the local engine)."""
    if cluster is None:
        yield None
        return
    check_distributable(scn)
    with connect(cluster) as client:
        engine = ShardedGradientEngine(client, scn, comp.model, comp.profile, comp.partition, comp.dataset,
                                       shards=shards)
        try:
            yield engine
        finally:
            engine.close()


def cluster_gradients(cluster):
    """What `fedsim.run.run_scenario` takes as `gradients` for a run on `cluster`."""
    return functools.partial(sharded_grads, cluster)
