"""A dry run of a scenario's first rounds, without simulating them: who takes part, when they would finish.

`preview` builds the run's server and asks it to set up rounds 0..R-1 exactly as a run would (selection, the
round's random draws, the policy's deadline and plan), at simulated time 0, then reads each participant's
expected finish time off the plan: download + forward + every layer's backward, plus the uploads unless the
upload mode is `ideal`. On a shared network the real transfers can only be slower (links are shared), and
under churn the online devices at t = 0 stand for every round. Nothing is computed by gradient and nothing is
written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from fedsim.policies import is_asynchronous
from fedsim.sim.build import Components
from fedsim.sim.server import Server
from fedsim.spec.scenario import Scenario, UploadMode

__all__ = ["Preview", "preview"]

PERCENTILES = (10, 50, 90, 100)


@dataclass(frozen=True)
class Preview:
    rounds: int                              # rounds set up
    devices_per_class: dict[str, int]
    participants: float                      # mean participants per round
    finish_s: dict[int, float]               # percentile -> expected finish of a participant's whole work, s
    deadlines_s: tuple[float | None, ...]    # each round's deadline
    straggler_share: float | None            # expected share of participants not done by the deadline
    drawn: str | None = None                 # fleet.depth_model: the stragglers drawn in these rounds

    def lines(self) -> list[str]:
        """The preview as the command line prints it."""
        classes = ", ".join(f"{n} {name}" for name, n in self.devices_per_class.items())
        pct = ", ".join(f"p{p} {v:.4g}" for p, v in self.finish_s.items() if p != 100)
        out = [f"  devices   {classes}",
               f"  expected  rounds 0-{self.rounds - 1}: {self.participants:.4g} participants per round; a "
               f"participant's whole work takes {pct}, max {self.finish_s[100]:.4g} s"]
        deadlines = {d for d in self.deadlines_s}
        if deadlines == {None}:
            out.append("  deadline  none: every round lasts until its slowest participant (or the quorum)")
        else:
            shown = ", ".join("none" if d is None else f"{d:.4g}" for d in sorted(deadlines, key=lambda d: d or 0))
            out.append(f"  deadline  {shown} s: {100 * self.straggler_share:.3g}% of participants expected "
                       "to be cut (stragglers)")
        if self.drawn is not None:
            out.append(f"  depths    {self.drawn}")
        return out


def preview(scn: Scenario, comp: Components, rounds: int = 10) -> Preview | None:
    """The first `rounds` rounds of a synchronous run as planned (None for an asynchronous policy)."""
    if is_asynchronous(scn.policy):
        return None
    server = Server(scn, comp.model, comp.profile, comp.fleet, comp.partition, comp.dataset, trace=None)
    env = simpy.Environment()
    finish, late, deadlines, sizes, drawn = [], [], [], [], []
    for r in range(min(rounds, scn.run.rounds)):
        if len(server.candidates(env.now)) == 0:
            break
        setup = server.setup_round(r, env)
        plan = setup.plan
        done_s = plan.download_s + plan.forward_s + plan.backward_s.sum(axis=1)
        if setup.upload_mode is not UploadMode.IDEAL:
            done_s = done_s + plan.upload_s.sum(axis=1)
        finish.append(done_s)
        deadlines.append(setup.deadline_s)
        sizes.append(plan.n)
        if setup.straggler_depth is not None:
            drawn.append(setup.straggler_depth)
        if setup.deadline_s is not None:
            late.append(done_s > setup.deadline_s)
    every = np.concatenate(finish) if finish else np.zeros(1)
    names = [c.name for c in comp.fleet.classes]
    counts = np.bincount(comp.fleet.class_of, minlength=len(names))
    return Preview(len(sizes), dict(zip(names, counts.tolist())), float(np.mean(sizes)) if sizes else 0.0,
                   {p: float(np.percentile(every, p)) for p in PERCENTILES}, tuple(deadlines),
                   float(np.concatenate(late).mean()) if late else None, _drawn(scn, drawn, comp.profile.n_layers))


def _drawn(scn: Scenario, drawn: list[np.ndarray], n_layers: int) -> str | None:
    """What the depth model drew in the rounds set up (None without one)."""
    spec = scn.fleet.depth_model
    if spec is None:
        return None
    every = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
    share = float((every >= 0).mean()) if len(every) else 0.0
    depth = f"uniform on 1..{n_layers}" if spec.depth is None else f"{spec.depth} of {n_layers} layers"
    return (f"fleet.depth_model: {100 * share:.3g}% of participants drawn as stragglers (probability "
            f"{spec.stragglers:g}), depth {depth}")
