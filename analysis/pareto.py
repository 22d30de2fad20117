"""The latency / energy / accuracy Pareto front across the configurations (or runs) of a sweep.

A point is a configuration: a group of runs differing only by seed, at the mean over its seeds of the
simulated time of the whole run, the fleet energy of the whole run and the final test accuracy
(`--by run`: every run is its own point). A point is Pareto-optimal when no other point is at least as
fast, at least as frugal and at least as accurate, and strictly better in one of the three.
Writes pareto.png (time vs energy, coloured by accuracy, the front circled) and pareto.md/.csv (the
Pareto-optimal points, by simulated time).
"""

from __future__ import annotations

import numpy as np

from analysis.common import (Section, Table, final_accuracy, finish, group_label, group_runs, plt, save_figure,
                             script_main, sim_time, total_energy)


def pareto_mask(time_s: np.ndarray, energy_j: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """True where the point is not dominated (minimise time and energy, maximise accuracy)."""
    optimal = np.ones(len(time_s), dtype=bool)
    for i in range(len(time_s)):
        no_worse = (time_s <= time_s[i]) & (energy_j <= energy_j[i]) & (accuracy >= accuracy[i])
        better = (time_s < time_s[i]) | (energy_j < energy_j[i]) | (accuracy > accuracy[i])
        optimal[i] = not np.any(no_worse & better)
    return optimal


def add_arguments(parser) -> None:
    parser.add_argument("--by", choices=["group", "run"], default="group",
                        help="points: configurations averaged over seeds (default) or single runs")


def make(runs, out, args) -> Section:
    by_run = getattr(args, "by", "group") == "run"
    groups = group_runs(runs, drop=() if by_run else ("seed",))
    labels = [(members[0].run_id if by_run else group_label(key)) for key, members in groups.items()]
    seeds = [len(members) for members in groups.values()]
    t = np.array([np.mean([sim_time(r) for r in m]) for m in groups.values()])
    e = np.array([np.mean([total_energy(r) for r in m]) for m in groups.values()])
    a = np.array([np.mean([final_accuracy(r) for r in m]) for m in groups.values()])
    front = pareto_mask(t, e, a)

    fig, ax = plt.subplots(figsize=(7, 5))
    points = ax.scatter(t, e, c=a, cmap="viridis", s=40, zorder=2)
    ax.scatter(t[front], e[front], s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=3,
               label="Pareto-optimal")
    for i in np.flatnonzero(front):
        ax.annotate(labels[i], (t[i], e[i]), fontsize=7, xytext=(6, 4), textcoords="offset points")
    fig.colorbar(points, ax=ax, label="final test accuracy" + ("" if by_run else " (mean over seeds)"))
    ax.set_xlabel("simulated time of the run (s)")
    ax.set_ylabel("fleet energy of the run (J)")
    ax.set_title("Latency / energy / accuracy" + (" per run" if by_run else " per configuration"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    order = sorted(np.flatnonzero(front), key=lambda i: (t[i], e[i]))
    rows = [[labels[i], seeds[i], t[i], e[i], a[i]] for i in order]
    section = Section("Pareto front", figures=[save_figure(fig, out / "pareto.png")])
    section.tables.append(Table(
        "pareto", "Pareto-optimal " + ("runs" if by_run else "configurations"),
        ["run" if by_run else "group", "seeds", "sim_time_s", "energy_j", "final_accuracy"], rows,
        f"{int(front.sum())} of {len(labels)} points are Pareto-optimal (min time, min energy, max accuracy)"
        + ("." if by_run else "; values are means over seeds.")))
    return finish(section, out)


def main(argv=None) -> int:
    return script_main(__doc__, make, add_arguments, argv)


if __name__ == "__main__":
    raise SystemExit(main())
