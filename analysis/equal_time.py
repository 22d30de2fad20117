"""Policies compared at equal simulated time: each family of a policy at its best member.

`python -m analysis.equal_time DIR [--out OUT] --budget-s B [--target A]` (or `fedsim plot equal-time DIR`),
where DIR holds runs that all stop at the same simulated-time budget B (`run.time_budget_s`); writes into
OUT, by default DIR/analysis.

Runs are grouped by scenario, seeds apart (analysis.runs). Per group, the mean and sample standard
deviation (ddof=1) over seeds of: the rounds completed, the test accuracy at B (the last evaluation at or
before B), the simulated time and the fleet energy to reach accuracy A (runs that never reach it are counted
apart), and the fleet energy spent by B. A *family* is a policy with its other settings and the kind of its
deadline: one number (any value), ADEL-FL's optimised schedule (any R), each other schedule (a list, a ramp)
alone, or none (wait); each family is shown by its group with the highest mean accuracy at B (a group with
no evaluation by B last). Figures: accuracy against simulated time for those best groups, and accuracy at B
against the deadline (ADEL-FL: its mean deadline, B / R), policies without a deadline as horizontal lines.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .common import Section, Table, finish, pm, script_main
from .figures import caption, label_line_ends, plt, save_figure
from .runs import AnalysisError, accuracy_at, mean_std, reach

__all__ = ["main", "best_groups", "summarise"]

COLORS = {"salf": "tab:red", "drop": "tab:blue", "wait": "black", "partial": "tab:green", "heterofl": "tab:orange",
          "overselect": "tab:purple"}
HIDDEN = ("policy.name", "policy.deadline_s", "run.rounds", "run.time_budget_s")


def add_arguments(parser) -> None:
    parser.add_argument("--budget-s", type=float, required=True,
                        help="the simulated-time budget the runs share (run.time_budget_s)")
    parser.add_argument("--target", type=float, default=0.85, help="target test accuracy")


def deadline_label(group) -> str:
    """`0.06` for one number, `adel R 100 (total 6 s)` or `linear 0.05 -> 0.2` for a schedule, `-` for none."""
    value = group.runs[0].setting("policy.deadline_s")
    if value is None or group.runs[0].policy_name == "wait":
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, dict):
        if "optimize" in value:
            return f"{value['optimize']} R {group.runs[0].setting('run.rounds')} (total {value.get('total_s', 0):g} s)"
        return f"{value.get('schedule', '?')} {value.get('start', 0):g} -> {value.get('end', 0):g}"
    return "[" + ", ".join(f"{v:g}" for v in value) + "]"


def _kind(group) -> str:
    """What a group's deadline is: `constant`, `adel` (any R), or the schedule itself (stands alone)."""
    value = group.runs[0].setting("policy.deadline_s")
    if value is None or group.runs[0].policy_name == "wait":
        return "-"
    if isinstance(value, (int, float)):
        return "constant"
    if isinstance(value, dict) and "optimize" in value:
        return str(value["optimize"])
    return deadline_label(group)


def mean_deadline_s(group) -> float | None:
    """A constant deadline, or an optimised schedule's total over its R rounds; None otherwise."""
    value = group.runs[0].setting("policy.deadline_s")
    kind = _kind(group)
    if kind == "constant":
        return float(value)
    if kind == "adel":
        return float(value.get("total_s")) / float(group.runs[0].setting("run.rounds"))
    return None


def _other(group) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in group.settings.items()
                     if not k.startswith(HIDDEN) and v is not None)


def _family(group) -> tuple[str, str, str]:
    return group.runs[0].policy_name, _other(group), _kind(group)


def name(group) -> str:
    other = _other(group)
    label = deadline_label(group)
    return group.runs[0].policy_name + (f" {label}" if label != "-" else "") + (f" ({other})" if other else "")


def _score(group, budget_s: float) -> float:
    """Mean accuracy at the budget; -inf when no run was evaluated by then (such a group ranks last)."""
    value = mean_std([accuracy_at(r, budget_s) for r in group.runs])[0]
    return -math.inf if math.isnan(value) else value


def _plotted(score: float) -> float:
    return math.nan if score == -math.inf else score       # no evaluation by the budget: no point


def best_groups(study, budget_s: float) -> list:
    """Per family (policy, other settings, kind of deadline: constant, ADEL-FL over R, ...): the group with the
    highest mean accuracy at the budget, best first."""
    best: dict[tuple[str, str, str], object] = {}
    for g in study.groups:
        key = _family(g)
        if key not in best or _score(g, budget_s) > _score(best[key], budget_s):
            best[key] = g
    return sorted(best.values(), key=lambda g: -_score(g, budget_s))


def _ms(values) -> str:
    m, s, _ = mean_std(values)
    return pm(m, s)


def summarise(study, budget_s: float, target: float) -> tuple[Table, Table]:
    headline = best_groups(study, budget_s)
    columns = ["policy", "deadline_s", "other settings", "seeds", "rounds", f"accuracy at {budget_s:g} s",
               f"time_s to {target:g}", f"energy_j by {budget_s:g} s"]

    def row(g):
        runs = g.runs
        hits = [h for h in (reach(r, target) for r in runs) if h is not None]
        return [runs[0].policy_name, deadline_label(g), _other(g), g.n,
                pm(*mean_std([len(r.rounds["round"]) for r in runs])[:2], digits=1),
                _ms([accuracy_at(r, budget_s) for r in runs]),
                (_ms([h[0] for h in hits]) if hits else "never") +
                ("" if len(hits) in (0, g.n) else f" ({len(hits)}/{g.n} reached)"),
                _ms([float(np.sum(r.rounds["energy_j"])) for r in runs])]

    note = ("std n/a: one seed. Time to the target: over the seeds that reached it. Rows: highest mean accuracy "
            "at the budget first.")
    best = Table("equal_time", f"Each policy at its best deadline (a constant, or ADEL-FL over its best R), at "
                 f"{budget_s:g} simulated seconds (mean ± sample std, ddof=1, over seeds)", columns,
                 [row(g) for g in headline], note)
    every = sorted(study.groups, key=lambda g: (_family(g), mean_deadline_s(g) or math.inf))
    return best, Table("equal_time_all", "Every configuration", columns, [row(g) for g in every], note)


def _curve(ax, group, colour: str, budget_s: float) -> tuple[float, float]:
    xs = np.linspace(0, budget_s, 801)
    ys = []
    for run in group.runs:     # the accuracy the server holds at t: its last evaluation at or before t
        r = run.rounds
        ok = ~np.isnan(r["test_accuracy"])
        times, accuracy = r["end_s"][ok], r["test_accuracy"][ok]
        at = np.searchsorted(times, xs + 1e-12, side="right") - 1
        ys.append(np.where(at >= 0, accuracy[np.maximum(at, 0)], np.nan))
    ys = np.array(ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # before a run's first evaluation: no value
        mean = np.nanmean(ys, axis=0)
        if len(ys) > 1:
            std = np.nanstd(ys, axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
    ax.step(xs, mean, where="post", color=colour, linewidth=1.4)
    ok = np.flatnonzero(~np.isnan(mean))
    i = ok[-1] if len(ok) else len(xs) - 1
    return float(xs[i]), float(mean[i])


def _colour(group, used: dict) -> str:
    base = COLORS.get(group.runs[0].policy_name, "tab:cyan")
    if base in used.values():        # a second group of one policy (a schedule beside the best constant)
        base = ["tab:pink", "tab:olive", "tab:brown", "tab:gray", "tab:cyan"][len(used) % 5]
    used[group.gid] = base
    return base


def figures(study, out, budget_s: float) -> list:
    headline = best_groups(study, budget_s)
    used: dict = {}
    colours = {g.gid: _colour(g, used) for g in headline}
    best_of = {_family(g): g for g in headline}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ends = [(*_curve(ax, g, colours[g.gid], budget_s), name(g), colours[g.gid]) for g in headline]
    ax.set_xlim(0, budget_s * 1.25)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.set_title("Accuracy against simulated time, each policy at its best deadline")
    ax.grid(alpha=0.3)
    label_line_ends(ax, ends)
    caption(fig, "Lines: mean over seeds of the accuracy each seed's server holds (its last evaluation); band: "
                 "± 1 sample std (ddof=1). Constant deadlines chosen by mean accuracy at the budget.")
    paths = [save_figure(fig, out / "equal_time.png")]

    xs_all = sorted({mean_deadline_s(g) for g in study.groups if mean_deadline_s(g) is not None})
    if not xs_all:
        return paths
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ends = []
    lines: dict[tuple, list] = {}
    for g in study.groups:
        if mean_deadline_s(g) is not None:
            lines.setdefault(_family(g), []).append(g)
    for (policy, other, kind), mine in sorted(lines.items()):
        mine.sort(key=mean_deadline_s)
        xs = [mean_deadline_s(g) for g in mine]
        ys = [_plotted(_score(g, budget_s)) for g in mine]
        colour = colours.get(best_of[(policy, other, kind)].gid, "tab:cyan")
        ax.plot(xs, ys, marker="o" if kind == "constant" else "s", color=colour,
                linestyle="-" if kind == "constant" else ":")
        label = policy + ("" if kind == "constant" else f" {kind}") + (f" ({other})" if other else "")
        ends.append((xs[-1], ys[-1], label, colour))
    for g in headline:
        if mean_deadline_s(g) is None:
            y = _plotted(_score(g, budget_s))
            ax.axhline(y, linestyle="--", color=colours[g.gid], linewidth=1)
            ends.append((xs_all[-1], y, name(g), colours[g.gid]))
    constants = xs_all
    ax.set_xscale("log")
    ax.set_xticks(constants, [f"{d:g}" for d in constants])
    ax.minorticks_off()
    ax.set_xlabel("deadline (s); for ADEL-FL the mean deadline, budget / R")
    ax.set_ylabel(f"test accuracy at {budget_s:g} s (fraction correct)")
    ax.set_title(f"Accuracy at {budget_s:g} simulated seconds against the deadline")
    ax.grid(alpha=0.3)
    label_line_ends(ax, ends)
    caption(fig, "Points: mean over seeds; circles: constant deadlines, squares: ADEL-FL's schedule over R rounds. "
                 "Dashed: policies without a deadline.")
    paths.append(save_figure(fig, out / "equal_time_deadline.png"))
    return paths


def make(study, out, args) -> Section:
    if not study.groups:
        raise AnalysisError(f"{study.directory}: no runs")
    best, every = summarise(study, args.budget_s, args.target)
    section = Section("Equal simulated time", tables=[best, every])
    section.figures = figures(study, out, args.budget_s)
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, add_arguments, argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
