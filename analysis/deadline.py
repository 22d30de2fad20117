"""Final accuracy, and simulated time and energy to a target accuracy, against the round deadline.

x is the deadline (`--deadline-key`, default policy.deadline_s, read from the grid parameters or the
scenario recorded in the trace); one line per group of the other parameters (policy first). For each
(group, deadline): the mean and std (ddof=0) over seeds of the final accuracy, the number of seeds that
reached the target, and the mean time and fleet energy to the target over the seeds that reached it
(end of the first evaluated round with test accuracy >= target). `--target` defaults to the sweep's
`--target-accuracy`, else to the 25th percentile of the runs' best accuracies rounded down to 0.01, a
value most runs reach.
Writes deadline.png and deadline.md/.csv.
"""

from __future__ import annotations

import math

import numpy as np

from analysis.common import (Section, Table, best_accuracy, final_accuracy, finish, group_label, group_runs, plt,
                             reach, save_figure, script_main, sweep_metadata, warn)


def default_target(runs) -> float:
    bests = [best_accuracy(r) for r in runs]
    return math.floor(float(np.percentile(bests, 25)) * 100) / 100


def add_arguments(parser) -> None:
    parser.add_argument("--target", type=float, default=None, help="target test accuracy (default: see above)")
    parser.add_argument("--deadline-key", default="policy.deadline_s", help="the scenario key on the x axis")


def make(runs, out, args) -> Section:
    key = args.deadline_key
    target = args.target
    if target is None:
        target = sweep_metadata(args.dir, "fedsim.sweep.target_accuracy") or default_target(runs)
    x_of: dict[str, float] = {}
    for run in runs:
        value = run.setting(key)
        try:
            x_of[run.run_id] = float(value)
        except (TypeError, ValueError):
            warn(f"{run.run_id}: no numeric {key} ({value!r}); left out of the deadline plot")
    rows = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for gkey, members in group_runs([r for r in runs if r.run_id in x_of], drop=("seed", key)).items():
        label = group_label(gkey)
        by_x: dict[float, list] = {}
        for run in members:
            by_x.setdefault(x_of[run.run_id], []).append(run)
        series = []
        for x in sorted(by_x):
            group = by_x[x]
            finals = np.array([final_accuracy(r) for r in group])
            reached = [p for p in (reach(r, target) for r in group) if p is not None]
            t = float(np.mean([p[0] for p in reached])) if reached else math.nan
            e = float(np.mean([p[1] for p in reached])) if reached else math.nan
            series.append([label, x, len(group), float(finals.mean()), float(finals.std()),
                           f"{len(reached)}/{len(group)}", t, e])
        rows += series
        _, xs, _, acc_mean, acc_std, _, t_mean, e_mean = zip(*series)
        axes[0].errorbar(xs, acc_mean, yerr=acc_std, marker="o", capsize=3, label=label)
        axes[1].plot(xs, t_mean, marker="o", label=label)
        axes[2].plot(xs, e_mean, marker="o", label=label)
    for ax, ylabel in zip(axes, ["final test accuracy", f"simulated time to {target:g} (s)",
                                 f"energy to {target:g} (J)"]):
        ax.set_xlabel(f"{key} (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Against the deadline (target accuracy {target:g}; mean over seeds)")
    section = Section("Deadline study", figures=[save_figure(fig, out / "deadline.png")])
    section.tables.append(Table(
        "deadline", "Deadline study",
        ["group", "deadline_s", "seeds", "final_accuracy_mean", "final_accuracy_std", "reached",
         "time_to_target_s_mean", "energy_to_target_j_mean"], rows,
        f"Target accuracy {target:g}. Time and energy to the target are means over the seeds that reached it."))
    return finish(section, out)


def main(argv=None) -> int:
    return script_main(__doc__, make, add_arguments, argv)


if __name__ == "__main__":
    raise SystemExit(main())
