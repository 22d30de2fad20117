"""A run's numerical health: the divergence rule, non-finite updates dropped, and how devices are named."""

from __future__ import annotations

import math

import torch

from fedsim.errors import NumericalError
from fedsim.learn.evaluate import Evaluation

__all__ = ["DIVERGENCE_ROUNDS", "NumericalHealth", "devices_text", "require_finite"]


def require_finite(update) -> None:
    for name, g in update.grads.items():
        if g is not None and not bool(torch.isfinite(g).all()):
            raise NumericalError(f"non-finite aggregated gradient of {name}")
    for name, w in (update.weights or {}).items():
        if not bool(torch.isfinite(w).all()):
            raise NumericalError(f"non-finite aggregated weights of {name}")


_SHOWN_DEVICES = 20      # a message lists at most this many device ids


def devices_text(ids) -> str:
    """`device 3`, `devices 1, 4, 5`, or the first few ids and how many there are."""
    ids = [int(d) for d in ids]
    if len(ids) == 1:
        return f"device {ids[0]}"
    shown = ", ".join(str(d) for d in ids[:_SHOWN_DEVICES])
    return f"devices {shown}" + (f", ... ({len(ids)} devices)" if len(ids) > _SHOWN_DEVICES else "")


# The divergence rule (README, training.divergence_factor): a run has diverged when the mean training loss
# of the updates applied stays above divergence_factor x max(the first such loss, ln(classes)) for this many
# rounds (asynchronous: server updates) in a row, or when its final test loss is above that bound.
DIVERGENCE_ROUNDS = 3


class NumericalHealth:
    """Whether a run is still training: the divergence rule, and the non-finite updates dropped.

    The server reports every round (asynchronous: every server-step attempt) with `record`, and the end of
    the run with `finish`; both raise `NumericalError` when the run must end failed. `warnings()` is what a
    run that completes should report. `unit` names a step in messages: "round", or "update" (the update
    index of an asynchronous run).
    """

    def __init__(self, factor: float, num_classes: int, unit: str = "round"):
        self.factor = factor
        self.floor = math.log(max(int(num_classes), 2))    # the loss of a uniform guess
        self.unit = unit
        self.reference: float | None = None   # mean training loss of the first update applied
        self.streak: list[tuple[int, float, tuple[int, ...]]] = []   # steps above the bound, in a row
        self.applied = 0                      # updates applied (rounds whose update changed the model)
        self.dropped = 0                      # device-updates dropped as non-finite
        self.dropped_steps = 0                # distinct rounds (update indices) with at least one drop
        self.first_dropped: int | None = None
        self.last_dropped: int | None = None
        self.dropped_devices: set[int] = set()

    @property
    def bound(self) -> float:
        return self.factor * max(self.reference or 0.0, self.floor)

    def record(self, step: int, loss: float | None, dropped: list[int]) -> None:
        """Step `step` is over: `loss` is the mean training loss of the update applied (None: no update),
        `dropped` the devices whose non-finite update was dropped. Raises NumericalError on divergence."""
        if dropped:
            self.dropped += len(dropped)
            if step != self.last_dropped:
                self.dropped_steps += 1
            if self.first_dropped is None:
                self.first_dropped = step
            self.last_dropped = step
            self.dropped_devices.update(int(d) for d in dropped)
        if loss is None and not dropped:
            return                            # nothing delivered: says nothing about the model
        if loss is not None:
            self.applied += 1
            if self.reference is None and math.isfinite(loss):
                self.reference = float(loss)
        value = math.inf if loss is None else float(loss)    # every update non-finite: none applied
        if value <= self.bound:
            self.streak = []
            return
        self.streak.append((step, value, tuple(int(d) for d in dropped)))
        if len(self.streak) >= DIVERGENCE_ROUNDS:
            raise NumericalError(self._diverged())

    def finish(self, step: int, evaluation: Evaluation | None) -> None:
        """The run ends after step `step` with this final evaluation: raise if it has not trained."""
        if self.applied == 0 and self.dropped:
            raise NumericalError(
                f"{self.unit} {step}: no update applied in the whole run: every delivered update was non-finite "
                f"and dropped ({self.dropped} device-updates, from {devices_text(sorted(self.dropped_devices))}); "
                "the global model itself gives NaN/Inf: check the model, or lower training.lr")
        if self.applied and evaluation is not None and not evaluation.loss <= self.bound:
            where = "not finite" if math.isnan(evaluation.loss) else f"above {self.bound:.3g} ({self._bound_text()})"
            raise NumericalError(f"{self.unit} {step}: training diverged: the final model's test loss is "
                                 f"{evaluation.loss:.3g}, {where}; lower training.lr")

    def _bound_text(self) -> str:
        ref = "ln(classes)" if self.reference is None or self.reference < self.floor else f"the first {self.unit}'s training loss"
        return f"training.divergence_factor {self.factor:g} x {max(self.reference or 0.0, self.floor):.3g}, {ref}"

    def _diverged(self) -> str:
        steps = [s for s, _, _ in self.streak]
        span = f"{self.unit} {steps[0]}" if steps[0] == steps[-1] else f"{self.unit}s {steps[0]}-{steps[-1]}"
        devices = sorted({d for _, _, ds in self.streak for d in ds})
        empty = [s for s, v, _ in self.streak if v == math.inf]
        n = len(self.streak)
        if len(empty) == n:
            lost = sum(len(ds) for _, _, ds in self.streak)
            return (f"{span}: no update applied: every delivered update was non-finite and dropped, {n} times in a "
                    f"row ({lost} device-updates, from {devices_text(devices)}); the global model itself gives "
                    "NaN/Inf: check the model, or lower training.lr")
        last = [v for _, v, _ in self.streak if v != math.inf][-1]
        text = (f"{span}: training diverged: the mean training loss stayed above {self.bound:.3g} "
                f"({self._bound_text()}) for {n} {self.unit}s in a row (last {last:.3g})")
        if empty:
            text += (f"; in {self.unit}{'s' if len(empty) > 1 else ''} {', '.join(str(s) for s in empty)} every "
                     f"update was non-finite and dropped ({devices_text(devices)})")
        return text + "; lower training.lr"

    def warnings(self) -> dict:
        """What a run that completes should report; {} when there is nothing to report."""
        out: dict = {}
        messages = []
        if self.dropped:
            devices = sorted(self.dropped_devices)
            out.update(nonfinite_dropped=self.dropped, nonfinite_rounds=self.dropped_steps,
                       nonfinite_first_round=self.first_dropped, nonfinite_last_round=self.last_dropped,
                       nonfinite_devices=devices[:100], nonfinite_device_count=len(devices))
            span = (f"{self.unit} {self.first_dropped}" if self.first_dropped == self.last_dropped
                    else f"{self.unit}s {self.first_dropped}-{self.last_dropped}")
            messages.append(f"{self.dropped} device-update(s) with NaN/Inf dropped (training.on_nonfinite = "
                            f"\"drop\") in {self.dropped_steps} {self.unit}(s) ({span}), from {devices_text(devices)}")
        if self.applied == 0:
            messages.append("no update was applied in the whole run: the model is the initial one")
        if messages:
            out["updates_applied"] = self.applied
            out["messages"] = messages
        return out

    def state(self) -> dict:
        """Plain values for a checkpoint (`restore` takes them back)."""
        return {"reference": self.reference, "streak": [[s, v, list(ds)] for s, v, ds in self.streak],
                "applied": self.applied, "dropped": self.dropped, "dropped_steps": self.dropped_steps,
                "first_dropped": self.first_dropped, "last_dropped": self.last_dropped,
                "dropped_devices": sorted(self.dropped_devices)}

    def restore(self, state: dict) -> None:
        self.reference = state["reference"]
        self.streak = [(int(s), float(v), tuple(int(d) for d in ds)) for s, v, ds in state["streak"]]
        self.applied, self.dropped, self.dropped_steps = state["applied"], state["dropped"], state["dropped_steps"]
        self.first_dropped, self.last_dropped = state["first_dropped"], state["last_dropped"]
        self.dropped_devices = set(state["dropped_devices"])
