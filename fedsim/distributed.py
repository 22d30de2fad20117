"""Beyond one machine on Dask: sweeps whose runs are cluster tasks, and one run whose gradients are sharded.

`--cluster` takes a Dask scheduler address (`tcp://host:8786`) or `local[:N]` (fedsim starts a
`LocalCluster` of N single-thread worker processes, N = the number of cores by default).

* `fedsim sweep --cluster`: each run of the sweep is one Dask task running the function the local process
  pool runs (`fedsim.sweep._run_one`), writing into the sweep directory, which every worker must see at
  the same path (a shared filesystem). Same run ids, traces and index as a local sweep; resumable alike.
* `fedsim run --cluster`: the simulated clock, the SimPy engine, the policy and the trace stay in this
  (driver) process; only `layer_sums` (the gradients of what the devices delivered) runs on the cluster,
  through `ShardedGradientEngine`. A worker rebuilds the run's training data itself from the scenario and
  seed (`fedsim.build.build_components`), once, so no training data ever crosses the network. Each round,
  the contributing devices, in the policy's order, are cut into shards of `DEVICES_PER_SHARD`, a size
  fixed by the code, never by the cluster; each shard is one task returning one `LayerSums`, and the driver
  adds them in shard order (0, 1, ...). The result is therefore the same, bit for bit, on any number of
  workers, whichever worker ran what and whatever died on the way.

Faults: every call to the cluster is bounded in time (the `*_TIMEOUT_S` constants below). A worker that
dies loses nothing that cannot be redone: the round's model and the run's description are Dask tasks
holding their data, which the scheduler re-runs elsewhere, and the shard tasks they feed are re-run
with them (a shard task found cancelled is submitted again, `_RESUBMITS` times). A round in which no task
finishes for `stall_timeout_s` fails the run with a `ClusterError` naming the cluster and the round.

Only the one-step layer-wise policies use `layer_sums` (salf, drop, wait, overselect with
`training.local_steps = 1`); the others train per device (`fedsim.local.LocalTrainer`) and are refused.

Dask is optional (`pip install "fedsim[dask]"`): nothing here imports it until a cluster is asked for.
See docs/DISTRIBUTED.md for clusters on Slurm, the fault behaviour and the cost model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fedsim.errors import DataError, FedsimError
from fedsim.grads import LayerSums, check_depths

__all__ = ["ClusterError", "ClusterSpec", "ClusterSession", "ShardedGradientEngine", "RunSpec",
           "DASK_INSTALL", "DEVICES_PER_SHARD", "DISTRIBUTED_POLICIES", "check_distributable", "connect",
           "data_digest", "open_cluster", "parse_cluster", "require_dask", "sharded_grads", "shard_layer_sums",
           "sweep_on_cluster", "sweep_task"]

DASK_INSTALL = 'pip install "fedsim[dask]"'
DISTRIBUTED_POLICIES = ("salf", "drop", "wait", "overselect")
# Participants per gradient shard: a constant, so how a round's sum is split and added up (and hence the
# model, to the last bit) never depends on the cluster. 64 CNN devices at batch 16 are ~1 GFLOP, a task of
# ~0.1 s on one thread: enough tasks to balance a large round over many workers, few enough that Dask's
# ~1 ms per task stays small.
DEVICES_PER_SHARD = 64
# Wall-clock limits of talking to the cluster (never the simulated clock, which lives in the engine).
CONNECT_TIMEOUT_S = 30       # reach a scheduler (--cluster ADDRESS), or the one fedsim started
START_TIMEOUT_S = 120        # local:N: the workers start (each imports torch); at least one must be up
WORKER_WAIT_S = 120          # a cluster without workers: wait this long for one
CALL_TIMEOUT_S = 30          # one request to the scheduler (the workers' list)
CLOSE_TIMEOUT_S = 5          # each of: freeing a run's data on the workers, closing the client, a LocalCluster
LOAD_TIMEOUT_S = 300         # every worker builds the run's data before round 0
TASK_TIMEOUT_S = 30          # a round fails if none of its tasks finishes for this long (plus the data build
_TASK_MIN_FLOPS = 1e9        # time measured before round 0, plus its largest task at this many FLOP/s)
_RESUBMITS = 2               # a shard task found cancelled (its inputs were lost) is submitted again this often
# A long-lived cluster serves run after run: a worker keeps the data of this many runs at most.
_MAX_RUNS_PER_WORKER = 2
# A shard task runs its devices in passes of at most this many forward FLOPs (~500 rows of the paper CNN,
# ~2,900 of the MLP). GradientEngine's own bound (2e10) lets one CNN pass span ~67,000 rows, whose
# activations (over 1 GB) spill every cache: passes this small measured 2.5x faster per sample here on
# the CNN, 1.4-2x on the MLP. The split is fixed by the data, so results stay deterministic.
_PASS_FWD_FLOPS = 1.5e8
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
# threshold: every activation buffer over 128 KB is then mapped and unmapped pass after pass, and the page
# faults (6.8 M, 7.6 s of system time) made a paper-CNN shard 1.9x slower than the same code in a plain
# process. Workers of local:N start without it (None unsets it); other clusters: docs/DISTRIBUTED.md.
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


class ClusterError(FedsimError):
    """--cluster is malformed, Dask is missing, the scheduler cannot be reached, or the cluster lost the work."""


def require_dask():
    """The `distributed` module, or a ClusterError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"--cluster needs Dask, which is not installed ({exc}); install it with: "
                           f"{DASK_INSTALL}") from None
    return distributed


def _one_line(exc: BaseException) -> str:
    """`Type: message` on one line (Dask's messages can span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- connecting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterSpec:
    address: str | None = None          # a running scheduler, e.g. tcp://10.0.0.5:8786
    local_workers: int | None = None    # or: start a LocalCluster of this many single-thread processes


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def parse_cluster(text: str) -> ClusterSpec:
    """`local`, `local:N` or a scheduler address."""
    text = str(text).strip()
    if not text:
        raise ClusterError("--cluster: empty; give a Dask scheduler ADDRESS (tcp://host:8786) or local[:N]")
    name, sep, count = text.partition(":")
    if name != "local":
        return ClusterSpec(address=text)
    if not sep:
        return ClusterSpec(local_workers=_cores())
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n < 1:
        raise ClusterError(f"--cluster {text}: N in local:N must be a positive integer, got {count!r}")
    return ClusterSpec(local_workers=n)


def _close_quietly(*things) -> None:
    """Close clients and clusters, each within CLOSE_TIMEOUT_S, ignoring their errors."""
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close(timeout=CLOSE_TIMEOUT_S)


class ClusterSession:
    """A Dask client and, if fedsim started it, the LocalCluster behind it; `close()` ends what was opened.

    `label` names the cluster in messages: the `--cluster` text and the scheduler's address. `quiet`, if
    given, is closed last (it holds Dask's logging at CRITICAL while fedsim's client lives: a fault ends
    in one line of fedsim's, not in Dask's reconnection reports). A finalizer closes them too if the
    session is dropped without `close()` (an error between connecting and running), so a LocalCluster's
    worker processes never outlive the command.
    """

    def __init__(self, client, cluster=None, owned: bool = True, label: str | None = None,
                 quiet: contextlib.ExitStack | None = None):
        self.client = client
        self.cluster = cluster
        self.label = label if label is not None else _address(client)
        self._finalizer = weakref.finalize(self, _end_session, client if owned else None, cluster, quiet)

    def close(self) -> None:
        self._finalizer()


def _end_session(client, cluster, quiet) -> None:
    _close_quietly(client, cluster)
    if quiet is not None:
        quiet.close()


def _quiet_dask() -> contextlib.ExitStack:
    """Dask's log handler at CRITICAL until the returned stack is closed."""
    from distributed.utils import silence_logging_cmgr

    stack = contextlib.ExitStack()
    stack.enter_context(silence_logging_cmgr(logging.CRITICAL))
    return stack


def _address(client) -> str:
    with contextlib.suppress(Exception):
        return str(client.scheduler.address)
    return "the Dask scheduler"


def open_cluster(cluster) -> ClusterSession:
    """Connect to `cluster`: a `--cluster` text, a ClusterSpec, or a `distributed.Client` (used as is)."""
    distributed = require_dask()
    if isinstance(cluster, distributed.Client):
        return ClusterSession(cluster, owned=False)
    spec = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    if spec.local_workers is not None:
        return _start_local(distributed, spec.local_workers)
    quiet = _quiet_dask()
    try:
        client = distributed.Client(spec.address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        quiet.close()
        raise ClusterError(f"--cluster {spec.address}: cannot reach a Dask scheduler there "
                           f"({_one_line(exc)}); start one (docs/DISTRIBUTED.md) or use "
                           "--cluster local:N") from None
    except BaseException:
        quiet.close()
        raise
    return ClusterSession(client, label=spec.address, quiet=quiet)


def _start_local(distributed, n: int) -> ClusterSession:
    """A LocalCluster of n single-thread worker processes, started within START_TIMEOUT_S.

    Processes with one thread each: two single-thread processes beat one two-thread process for this
    work (docs/DISTRIBUTED.md). The scheduler's HTTP server on any free port: the fixed default (8787)
    clashes between concurrent commands. Dask's own logs are silenced: a fault ends in one line of fedsim's.
    The workers are started in the background and waited for here, so a worker that never comes up
    (killed while starting, say) costs a bounded wait, not a hang; the run goes on with the others.
    """
    import dask

    local = client = None
    try:
        with dask.config.set(WORKER_DASK_CONFIG):      # read by each nanny when created, kept for its restarts
            local = distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.CRITICAL)
            label = f"local:{n} ({local.scheduler_address})"
            client = distributed.Client(local, timeout=CONNECT_TIMEOUT_S)
            local.scale(n)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                up = len(_nthreads(client, label))
                settled = len(local.workers) >= n           # every start attempt ended, well or not
                if up >= n or (settled and up >= 1):
                    break
                if time.monotonic() > deadline or (settled and not _starting(local)):
                    raise ClusterError(f"--cluster {label}: {up} of {n} Dask workers started within "
                                       f"{START_TIMEOUT_S} s; check the machine's memory and load, or ask for fewer")
                time.sleep(0.1)
    except BaseException:
        _close_quietly(client, local)
        raise
    return ClusterSession(client, local, label=label)


def _starting(local) -> bool:
    """Whether a worker of this LocalCluster is still starting (or restarting)."""
    from distributed.core import Status

    return any(getattr(w, "status", None) in (Status.init, Status.starting) for w in local.workers.values())


def _nthreads(client, label: str) -> dict[str, int]:
    """The live workers and their threads, asked of the scheduler within CALL_TIMEOUT_S."""
    try:
        return client.nthreads(callback_timeout=CALL_TIMEOUT_S)
    except Exception as exc:
        raise ClusterError(f"--cluster {label}: the Dask scheduler did not answer within {CALL_TIMEOUT_S} s "
                           f"({_one_line(exc)})") from None


@contextlib.contextmanager
def connect(cluster) -> Iterator[Any]:
    """`with connect("local:2") as client:` a Dask client, closed (with its LocalCluster) on exit."""
    session = open_cluster(cluster)
    try:
        yield session.client
    finally:
        session.close()


def _single_thread() -> None:
    """Worker side: one torch thread per task (the worker runs as many tasks at once as it has threads)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# -- sweeps -----------------------------------------------------------------------------------------

def sweep_task(scenario: str, overrides: tuple[str, ...], run_dir: str, params: dict, text: str,
               base_dir: str) -> tuple[str, str | None]:
    """Worker side of a sweep on a cluster: one run, through the local pool's own `_run_one`."""
    from fedsim.rundir import clear_run_files
    from fedsim.sweep import _run_one

    _single_thread()
    # The sweep cleared every directory it submitted; files there now were left by an earlier attempt of
    # this very task, whose worker died (Dask re-runs the task elsewhere): start it afresh (fedsim's files only).
    if Path(run_dir).is_dir():
        clear_run_files(Path(run_dir))
    return _run_one(scenario, overrides, run_dir, params, text=text, base_dir=base_dir)


def sweep_on_cluster(client, scenario: Path, out: Path, todo: list) -> Iterator[tuple[Any, str, str | None]]:
    """Submit every run of `todo` to the cluster; yield (run, status, error) as each finishes.

    Runs are submitted at once and the scheduler balances them over the workers; on an interrupt the
    ones not started are dropped (a run already running on a remote worker finishes there, and the
    next sweep takes it as done if it completed). The scenario travels as text, under the name the
    driver uses, so traces record exactly what a local sweep records.
    """
    from distributed import as_completed

    from fedsim.rundir import RunStatus
    from fedsim.sweep import RUNS_DIR

    if not todo:
        return
    scenario = Path(scenario)
    text = scenario.read_text(encoding="utf-8")
    base_dir = str(scenario.resolve().parent)
    tag = uuid.uuid4().hex[:8]
    futures = {}
    for run in todo:
        run_dir = (Path(out) / RUNS_DIR / run.run_id).resolve()      # workers need not share our cwd
        future = client.submit(sweep_task, str(scenario), tuple(run.overrides), str(run_dir),
                               run.params_json(scenario), text, base_dir, key=f"fedsim-run-{tag}-{run.run_id}")
        futures[future] = run
    try:
        for future in as_completed(list(futures)):
            run = futures[future]
            try:
                status, error = future.result()
            except Exception as exc:        # the task was lost: its workers kept dying (KilledWorker), ...
                status, error = RunStatus.FAILED.value, f"{type(exc).__name__}: {exc}"
            yield run, status, error
    finally:
        for future in futures:      # the scheduler drops tasks no client holds: runs not started never start
            future.release()        # (a local call: unlike client.cancel, it cannot wait on a lost scheduler)


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
class RunSpec:
    """Everything a worker needs to rebuild the run's training data on its own (held by one Dask task)."""
    run_key: str         # one per engine: a worker's cache entry, freed by `close()`
    scenario: Any        # fedsim.scenario.Scenario, paths absolute
    digest: str          # data_digest of the driver's data


@dataclass(frozen=True)
class _Weights:
    """The global model's state of one round (parameters and buffers), sent once per round."""
    tensors: dict[str, torch.Tensor]
    training: bool


class _RunData:
    """Worker side: the run's training set (in the model's dtype) and gradient engines on it, one per
    task running at once (each has its own copy of the model, loaded with the round's weights)."""

    def __init__(self, spec: RunSpec):
        from fedsim.build import build_components

        comp = build_components(spec.scenario)
        if data_digest(comp.dataset, comp.partition) != spec.digest:
            raise DataError(f"{spec.scenario.source}: a Dask worker rebuilt other training data than the driver "
                            f"has (data.dir {spec.scenario.data.dir}); every worker must see the same files at "
                            "the same path and run the same fedsim and numpy versions")
        self.model, self.profile = comp.model, comp.profile
        self.x = comp.dataset.x_train.to(next(comp.model.parameters()).dtype)
        self.y = comp.dataset.y_train
        self.grad_path = spec.scenario.training.grad_path
        self._idle: list = []
        self._made = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def engine(self):
        from fedsim.grads import GradientEngine

        with self._lock:
            engine = self._idle.pop() if self._idle else None
            fresh = engine is None
            first = fresh and self._made == 0
            self._made += fresh
        if fresh:
            engine = GradientEngine(self.model if first else copy.deepcopy(self.model), self.profile, self.x,
                                    self.y, path=self.grad_path)
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
    _single_thread()
    return int(len(_run_data(spec).y))


def forget_run(run_key: str) -> None:
    """Worker side of `ShardedGradientEngine.close()`: drop the run's data."""
    with _RUNS_LOCK:
        _RUNS.pop(run_key, None)


def shard_layer_sums(spec: RunSpec, shard: int, weights: _Weights, rows: np.ndarray, sizes: np.ndarray,
                     depths: np.ndarray) -> LayerSums:
    """Worker task: the LayerSums of one shard's devices (rows: their mini-batches, concatenated, as
    training-set indices; sizes: each mini-batch's length; depths: what each delivered, all > 0)."""
    _single_thread()
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
            total = _add(total, engine.layer_sums([batches[i] for i in members], depths[members]))
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
    """`GradientEngine.layer_sums` with the work split over the workers of a Dask cluster.

    Same API as `fedsim.grads.GradientEngine` for what policies use (`layer_sums`, `layer_of_param`),
    plus `begin_round(devices, round_)`, through which the server says which round is computed (named in
    errors). A round's contributing devices (in the order the policy gives them) are cut into shards of
    `devices_per_shard`; the shards' sums are added in shard order, so the result depends on the shard
    size only, never on the number of workers, on which worker computed what, on worker deaths or on timing.
    """

    # What the workers run; tests replace them to inject worker deaths at chosen points.
    task = staticmethod(shard_layer_sums)
    load = staticmethod(load_run)
    receive = staticmethod(hold)

    def __init__(self, client, scenario, model: torch.nn.Module, profile, partition, dataset,
                 devices_per_shard: int | None = None, label: str | None = None):
        self.client = client
        self.label = label if label is not None else _address(client)
        self.model = model
        self.profile = profile
        self.layer_of_param = profile.layer_of_param()
        self._dataset = dataset
        self._x: torch.Tensor | None = None
        size = DEVICES_PER_SHARD if devices_per_shard is None else devices_per_shard
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ClusterError(f"devices_per_shard must be a positive integer, got {size!r}")
        self.devices_per_shard = size
        self._run_key = uuid.uuid4().hex
        self._tag = self._run_key[:8]
        self._round: int | None = None
        self._rounds_begun = 0
        self._calls = 0
        self._load_s = 0.0
        self._closed = False
        self._sent = 0
        self._spec_value = RunSpec(self._run_key, _portable(scenario), data_digest(dataset, partition))
        self._spec = None
        try:
            self._warm_up()
        except BaseException:
            self.close()                    # data that did load must not stay on a long-lived cluster
            raise

    # -- the GradientEngine API ---------------------------------------------------------------------
    def begin_round(self, devices: np.ndarray | None = None, round_: int | None = None) -> None:
        """A round starts (`Server.setup_round` says so): errors name `round_`, or if not given the number of
        rounds begun before this one by this engine (in a resumed run, counted from the resumed round)."""
        self._round = round_ if round_ is not None else self._rounds_begun
        self._rounds_begun += 1

    def layer_sums(self, batches: list[np.ndarray], depths: np.ndarray) -> LayerSums:
        """Sum of the gradients of device i's mini-batch mean loss over its last `depths[i]` layers."""
        depths = check_depths(batches, depths, self.profile.n_layers)
        counts = _counts(depths, self.profile.n_layers)
        live = np.flatnonzero(depths)
        if live.size == 0:
            return LayerSums({}, counts, 0.0, 0)
        self._calls += 1
        shards = [live[i:i + self.devices_per_shard] for i in range(0, len(live), self.devices_per_shard)]
        work = []
        for members in shards:
            sizes = np.fromiter((len(batches[i]) for i in members), dtype=np.int64, count=len(members))
            rows = np.concatenate([batches[i] for i in members])
            work.append((rows.astype(np.int32 if len(self._dataset.y_train) < 2**31 else np.int64), sizes,
                         depths[members]))
        largest = max(int(w[1].sum()) for w in work) * 3 * max(self.profile.fwd_flops_per_sample, 1.0)
        weights = _Weights({n: t.detach().clone() for n, t in self.model.state_dict().items()}, self.model.training)
        call = f"{self._tag}-{self._calls}"
        model = [self._send(weights, "model")]

        def submit(k: int, attempt: int):
            model[0] = self._send(weights, "model", model[0])
            rows, sizes, shard_depths = work[k]
            return self.client.submit(self.task, self._run_spec(), k, model[0], rows, sizes, shard_depths,
                                      key=f"fedsim-grads-{call}-{k}-{attempt}", pure=False)

        try:
            parts = self._collect(submit, len(work), self.stall_timeout_s(largest), "gradient shard")
        finally:
            model[0].release()
        total = None
        for part in parts:                                        # shard order, whatever finished first
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

    def stall_timeout_s(self, task_flops: float = 0.0) -> float:
        """How long a round may go without any of its tasks finishing: TASK_TIMEOUT_S, plus the time the
        data took to build before round 0 (a worker taking over rebuilds it), plus the largest task's
        FLOPs at _TASK_MIN_FLOPS per second."""
        return TASK_TIMEOUT_S + self._load_s + task_flops / _TASK_MIN_FLOPS

    def close(self) -> None:
        """Free the run's data on the workers (a long-lived cluster serves other runs), within CLOSE_TIMEOUT_S;
        a worker that does not answer keeps it until two newer runs have pushed it out."""
        if self._closed:
            return
        self._closed = True
        if self._spec is not None:
            self._spec.release()
        with contextlib.suppress(Exception):
            self.client.run(forget_run, self._run_key, on_error="ignore", callback_timeout=CLOSE_TIMEOUT_S)

    # -- helpers ------------------------------------------------------------------------------------
    def _send(self, value, name: str, future=None):
        """A task holding `value` on a worker (`future` if it still does or will): the tasks that need the
        value depend on it. The scheduler keeps `value` as its input: a holder whose worker dies is re-run
        elsewhere, and one Dask cancelled is sent again here."""
        if future is not None and future.status not in ("cancelled", "error"):
            return future
        self._sent += 1
        return self.client.submit(self.receive, value, key=f"fedsim-{name}-{self._tag}-{self._sent}", pure=False)

    def _run_spec(self):
        self._spec = self._send(self._spec_value, "run", self._spec)
        return self._spec

    def _error(self, what: str) -> ClusterError:
        if self._round is not None:
            where = f"round {self._round}"
        else:                               # no begin_round: name the gradient call instead
            where = "before round 0" if self._calls == 0 else f"gradient call {self._calls}"
        return ClusterError(f"--cluster {self.label}: {where}: {what}")

    def _workers(self) -> dict[str, int]:
        threads = _nthreads(self.client, self.label)
        if not threads:
            try:
                self.client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except Exception as exc:
                raise self._error(f"no Dask worker after {WORKER_WAIT_S} s ({_one_line(exc)}); start workers "
                                  "(docs/DISTRIBUTED.md)") from None
            threads = _nthreads(self.client, self.label)
        return threads

    def _warm_up(self) -> None:
        """Build the run's data on every worker now: data errors surface before the run writes anything,
        and round 0 is not charged with the building. Its duration enters `stall_timeout_s`."""
        workers = sorted(self._workers())
        start = time.monotonic()

        def submit(k: int, attempt: int):
            return self.client.submit(self.load, self._run_spec(), key=f"fedsim-load-{self._tag}-{k}-{attempt}",
                                      workers=[workers[k]], allow_other_workers=True, pure=False)

        self._collect(submit, len(workers), LOAD_TIMEOUT_S, "worker's data build")
        self._load_s = time.monotonic() - start

    def _collect(self, submit: Callable[[int, int], Any], n: int, timeout_s: float, what: str) -> list:
        """Submit tasks 0..n-1 (`submit(k, attempt)`), return their results in order.

        Waits at most `timeout_s` for each next task to finish. A task that errs with a FedsimError (bad
        data on a worker, a non-finite loss) raises it; a task cancelled because its inputs were lost is
        submitted again (_RESUBMITS times); anything else, or no progress, raises a ClusterError.
        """
        from distributed import KilledWorker

        done: queue.SimpleQueue = queue.SimpleQueue()
        futures: dict[int, Any] = {}
        attempts = [0] * n
        results: dict[int, Any] = {}

        def launch(k: int) -> None:
            future = submit(k, attempts[k])
            futures[k] = future
            future.add_done_callback(lambda f, k=k: done.put((k, f)))

        try:
            for k in range(n):
                launch(k)
            deadline = time.monotonic() + timeout_s
            while len(results) < n:
                try:
                    k, future = done.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise self._stalled(what, n - len(results), n, timeout_s) from None
                if future is not futures[k] or k in results:
                    continue                                # an earlier attempt's late news
                try:
                    results[k] = future.result(timeout=timeout_s)     # a lost result is recomputed
                    deadline = time.monotonic() + timeout_s
                    continue
                except FedsimError:
                    raise                                   # the worker's own message (bad data, NaN, ...)
                except KilledWorker:
                    raise self._error(f"the workers running a {what} task kept dying (Dask gave up after "
                                      "distributed.scheduler.allowed-failures); out of memory? "
                                      "(docs/DISTRIBUTED.md, Faults)") from None
                except TimeoutError:
                    raise self._stalled(what, n - len(results), n, timeout_s) from None
                except Exception as exc:
                    if future.status != "cancelled" and not isinstance(exc, (OSError, ConnectionError)):
                        raise self._error(f"a {what} task failed on the cluster ({_one_line(exc)})") from exc
                    cause = exc
                attempts[k] += 1
                if attempts[k] > _RESUBMITS:
                    raise self._error(f"a {what} task was lost {attempts[k]} times, last: {_one_line(cause)}")
                launch(k)
        finally:
            for future in futures.values():
                future.release()
        return [results[k] for k in range(n)]

    def _stalled(self, what: str, pending: int, n: int, timeout_s: float) -> ClusterError:
        with contextlib.suppress(Exception):
            workers = len(self.client.nthreads(callback_timeout=CLOSE_TIMEOUT_S))
            return self._error(f"no {what} task finished in {timeout_s:.0f} s ({pending} of {n} pending, "
                               f"{workers} worker(s) up); the cluster lost its workers or is stuck "
                               "(docs/DISTRIBUTED.md, Faults)")
        return self._error(f"no {what} task finished in {timeout_s:.0f} s ({pending} of {n} pending) and the "
                           "scheduler does not answer (docs/DISTRIBUTED.md, Faults)")


@contextlib.contextmanager
def sharded_grads(cluster, scn, comp, devices_per_shard: int | None = None
                  ) -> Iterator[ShardedGradientEngine | None]:
    """The run's gradient engine on `cluster` (None: yield None and use the local engine)."""
    if cluster is None:
        yield None
        return
    check_distributable(scn)
    session = open_cluster(cluster)
    try:
        engine = ShardedGradientEngine(session.client, scn, comp.model, comp.profile, comp.partition,
                                       comp.dataset, devices_per_shard=devices_per_shard, label=session.label)
        try:
            yield engine
        finally:
            engine.close()
    finally:
        session.close()
