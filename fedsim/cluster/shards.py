"""`fedsim run --cluster`: one run whose gradients are sharded over a Dask cluster (the driver side).

The simulated clock, the SimPy engine, the policy and the trace stay in this (driver) process; only
`layer_sums` (the gradients of what the devices delivered) runs on the cluster, through
`ShardedGradientEngine`. A worker rebuilds the run's training data itself from the scenario and seed
(`fedsim.cluster.worker`), once, so no training data ever crosses the network. Each round, the contributing
devices, in the policy's order, are cut into shards of `DEVICES_PER_SHARD`, a size fixed by the code, never
by the cluster; each shard is one task returning one `LayerSums`, and the driver adds them in shard order
(0, 1, ...). The result is therefore the same, bit for bit, on any number of workers, whichever worker ran
what and whatever died on the way.

Faults: every call to the cluster is bounded in time (`fedsim.cluster.limits`). A worker that dies loses
nothing that cannot be redone: the round's model and the run's description are Dask tasks holding their
data, which the scheduler re-runs elsewhere, and the shard tasks they feed are re-run with them (a shard
task found cancelled is submitted again, `limits.RESUBMITS` times). A round in which no task finishes for
`stall_timeout_s` fails the run with a `ClusterError` naming the cluster and the round.

Only the one-step layer-wise policies use `layer_sums` (salf, drop, wait, overselect with
`training.local_steps = 1`); the others train per device (`fedsim.learn.local.LocalTrainer`) and are refused.

Dask is optional (`pip install "fedsim[dask]"`): nothing here imports it until a cluster is asked for.
See docs/DISTRIBUTED.md for clusters on Slurm, the fault behaviour and the cost model.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fedsim.cluster import limits
from fedsim.cluster.session import ClusterError, address_of, nthreads, one_line, open_cluster
from fedsim.cluster.worker import (RunSpec, Weights, add_sums, data_digest, forget_run, hold, load_run, portable,
                                   shard_layer_sums)
from fedsim.errors import FedsimError
from fedsim.learn.grads import LayerSums, check_depths

__all__ = ["ShardedGradientEngine", "DEVICES_PER_SHARD", "DISTRIBUTED_POLICIES", "check_distributable",
           "cluster_gradients", "sharded_grads"]

DISTRIBUTED_POLICIES = ("salf", "drop", "wait", "overselect")
# Participants per gradient shard: a constant, so how a round's sum is split and added up (and hence the
# model, to the last bit) never depends on the cluster. 64 CNN devices at batch 16 are ~1 GFLOP, a task of
# ~0.1 s on one thread: enough tasks to balance a large round over many workers, few enough that Dask's
# ~1 ms per task stays small.
DEVICES_PER_SHARD = 64


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


def _counts(depths: np.ndarray, n_layers: int) -> np.ndarray:
    """Per layer (forward order): devices that reached it, i.e. of depth >= n_layers - layer."""
    at_least = np.cumsum(np.bincount(depths, minlength=n_layers + 1)[::-1])[::-1]
    return at_least[1:][::-1].astype(np.int64)


class ShardedGradientEngine:
    """`GradientEngine.layer_sums` with the work split over the workers of a Dask cluster.

    Same API as `fedsim.learn.grads.GradientEngine` for what policies use (`layer_sums`, `layer_of_param`),
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
        self.label = label if label is not None else address_of(client)
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
        self._spec_value = RunSpec(self._run_key, portable(scenario), data_digest(dataset, partition))
        self._spec = None
        try:
            self._warm_up()
        except BaseException:
            self.close()                    # data that did load must not stay on a long-lived cluster
            raise

    # -- the GradientEngine API ---------------------------------------------------------------------
    def begin_round(self, devices: np.ndarray | None = None, round_: int | None = None) -> None:
        """A round starts (`fedsim.sim.server.Server.setup_round` says so): errors name `round_`, or if not
        given the number of rounds begun before this one by this engine (in a resumed run, counted from the
        resumed round)."""
        self._round = round_ if round_ is not None else self._rounds_begun
        self._rounds_begun += 1

    def layer_sums(self, batches: list[np.ndarray], depths: np.ndarray,
                   weights: np.ndarray | None = None) -> LayerSums:
        """Sum of the gradients of device i's mini-batch mean loss over its last `depths[i]` layers (times
        `weights[i]` if given)."""
        depths = check_depths(batches, depths, self.profile.n_layers)
        device_weights = None if weights is None else np.asarray(weights, dtype=np.float64)
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
                         depths[members], None if device_weights is None else device_weights[members]))
        largest = max(int(w[1].sum()) for w in work) * 3 * max(self.profile.fwd_flops_per_sample, 1.0)
        weights = Weights({n: t.detach().clone() for n, t in self.model.state_dict().items()}, self.model.training)
        call = f"{self._tag}-{self._calls}"
        model = [self._send(weights, "model")]

        def submit(k: int, attempt: int):
            model[0] = self._send(weights, "model", model[0])
            rows, sizes, shard_depths, shard_weights = work[k]
            return self.client.submit(self.task, self._run_spec(), k, model[0], rows, sizes, shard_depths,
                                      shard_weights, key=f"fedsim-grads-{call}-{k}-{attempt}", pure=False)

        try:
            parts = self._collect(submit, len(work), self.stall_timeout_s(largest), "gradient shard")
        finally:
            model[0].release()
        total = None
        for part in parts:                                        # shard order, whatever finished first
            total = add_sums(total, part)
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
        """How long a round may go without any of its tasks finishing: limits.TASK_TIMEOUT_S, plus the time the
        data took to build before round 0 (a worker taking over rebuilds it), plus the largest task's
        FLOPs at limits.TASK_MIN_FLOPS per second."""
        return limits.TASK_TIMEOUT_S + self._load_s + task_flops / limits.TASK_MIN_FLOPS

    def close(self) -> None:
        """Free the run's data on the workers (a long-lived cluster serves other runs), within
        limits.CLOSE_TIMEOUT_S; a worker that does not answer keeps it until two newer runs have pushed it out."""
        if self._closed:
            return
        self._closed = True
        if self._spec is not None:
            self._spec.release()
        with contextlib.suppress(Exception):
            self.client.run(forget_run, self._run_key, on_error="ignore", callback_timeout=limits.CLOSE_TIMEOUT_S)

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
        threads = nthreads(self.client, self.label)
        if not threads:
            try:
                self.client.wait_for_workers(1, timeout=limits.WORKER_WAIT_S)
            except Exception as exc:
                raise self._error(f"no Dask worker after {limits.WORKER_WAIT_S} s ({one_line(exc)}); start workers "
                                  "(docs/DISTRIBUTED.md)") from None
            threads = nthreads(self.client, self.label)
        return threads

    def _warm_up(self) -> None:
        """Build the run's data on every worker now: data errors surface before the run writes anything,
        and round 0 is not charged with the building. Its duration enters `stall_timeout_s`."""
        workers = sorted(self._workers())
        start = time.monotonic()

        def submit(k: int, attempt: int):
            return self.client.submit(self.load, self._run_spec(), key=f"fedsim-load-{self._tag}-{k}-{attempt}",
                                      workers=[workers[k]], allow_other_workers=True, pure=False)

        self._collect(submit, len(workers), limits.LOAD_TIMEOUT_S, "worker's data build")
        self._load_s = time.monotonic() - start

    def _collect(self, submit: Callable[[int, int], Any], n: int, timeout_s: float, what: str) -> list:
        """Submit tasks 0..n-1 (`submit(k, attempt)`), return their results in order.

        Waits at most `timeout_s` for each next task to finish. A task that errs with a FedsimError (bad
        data on a worker, a non-finite loss) raises it; a task cancelled because its inputs were lost is
        submitted again (limits.RESUBMITS times); anything else, or no progress, raises a ClusterError.
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
                        raise self._error(f"a {what} task failed on the cluster ({one_line(exc)})") from exc
                    cause = exc
                attempts[k] += 1
                if attempts[k] > limits.RESUBMITS:
                    raise self._error(f"a {what} task was lost {attempts[k]} times, last: {one_line(cause)}")
                launch(k)
        finally:
            for future in futures.values():
                future.release()
        return [results[k] for k in range(n)]

    def _stalled(self, what: str, pending: int, n: int, timeout_s: float) -> ClusterError:
        with contextlib.suppress(Exception):
            workers = len(self.client.nthreads(callback_timeout=limits.CLOSE_TIMEOUT_S))
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


def cluster_gradients(cluster):
    """What `fedsim.run.run_scenario` takes as `gradients` for a run on `cluster`."""
    return functools.partial(sharded_grads, cluster)
