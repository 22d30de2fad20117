"""The trace rows of both servers: a device's row with its energy, and a round's (or update's) row.

One builder per table, used by the synchronous server (`fedsim.sim.server`) and the asynchronous one
(`fedsim.sim.async_trace`). Each returns a dict with exactly the table's columns; `TableWriter.append`
refuses a row with a missing or an extra column.

Energy of a device in a round: each phase at its class's power, `power_rx_w * download_s +
power_compute_w * compute_s + power_tx_w * upload_s + power_idle_w * idle_s` (joules), summed in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fedsim.learn.evaluate import Evaluation
from fedsim.output.trace import DeviceStatus, category_column, status_column
from fedsim.sim.device_round import DeviceOutcome
from fedsim.sim.outcomes import RoundOutcomes
from fedsim.spec.scenario import DeviceClassSpec

__all__ = ["PhaseEnergy", "device_columns", "device_row", "round_row"]


@dataclass(frozen=True)
class PhaseEnergy:
    """Joules a device spent in each phase of a round."""
    download_j: float
    compute_j: float
    upload_j: float
    idle_j: float

    @classmethod
    def of(cls, spec: DeviceClassSpec, out: DeviceOutcome, idle_s: float) -> "PhaseEnergy":
        return cls(spec.power_rx_w * out.download_s, spec.power_compute_w * out.compute_s,
                   spec.power_tx_w * out.upload_s, spec.power_idle_w * idle_s)

    @property
    def total_j(self) -> float:
        return self.download_j + self.compute_j + self.upload_j + self.idle_j


def device_row(round_: int, device: int, spec: DeviceClassSpec, status: DeviceStatus, depth: int, samples: int,
               speed_flops: float, out: DeviceOutcome, idle_s: float) -> tuple[dict[str, Any], float]:
    """A devices.parquet row and the device's energy in joules."""
    e = PhaseEnergy.of(spec, out, idle_s)
    total_j = e.total_j
    return {
        "round": round_, "device": device, "class": spec.name, "status": status.value, "depth": depth,
        "layers_computed": out.layers_computed, "samples": samples, "speed_flops": speed_flops,
        "download_s": out.download_s, "compute_s": out.compute_s, "upload_s": out.upload_s, "idle_s": idle_s,
        "energy_download_j": e.download_j, "energy_compute_j": e.compute_j, "energy_upload_j": e.upload_j,
        "energy_idle_j": e.idle_j, "energy_j": total_j,
    }, total_j


def device_columns(round_: int, devices: np.ndarray, class_index: np.ndarray, classes: Sequence[DeviceClassSpec],
                   statuses: np.ndarray, samples: np.ndarray, speed_flops: np.ndarray, outcomes: RoundOutcomes,
                   idle_s: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """The devices.parquet rows of one round's participants as columns (arrays), and their energy in joules.

    Column i holds what `device_row` gives for participant i (device `devices[i]` of class
    `classes[class_index[i]]`, status `DeviceStatus` number `statuses[i]`), value for value (the class and status
    columns are Arrow strings, the others numpy arrays): the energy is the same IEEE arithmetic in
    the same order, array-wise, and the total is summed device by device (a cumulative sum), as the rows' loop
    does."""
    n = len(outcomes)
    cls = np.asarray(class_index, dtype=np.int64)
    download_s, compute_s, upload_s = outcomes.download_s, outcomes.compute_s, outcomes.upload_s
    idle_s = np.asarray(idle_s, dtype=np.float64)

    def power(name: str) -> np.ndarray:
        return np.array([getattr(c, name) for c in classes], dtype=np.float64)[cls]

    e_down, e_compute = power("power_rx_w") * download_s, power("power_compute_w") * compute_s
    e_up, e_idle = power("power_tx_w") * upload_s, power("power_idle_w") * idle_s
    energy = e_down + e_compute + e_up + e_idle
    return {
        "round": np.full(n, round_, dtype=np.int64), "device": np.asarray(devices, dtype=np.int64),
        "class": category_column([c.name for c in classes], cls), "status": status_column(statuses),
        "depth": outcomes.depth, "layers_computed": outcomes.layers_computed,
        "samples": np.asarray(samples, dtype=np.int64), "speed_flops": np.asarray(speed_flops, dtype=np.float64),
        "download_s": download_s, "compute_s": compute_s, "upload_s": upload_s, "idle_s": idle_s,
        "energy_download_j": e_down, "energy_compute_j": e_compute, "energy_upload_j": e_up,
        "energy_idle_j": e_idle, "energy_j": energy,
    }, float(np.cumsum(energy)[-1]) if n else 0.0


def round_row(round_: int, policy: str, start_s: float, end_s: float, participants: int, delivered_any: int,
              completed: int, contributors: np.ndarray | list[int], train_loss: float | None,
              evaluation: Evaluation | None, energy_j: float, deadline_s: float | None = None) -> dict[str, Any]:
    """A rounds.parquet row (an update or evaluation row in an asynchronous run); `ended_by` is set on the
    last row when the run completes (`fedsim.output.trace.TraceWriter.close`)."""
    return {
        "round": round_, "policy": policy, "start_s": start_s, "end_s": end_s, "duration_s": end_s - start_s,
        "deadline_s": deadline_s,
        "participants": participants, "delivered_any": delivered_any, "completed": completed,
        "contributors": np.asarray(contributors).astype(np.int32).tolist(), "train_loss": train_loss,
        "test_loss": None if evaluation is None else evaluation.loss,
        "test_accuracy": None if evaluation is None else evaluation.accuracy,
        "energy_j": energy_j, "ended_by": None,
    }
