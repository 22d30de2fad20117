"""The SimPy processes of an asynchronous run (`fedasync`, `fedbuff`): no rounds, no deadline.

Jobs. A job is one device's cycle: download the global model (version v), one full local step, upload.
It runs the synchronous engine's own device round (`fedsim.sim.device_round.DeviceRound` with no deadline,
for a one-device `RoundPlan` from `fedsim.world.timing.plan_round`), so durations, per-layer events, upload
modes and energy are exactly those of a synchronous round; in `ideal` upload mode the update arrives when
the backward pass ends, otherwise when its last layer has been uploaded. `serve_async` starts
min(max_concurrency, devices) jobs at t = 0; whenever a job ends, `AsyncServer.job_ended` (a plain call
from the job's last event, so nothing else runs in between) handles its update and then starts jobs on idle
devices until `max_concurrency` devices are training again. Which idle devices start is a uniform draw
from the stream `(SELECT_STREAM, k)` of the k-th draw; a job's mini-batch and slowdown come from
`(JOB_STREAM, j)` of the j-th job, so neither depends on how the run got there.

Updates. An update computed at version v that arrives when the server is at version V has staleness
V - v. If V - v > policy.max_staleness its version's snapshot is gone: the update is discarded (an
`update_discarded` event; its device row has depth 0). Otherwise it joins the buffer; at the K-th buffered
update (K = policy.buffer_size, 1 for fedasync) the server computes the real gradients of the buffered
updates, each at the version its device downloaded, weights them by s(V - v) / K and takes one step of
the server optimizer (SGD, training.lr and training.momentum), producing version V + 1. Gradients are
computed at that server step, which for K = 1 is the arrival: the values are the same as at arrival
(the snapshots cannot change in between), the updates of one version share one batched pass
(`GradientEngine.layer_sums`) in one scratch model, and updates never applied (discarded, never
delivered, or left in the buffer at the end) cost nothing. Old versions are kept only while some job
holds them, and at most max_staleness of them: memory is bounded by min(max_concurrency, max_staleness)
parameter snapshots, never one model per device.

Stopping. The run stops at policy.duration_s (or run.time_budget_s, if sooner), or when run.rounds updates have
been applied, whichever comes first. Updates arriving at the stop instant are not applied (the stop
timer was scheduled first). Jobs still running are interrupted (`stopped` events carry the energy of the
unfinished phase, as for a round's quorum); buffered updates not yet applied are dropped.

Evaluation. The global model is evaluated at every multiple of policy.eval_every_s up to the stop, and at
the stop. An evaluation at t sees every update applied at or before t. The model only changes at server
steps, so evaluations are taken lazily, just before the first server event after t, on the model as it
was at t.

Churn. Only online devices start jobs (`AsyncServer.is_online`). A watcher over the fleet reports the
devices switching at each instant (after everything else due then: a job whose update arrives as its
device leaves delivers it): the jobs of the devices that left end with status `offline`, then the free
slots are filled once, from every online idle device, those that came back included.

Trace. See fedsim.sim.async_trace for what the rows of rounds.parquet and devices.parquet mean in an async
run.
"""

from __future__ import annotations

import collections
import copy
import math
from typing import Callable

import numpy as np
import simpy
import torch

from fedsim.sim.device_round import DeviceOutcome, DeviceRound, StopCause
from fedsim.sim.round_setup import RoundSetup
from fedsim.errors import NumericalError
from fedsim.seeds import KEYED_STREAMS, keyed_rng
from fedsim.world.fleet import Fleet
from fedsim.learn.grads import GradientEngine
from fedsim.learn.profile import ModelProfile
from fedsim.spec.scenario import Scenario
from fedsim.world.churn import AlwaysOnline, churn
from fedsim.sim.health import devices_text
from fedsim.sim.async_trace import AsyncTrace, Job
from fedsim.sim.server import ServerBase
from fedsim.policies.asynchronous import AsyncPolicy
from fedsim.world.timing import plan_round
from fedsim.output.trace import SERVER, EventKind, TraceWriter

__all__ = ["AsyncServer", "JOB_STREAM", "SELECT_STREAM", "job_rng", "select_rng",
           "serve_async"]

JOB_STREAM = KEYED_STREAMS["job"]
SELECT_STREAM = KEYED_STREAMS["select"]


def job_rng(seed: int, job: int) -> np.random.Generator:
    """The stream of the j-th job: its mini-batch, then its slowdown (the order the sync server draws)."""
    return keyed_rng(seed, "job", job)


def select_rng(seed: int, step: int) -> np.random.Generator:
    """The stream of the k-th choice of idle devices."""
    return keyed_rng(seed, "select", step)


class AsyncServer(AsyncTrace, ServerBase):
    """The server of an asynchronous run: global model, version history, buffer, the fleet's jobs.

    Its trace rows: fedsim.sim.async_trace.
    """

    step_unit = "update"      # messages name server updates by their index

    def __init__(self, scenario: Scenario, model: torch.nn.Module, profile: ModelProfile, fleet: Fleet,
                 partition, dataset, trace: TraceWriter):
        super().__init__(scenario, model, profile, fleet, partition, dataset, trace)
        self.policy: AsyncPolicy = scenario.policy
        # Gradients are taken in one scratch copy loaded with whichever version is being differentiated;
        # the global model itself is only ever changed by the optimizer.
        self.scratch = copy.deepcopy(model)
        self.grads = GradientEngine(self.scratch, profile, dataset.x_train, dataset.y_train,
                                    path=scenario.training.grad_path, loss=self.loss)
        n = fleet.n_devices
        self.max_concurrency = self.policy.concurrency(n, scenario.fleet.participants)
        # None: every device is always online
        self.is_online: Callable[[int, float], bool] | None = (
            None if isinstance(self.availability, AlwaysOnline) else self.availability.is_online)
        self.history: dict[int, dict[str, torch.Tensor]] = {}   # old version -> parameter snapshot
        self.peak_snapshots = 0
        self._holders: collections.Counter[int] = collections.Counter()   # version -> jobs holding it
        self._scratch_version = -1
        self._buffer: list[Job] = []
        self._busy = np.zeros(n, dtype=bool)
        self._next_job = 0
        self._select_step = 0
        self._closing = False
        self._holding = False          # churn is being applied: dispatch once it is all applied
        self._main: simpy.Process | None = None
        self._on_update: Callable[[int], None] | None = None
        self._last_step_at = 0.0
        self._pending_energy_j = 0.0   # energy of device rows in the pending update's row
        self._arrived = 0              # updates that arrived since the last server step
        self._next_eval = 1            # the next evaluation instant is _next_eval * eval_every_s
        self._n_layers = profile.n_layers

    # -- jobs -------------------------------------------------------------------------------------
    def start(self, env: simpy.Environment, on_update: Callable[[int], None] | None = None) -> None:
        self._main = env.active_process
        self._on_update = on_update
        self.dispatch(env)

    def dispatch(self, env: simpy.Environment) -> None:
        """Start jobs on idle online devices until max_concurrency devices are training."""
        if self._closing or self._holding:
            return
        need = self.max_concurrency - len(self.active)
        if need <= 0:
            return
        for device in np.sort(self._pick(need, env.now)):
            self._start(env, int(device))

    def _pick(self, need: int, now_at: float) -> np.ndarray:
        idle = np.flatnonzero(~self._busy)
        if self.is_online is None:
            if idle.size <= need:
                return idle               # no choice to make: no draw
            rng = select_rng(self.scenario.run.seed, self._select_step)
            self._select_step += 1
            return rng.choice(idle, size=need, replace=False)
        if idle.size == 0:
            return idle
        rng = select_rng(self.scenario.run.seed, self._select_step)
        self._select_step += 1
        chosen = []
        for d in rng.permutation(idle):   # a uniform order: its first `need` online devices are uniform
            if self.is_online(int(d), now_at):
                chosen.append(d)
                if len(chosen) == need:
                    break
        return np.array(chosen, dtype=np.int64)

    def _start(self, env: simpy.Environment, device: int) -> None:
        j = self._next_job
        self._next_job += 1
        rng = job_rng(self.scenario.run.seed, j)
        batch = self.partition.sample_batch(device, self.scenario.training.batch_size, rng)
        devices = np.array([device], dtype=np.int64)
        slowdown = self.fleet.sample_slowdown(devices, rng)
        f = self.fleet
        plan = plan_round(self.profile, devices, f.speed_flops[devices], slowdown,
                          np.array([len(batch)], dtype=np.int64), np.ones(1, dtype=np.int64),
                          f.downlink_bps[devices], f.uplink_bps[devices], f.latency_s[devices],
                          step_overhead_s=f.step_overhead_s(devices), layer_time=f.sample_layer_time(
                              devices, self.profile.n_layers, keyed_rng(self.scenario.run.seed, "job_layer_time", j)))
        setup = RoundSetup(self.current_round, plan, None, self.scenario.network.upload_mode,
                           [f.class_spec(device)])
        job = Job(j, device, self.current_round, batch, float(slowdown[0]), setup)
        self._busy[device] = True
        self._holders[job.version] += 1
        job_round = DeviceRound(env, setup, 0, self.trace, lambda ended: self.job_ended(env, job, ended.out))
        self.active[device] = job_round
        job_round.start()

    def devices_switched(self, env: simpy.Environment, devices: list[int], online: list[bool]) -> None:
        """Churn at this instant: stop the jobs of the devices that left, then fill the idle slots once."""
        self._holding = True
        try:
            self.stop_departed(devices, online)
        finally:
            self._holding = False
        self.dispatch(env)

    def job_ended(self, env: simpy.Environment, job: Job, out: DeviceOutcome) -> None:
        """A job is over: its update arrived, or it was stopped. Called from the job's last event."""
        del self.active[job.device]
        self._busy[job.device] = False
        self._evaluate_until(env.now)          # before the model can change at this instant
        job.outcome = out
        if out.done_at is None or self._closing:
            self._record(job, applied=False, round_=self.current_round)
            self._release(job.version)
        else:
            self._arrived += 1
            staleness = self.current_round - job.version
            if staleness > self.policy.max_staleness:
                self.trace.event(self.current_round, env.now, job.device, EventKind.UPDATE_DISCARDED)
                self._record(job, applied=False, round_=self.current_round)
                self._release(job.version)
            else:
                self._buffer.append(job)
                if len(self._buffer) >= self.policy.buffer_size:
                    self._server_step(env)
        self.dispatch(env)

    # -- the server step --------------------------------------------------------------------------
    def _server_step(self, env: simpy.Environment) -> None:
        jobs, self._buffer = self._buffer, []
        u = self.current_round
        dropped: list[Job] = []
        try:
            total, loss_sum = self._buffer_gradient(jobs, u)
        except NumericalError as exc:
            total, loss_sum, jobs, dropped = self._drop_nonfinite(jobs, u, str(exc))
        if not jobs:                       # every update was non-finite and dropped: no server step
            self._checked(self.health.record, u, None, [job.device for job in dropped])
            return
        k = len(jobs)
        for job in jobs:
            self._release(job.version)
        # keep version u while jobs still hold it (they will arrive with staleness >= 1)
        if self._holders.get(u, 0) > 0 and self.policy.max_staleness >= 1:
            self.history[u] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self._apply(total)
        error = self.weights_error(u, [job.device for job in jobs])
        self.current_round = u + 1
        oldest = self.current_round - self.policy.max_staleness
        for v in [v for v in self.history if v < oldest]:
            del self.history[v]
        self.peak_snapshots = max(self.peak_snapshots, len(self.history))
        for job in jobs:
            self._record(job, applied=True, round_=u)
        now = env.now
        self.trace.event(u, now, SERVER, EventKind.UPDATE_APPLIED)
        self._write_row(u, self._last_step_at, now, participants=k, train_loss=loss_sum / k)
        self._last_step_at = self.clock_at = now
        if error is not None:
            self.trace.end_round()
            raise error
        self._checked(self.health.record, u, loss_sum / k, [job.device for job in dropped])
        if self._on_update is not None:
            self._on_update(self.current_round)
        if self.current_round >= self.scenario.run.rounds and not self._closing:
            self._closing = True          # run.rounds is an upper bound on server steps
            self._main.interrupt()

    def _buffer_gradient(self, jobs: list[Job], u: int) -> tuple[dict[str, torch.Tensor], float]:
        """The staleness-weighted mean gradient of `jobs` at update `u`, and the sum of their losses."""
        k = len(jobs)
        total: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        for v in sorted({job.version for job in jobs}):
            group = [job for job in jobs if job.version == v]
            self._load_scratch(v)
            sums = self.grads.layer_sums([job.batch for job in group], np.full(len(group), self._n_layers))
            weight = self.policy.staleness_weight(u - v) / k
            for name, g in sums.sums.items():
                total[name] = total[name] + weight * g if name in total else weight * g
            loss_sum += sums.loss_sum
        for name, g in total.items():
            if not bool(torch.isfinite(g).all()):
                raise NumericalError(f"non-finite aggregated gradient of {name}")
        return total, loss_sum

    def _drop_nonfinite(self, jobs: list[Job], u: int, cause: str):
        """NaN/Inf in update `u`'s buffer: find the jobs whose own update is not finite; stop the run naming
        them (training.on_nonfinite = "stop"), or drop them and aggregate the others. Returns (gradient,
        loss sum, jobs kept, jobs dropped); the gradient is None when every job was dropped."""
        bad, losses = self._nonfinite_jobs(jobs)
        bad_ids = {job.id for job in bad}
        kept = [job for job in jobs if job.id not in bad_ids]
        versions = ", ".join(str(v) for v in sorted({job.version for job in bad}))
        what = (f"{devices_text(sorted({job.device for job in bad}))} ({len(bad)} update(s) of the buffer, "
                f"computed at model version {versions})")
        error = None
        if bad and self.scenario.training.on_nonfinite == "stop":
            error = NumericalError(f"update {u}: non-finite loss or gradient in {what} ({cause}); "
                                   "lower training.lr, or set training.on_nonfinite = \"drop\"")
        elif kept:
            try:
                total, loss_sum = self._buffer_gradient(kept, u)
            except NumericalError as exc:
                worst = max(kept, key=lambda job: losses.get(job.id, -math.inf))
                error = NumericalError(
                    f"update {u}: non-finite aggregate of {devices_text([job.device for job in kept])}, although "
                    f"each one's update is finite alone ({exc}; the largest loss, {losses.get(worst.id, math.nan):.3g}, "
                    f"is device {worst.device}'s): training has diverged; lower training.lr")
        for job in bad:
            self._record(job, applied=False, round_=u, nonfinite=True)
            self._release(job.version)
        if error is not None:
            for job in kept:
                self._record(job, applied=False, round_=u)
                self._release(job.version)
            self.trace.end_round()
            raise error
        if not kept:
            return None, 0.0, [], bad
        return total, loss_sum, kept, bad

    def _nonfinite_jobs(self, jobs: list[Job]) -> tuple[list[Job], dict[int, float]]:
        """The jobs whose own gradient or loss is not finite (each at its version), and the others' losses."""
        bad, losses = [], {}
        for job in jobs:
            self._load_scratch(job.version)
            try:
                sums = self.grads.layer_sums([job.batch], np.array([self._n_layers]))
                finite = all(bool(torch.isfinite(g).all()) for g in sums.sums.values())
            except NumericalError:
                finite = False
            if finite:
                losses[job.id] = sums.loss_sum
            else:
                bad.append(job)
        return bad, losses

    def _checked(self, check: Callable, *args) -> None:
        """Run a check that may end the run; the rows recorded so far are flushed first if it does."""
        try:
            check(*args)
        except NumericalError:
            self.trace.end_round()
            raise

    def _load_scratch(self, version: int) -> None:
        if self._scratch_version == version:
            return
        if version == self.current_round:
            source = dict(self.model.named_parameters())
        else:
            source = self.history[version]
        with torch.no_grad():
            for name, p in self.scratch.named_parameters():
                p.copy_(source[name])
        self._scratch_version = version

    def _apply(self, grads: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            p.grad = grads.get(name)
        self.optimizer.step()
        for p in params.values():
            p.grad = None

    def _release(self, version: int) -> None:
        self._holders[version] -= 1
        if self._holders[version] <= 0:
            del self._holders[version]
            self.history.pop(version, None)     # nobody can arrive with it any more

    # -- end of run and evaluations ---------------------------------------------------------------
    def finish(self, env: simpy.Environment) -> None:
        """Stop the jobs still running, drop the unfinished buffer, write the final evaluation row."""
        self._closing = True
        for job_round in list(self.active.values()):
            job_round.interrupt(StopCause.QUORUM)        # each ends at once, through job_ended
        for job in self._buffer:
            self._record(job, applied=False, round_=self.current_round)
            self._release(job.version)
        self._buffer = []
        self._evaluate_until(env.now)
        self.clock_at = env.now
        self._write_eval(env.now, final=True)
        self.health.finish(max(self.current_round - 1, 0), self.last_eval)


def serve_async(env: simpy.Environment, server: AsyncServer, on_update: Callable[[int], None] | None = None):
    """The server process of an asynchronous run: start the jobs, stop at duration_s (or run.time_budget_s,
    whichever comes first) or after run.rounds steps."""
    # scheduled before any job event: an update arriving exactly at the stop is not applied
    budget_s = server.time_budget_s
    by_budget = budget_s is not None and budget_s <= server.policy.duration_s
    stop = env.timeout(budget_s if by_budget else server.policy.duration_s)
    server.ended_by = "time_budget_s" if by_budget else "duration_s"
    server.start(env, on_update)
    watcher = None
    if server.is_online is not None:
        watcher = env.process(churn(env, server.availability, np.arange(server.fleet.n_devices),
                                    lambda devices, online: server.devices_switched(env, devices, online)))
    try:
        yield stop
    except simpy.Interrupt:
        server.ended_by = "rounds"            # run.rounds server steps reached first
    if watcher is not None and watcher.is_alive:
        watcher.interrupt()
    server.finish(env)
