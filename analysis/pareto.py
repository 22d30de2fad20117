"""The latency / energy / accuracy Pareto front across the groups of runs.

A point is a group (the runs of one scenario that differ only by seed) at the mean over its seeds of the
simulated time of the whole run, the fleet energy of the whole run and the final test accuracy; each seed
counts once (a run found twice is one run). `--by run`: every run is its own point. A point is
Pareto-optimal when no other point is at least as fast, at least as frugal and at least as accurate, and
strictly better in one of the three. Writes pareto.png (time against energy, coloured by accuracy, the front
circled and labelled) and pareto.md/.csv (every point, the front first).
"""

from __future__ import annotations

import numpy as np

from .common import Section, Table, finish, script_main
from .figures import caption, label_points, plt, save_figure
from .runs import STD_NOTE, final_accuracy, mean_std, sim_time, total_energy


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
                        help="points: groups averaged over their seeds (default) or single runs")


def points(study, by_run: bool) -> list[dict]:
    out = []
    for g in study.groups:
        members = [[r] for r in g.runs] if by_run else [g.runs]
        for runs in members:
            t, e, a = (mean_std([f(r) for r in runs]) for f in (sim_time, total_energy, final_accuracy))
            name = f"{g.label}, seed {runs[0].seed}" if by_run else g.label
            out.append({"id": runs[0].run_id if by_run else g.slug, "label": name, "seeds": len(runs),
                        "t": t, "e": e, "a": a})
    return out


def make(study, out, args) -> Section:
    by_run = getattr(args, "by", "group") == "run"
    pts = points(study, by_run)
    t = np.array([p["t"][0] for p in pts])
    e = np.array([p["e"][0] for p in pts])
    a = np.array([p["a"][0] for p in pts])
    front = pareto_mask(t, e, a)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    dots = ax.scatter(t, e, c=a, cmap="viridis", s=36, zorder=3, edgecolors="0.2", linewidths=0.4)
    ax.scatter(t[front], e[front], s=150, facecolors="none", edgecolors="red", linewidths=1.4, zorder=2)
    fig.colorbar(dots, ax=ax, label="final test accuracy (fraction correct)" + ("" if by_run else ", mean"))
    ax.set_xlabel("simulated time of the run (s)" + ("" if by_run else ", mean over seeds"))
    ax.set_ylabel("fleet energy of the run (J)" + ("" if by_run else ", mean over seeds"))
    ax.set_title(f"Time, energy and accuracy: {int(front.sum())} of {len(pts)} "
                 f"{'runs' if by_run else 'groups'} on the Pareto front (circled)")
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    # the front's labels placed first; with one point per run, only the front is labelled
    order = list(np.flatnonzero(front)) + ([] if by_run else list(np.flatnonzero(~front)))
    left_out = label_points(ax, t[order], e[order], [pts[i]["label"] for i in order],
                            colors=["black" if front[i] else "0.45" for i in order])
    caption(fig, "Each point: " + ("one run; only the Pareto-optimal ones are labelled." if by_run else
                                   "a group, at the mean over its seeds.")
            + " Pareto-optimal (circled, black label): no other point is as fast, as frugal and as accurate, and "
            "better in one." + (f" {left_out} label(s) left out for lack of room: see pareto.md." if left_out else ""))
    order = sorted(range(len(pts)), key=lambda i: (not front[i], t[i], e[i]))
    rows = [[pts[i]["id"], pts[i]["label"], pts[i]["seeds"], "yes" if front[i] else "no",
             pts[i]["t"][0], pts[i]["t"][1], pts[i]["e"][0], pts[i]["e"][1], pts[i]["a"][0], pts[i]["a"][1]]
            for i in order]
    section = Section("Pareto front", figures=[save_figure(fig, out / "pareto.png")])
    section.tables.append(Table(
        "pareto", "Time, energy and accuracy " + ("per run" if by_run else "per group"),
        ["run" if by_run else "id", "group", "seeds", "pareto_optimal", "sim_time_s_mean", "sim_time_s_std",
         "energy_j_mean", "energy_j_std", "final_accuracy_mean", "final_accuracy_std"], rows,
        "Pareto-optimal first (min time, min energy, max accuracy), then by time. "
        + ("One run per row." if by_run else f"{STD_NOTE}.")))
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, add_arguments, argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
