"""The SALF paper's claims against the sweeps of one model: one table and three figures.

`python -m analysis.paper_check DIR [--out OUT] --budget-s B --target A` (or `fedsim plot paper-check DIR`),
where DIR holds the sweeps of one model (any folder of runs); writes into OUT, by default DIR/analysis.

Runs are grouped by scenario, seeds apart (analysis.runs). Per group, the mean and sample standard
deviation (ddof=1) over seeds of: the fraction of device-rounds that were stragglers (did not deliver
every layer), the test accuracy after the last round, the accuracy at a simulated-time budget B (the last
evaluation at or before B), the simulated time and the fleet energy to reach accuracy A (runs that never
reach it are counted apart). Figures: accuracy per round at the tightest deadline (does SALF track wait
round by round?), accuracy against simulated time at that deadline, and final accuracy against the deadline.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow.parquet as pq

from .common import Section, Table, finish, pm, script_main
from .figures import caption, label_line_ends, plt, save_figure
from .runs import AnalysisError, accuracy_at, final_accuracy, mean_std, reach

__all__ = ["main", "summarise"]

FREE = "-"      # the deadline column of policies without a deadline
ASYNC = ("fedasync", "fedbuff")
# one colour per policy, the same in every figure
COLORS = {"salf": "tab:red", "drop": "tab:blue", "wait": "black", "partial": "tab:green", "heterofl": "tab:orange",
          "overselect": "tab:purple", "fedasync": "tab:brown", "fedbuff": "tab:gray"}
HIDDEN = ("policy.name", "policy.deadline_s", "run.rounds")      # in their own columns, or implied


def add_arguments(parser) -> None:
    parser.add_argument("--budget-s", type=float, default=10.0, help="simulated-time budget for the accuracy column")
    parser.add_argument("--target", type=float, default=0.85, help="target test accuracy")


def _straggler_fraction(run) -> float:
    status = pq.read_table(run.path / "devices.parquet", columns=["status"]).column("status").to_pylist()
    return float(np.mean([s != "complete" for s in status])) if status else math.nan


def _ms(values) -> str:
    m, s, _ = mean_std(values)
    return pm(m, s)


def _other(group) -> str:
    """The settings that set the group apart, besides its policy and deadline."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in group.settings.items()
                     if k not in HIDDEN and v is not None) or ""


def _order(group):
    d = group.runs[0].deadline_s
    return (d is None, d or 0.0, group.runs[0].policy_name, group.number)


def summarise(study, budget_s: float, target: float) -> Table:
    rows = []
    for g in sorted(study.groups, key=_order):
        runs = g.runs
        hits = [h for h in (reach(r, target) for r in runs) if h is not None]
        deadline = runs[0].deadline_s
        rows.append([runs[0].policy_name, FREE if deadline is None else f"{deadline:g}", _other(g), g.n,
                     _ms([_straggler_fraction(r) for r in runs]), _ms([final_accuracy(r) for r in runs]),
                     _ms([accuracy_at(r, budget_s) for r in runs]),
                     _ms([float(r.rounds["end_s"][-1]) for r in runs]),
                     _ms([h[0] for h in hits]) + ("" if len(hits) == g.n else f" ({len(hits)}/{g.n} reached)"),
                     _ms([h[1] for h in hits])])
    return Table("paper_check", "Policies against deadlines (mean ± sample std, ddof=1, over seeds)",
                 ["policy", "deadline_s", "other settings", "seeds", "straggler fraction", "final accuracy",
                  f"accuracy at {budget_s:g} s", "simulated time_s", f"time_s to {target:g}", f"energy_j to {target:g}"],
                 rows, "std n/a: one seed. Time and energy to the target: over the seeds that reached it.")


def _name(group) -> str:
    other = _other(group)
    return group.runs[0].policy_name + (f" ({other})" if other else "")


def _curve(ax, group, x: str, colour: str, x_max: float) -> tuple[float, float]:
    """Draw the group's mean curve; return its last point at or before x_max (where its label goes)."""
    points = []
    for run in group.runs:
        r = run.rounds
        ok = ~np.isnan(r["test_accuracy"])
        points.append((r["round"][ok] + 1 if x == "round" else r["end_s"][ok], r["test_accuracy"][ok]))
    if x == "round":       # synchronous runs share their evaluated rounds
        n = min(len(p[0]) for p in points)
        xs, ys = points[0][0][:n], np.array([p[1][:n] for p in points])
        mean = ys.mean(axis=0)
        if len(points) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    else:
        xs = np.linspace(0, max(p[0].max() for p in points), 300)
        ys = np.array([np.interp(xs, p[0], p[1], left=np.nan) for p in points])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # before a run's first evaluation: no value
            mean = np.nanmean(ys, axis=0)
    ax.plot(xs, mean, color=colour, linewidth=1.4)
    ok = np.flatnonzero((xs <= x_max) & ~np.isnan(mean))
    i = ok[-1] if len(ok) else len(xs) - 1
    return float(xs[i]), float(mean[i])


def figures(study, out, budget_s: float) -> list:
    deadlines = sorted({g.runs[0].deadline_s for g in study.groups if g.runs[0].deadline_s is not None})
    if not deadlines:
        raise AnalysisError(f"{study.directory}: no run has a deadline; the paper check compares deadlines")
    tight = deadlines[0]
    chosen = [g for g in sorted(study.groups, key=_order) if g.runs[0].deadline_s in (None, tight)]
    paths = []
    for x in ("round", "time"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        ends = []
        for g in chosen:
            if x == "round" and g.runs[0].policy_name in ASYNC:
                continue
            colour = COLORS.get(g.runs[0].policy_name, "tab:cyan")
            end = _curve(ax, g, x, colour, budget_s * 3 if x == "time" else math.inf)
            ends.append((*end, _name(g), colour))
        ax.set_xlabel("round (number, from 1)" if x == "round" else "simulated time (s)")
        if x == "time":
            ax.set_xlim(0, budget_s * 3)
        ax.set_ylabel("test accuracy (fraction correct)")
        ax.set_title(f"Accuracy per {'round' if x == 'round' else 'simulated second'} at the tightest deadline "
                     f"({tight:g} s)")
        ax.grid(alpha=0.3)
        label_line_ends(ax, ends)
        caption(fig, "Lines: mean over seeds" + ("; band: ± 1 sample std (ddof=1)." if x == "round" else
                                                 " of each seed's accuracy, interpolated between evaluations."))
        paths.append(save_figure(fig, out / f"accuracy_{x}.png"))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ends = []
    for policy in sorted({g.runs[0].policy_name for g in study.groups if g.runs[0].deadline_s is not None}):
        mine = sorted((g for g in study.groups if g.runs[0].policy_name == policy and g.runs[0].deadline_s),
                      key=lambda g: g.runs[0].deadline_s)
        xs = [g.runs[0].deadline_s for g in mine]
        ys = [mean_std([final_accuracy(r) for r in g.runs])[0] for g in mine]
        colour = COLORS.get(policy, "tab:cyan")
        ax.plot(xs, ys, marker="o", color=colour)
        ends.append((xs[-1], ys[-1], policy, colour))
    for g in study.groups:
        if g.runs[0].deadline_s is None and g.runs[0].policy_name not in ASYNC:
            y = mean_std([final_accuracy(r) for r in g.runs])[0]
            colour = COLORS.get(g.runs[0].policy_name, "tab:cyan")
            ax.axhline(y, linestyle="--", color=colour, linewidth=1)
            ends.append((deadlines[-1], y, f"{_name(g)}, no deadline", colour))
    ax.set_xscale("log")
    ax.set_xticks(deadlines, [f"{d:g}" for d in deadlines])
    ax.minorticks_off()
    ax.set_xlabel("deadline (s)")
    ax.set_ylabel("final test accuracy (fraction correct)")
    ax.set_title("Final accuracy against the deadline")
    ax.grid(alpha=0.3)
    label_line_ends(ax, ends)
    caption(fig, "Points: mean over seeds. Dashed: policies without a deadline.")
    paths.append(save_figure(fig, out / "final_vs_deadline.png"))
    return paths


def make(study, out, args) -> Section:
    section = Section("Paper check", tables=[summarise(study, args.budget_s, args.target)])
    section.figures = figures(study, out, args.budget_s)
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, add_arguments, argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
