"""The trace of an asynchronous run (`fedsim.sim.async_engine.AsyncServer`): its jobs and its rows.

Trace rows (same Parquet schema as synchronous runs):

* rounds.parquet, an *update row* per server step: `round` = update index u (0-based; it produces
  model version u + 1), `start_s`/`end_s` = times of the previous step (0 for the first) and of this
  one, `participants` = `completed` = updates applied (K), `delivered_any` = updates that arrived since
  the previous step (applied + discarded), `contributors` = K for every layer, `train_loss` = mean
  mini-batch loss of the applied updates (each at its own version), test columns null, `energy_j` =
  energy of the device rows with this `round`.
  An *evaluation row* at each evaluation instant t: `round` = model version evaluated (= updates
  applied so far, so it sorts just before the update row with the same number), `start_s` = `end_s` = t,
  `duration_s` = 0, `participants` = `completed` = 0, contributors 0, `train_loss` null, test columns
  filled, `energy_j` = 0. The last row (at the stop) is an evaluation row that also carries the jobs
  the run ended with: `delivered_any` = updates that arrived after the last step, `energy_j` = energy
  of the device rows with its `round`. So sum(rounds.energy_j) == sum(devices.energy_j).
* devices.parquet, one row per job: `round` = the update index it was applied in (or, if it was not
  applied, the update index pending when it ended), `depth` = all layers if applied else 0, `status`
  complete / nothing (discarded, stopped by the end, or left in the buffer) / offline (churn);
  timing and energy columns as in a synchronous round; `idle_s` = 0 (a job has nothing to wait for;
  like a device not selected for a round, a device waiting for a slot is not charged).
* events.parquet: a job's device events carry `round` = the version it downloaded, so an update's
  staleness is its devices-row `round` minus its events' `round`. Server events: `update_applied`
  (device -1, `round` = update index) and `update_discarded` (`device` = the device whose update was
  too stale, `round` = the pending update index, as in its device row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.learn.evaluate import Evaluation, evaluate
from fedsim.output.trace import DeviceStatus
from fedsim.sim.device_round import DeviceOutcome, StopCause
from fedsim.sim.records import device_row, round_row
from fedsim.sim.round_setup import RoundSetup

__all__ = ["AsyncTrace", "Job"]


@dataclass
class Job:
    """One device's cycle: download version `version`, one local step, upload."""
    id: int
    device: int
    version: int                 # global model version the device downloaded
    batch: np.ndarray            # training-sample indices of its mini-batch
    slowdown: float
    setup: RoundSetup
    outcome: DeviceOutcome | None = None


class AsyncTrace:
    """The rows an `AsyncServer` writes: evaluation and update rows of rounds.parquet, a job's devices row."""

    def _evaluate_until(self, now_at: float) -> None:
        """Evaluation rows for the instants strictly before now (the model has not changed since)."""
        every = self.policy.eval_every_s
        while True:
            at = self._next_eval * every       # a product, not a running sum: no drift over a long run
            if at >= now_at or at > self.policy.duration_s:
                return
            self._write_eval(at)
            self._next_eval += 1

    def _write_eval(self, at: float, final: bool = False) -> None:
        self.last_eval = evaluate(self.model, self.x_test, self.y_test, loss=self.loss)
        self._write_row(self.current_round, at, at, participants=0, train_loss=None, evaluation=self.last_eval,
                        carry=final)
        self.trace.end_round()          # flush at each evaluation: a crash loses one interval at most

    # -- rows -------------------------------------------------------------------------------------
    def _write_row(self, round_: int, start_at: float, end_at: float, participants: int,
                   train_loss: float | None, evaluation: Evaluation | None = None, carry: bool = True) -> None:
        """One rounds.parquet row; `carry` moves the pending device energy and arrivals into it."""
        energy_j, delivered = (self._pending_energy_j, self._arrived) if carry else (0.0, 0)
        if carry:
            self._pending_energy_j, self._arrived = 0.0, 0
        self.trace.rounds.append(round_row(round_, self.policy.describe(), start_at, end_at, participants, delivered,
                                           participants, [participants] * self._n_layers, train_loss, evaluation,
                                           energy_j))

    def _record(self, job: Job, applied: bool, round_: int, nonfinite: bool = False) -> None:
        """The job's devices.parquet row, with the energy formulas of a synchronous round (idle 0)."""
        o = job.outcome
        if applied:
            status = DeviceStatus.COMPLETE
        elif nonfinite:
            status = DeviceStatus.NONFINITE      # its update had NaN/Inf and was dropped
        elif o.stopped is StopCause.OFFLINE:
            status = DeviceStatus.OFFLINE
        else:
            status = DeviceStatus.NOTHING
        row, energy_j = device_row(round_, job.device, job.setup.powers[0], status, self._n_layers if applied else 0,
                                   len(job.batch), float(self.fleet.speed_flops[job.device] / job.slowdown), o, 0.0)
        self._pending_energy_j += energy_j
        self.trace.devices.append(row)
