"""Test accuracy against simulated time, one curve per group of runs: the headline figure.

A group is the runs of one scenario that differ only by seed (see analysis.runs). A curve's point at an
evaluated round is the mean over the group's seeds of that round's end time (x) and of its test accuracy
(y); the band is ± one sample standard deviation (ddof=1) of the accuracy over the seeds (none with one
seed). Only rounds evaluated in every seed are used; asynchronous runs line up by evaluation time.
Writes accuracy_time.png, accuracy_time.md/.csv (one row per group) and accuracy_time_curves.csv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import Section, Table, finish, script_main
from .figures import caption, color, label_line_ends, plt, save_figure
from .groups import Group
from .runs import STD_NOTE, best_accuracy, final_accuracy, mean_std, sim_time, total_energy

ACCURACY = "test accuracy (fraction correct)"
TIME = "simulated time (s)"


def _evaluated(run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, time, accuracy) of a run's evaluations. Synchronous runs are keyed by round; asynchronous
    ones (fedasync/fedbuff: several rows share a round number, evaluations at fixed simulated times) by
    the evaluation time, so seeds line up on the simulated-time axis."""
    r = run.rounds
    ok = ~np.isnan(r["test_accuracy"])
    asynchronous = len(np.unique(r["round"])) < len(r["round"])
    key = r["end_s"][ok] if asynchronous else r["round"][ok]
    return key, r["end_s"][ok], r["test_accuracy"][ok]


def curve(runs) -> dict[str, np.ndarray]:
    """Mean time, mean accuracy and its sample std over `runs` at the points evaluated in all of them."""
    evals = [_evaluated(run) for run in runs]
    common = set(evals[0][0].tolist())
    for key, _, _ in evals[1:]:
        common &= set(key.tolist())
    keys = np.array(sorted(common))
    times = np.array([[t[k == x][0] for x in keys] for k, t, _ in evals]).reshape(len(evals), len(keys))
    accs = np.array([[a[k == x][0] for x in keys] for k, _, a in evals]).reshape(len(evals), len(keys))
    std = accs.std(axis=0, ddof=1) if len(runs) > 1 else np.full(len(keys), np.nan)
    return {"round": keys, "time_s": times.mean(axis=0), "mean": accs.mean(axis=0), "std": std}


def _draw(ax, c: dict, colour: str, label: str | None = None):
    line, = ax.plot(c["time_s"], c["mean"], marker="o", markersize=3, color=colour, label=label, linewidth=1.6)
    if np.all(np.isnan(c["std"])):
        return line
    if len(c["time_s"]) > 1:
        ax.fill_between(c["time_s"], c["mean"] - c["std"], c["mean"] + c["std"], color=colour, alpha=0.18,
                        linewidth=0)
    else:                                    # one evaluation: the band is an error bar
        ax.errorbar(c["time_s"], c["mean"], yerr=c["std"], color=colour, capsize=3, linewidth=1)
    return line


def _axes(ax, title: str) -> None:
    ax.set_xlabel(TIME)
    ax.set_ylabel(ACCURACY)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)


def figure(groups: list[Group], path: Path) -> Path:
    """Every group's mean curve with its ± sample-std band, labelled at its end."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ends = []
    same_n = len({g.n for g in groups}) == 1
    for g in groups:
        c = curve(g.runs)
        colour = color(g.number, len(groups))
        _draw(ax, c, colour)
        if len(c["round"]):
            ends.append((c["time_s"][-1], c["mean"][-1], g.label if same_n else f"{g.label} (n={g.n})", colour))
    _axes(ax, "Test accuracy against simulated time")
    if len(groups) > 1:
        label_line_ends(ax, ends)
    seeds = sorted({g.n for g in groups})
    caption(fig, f"Line: mean over seeds (n = {', '.join(map(str, seeds))} per group); band (one evaluation: error "
                 "bar): ± 1 sample std (ddof=1) over seeds; x: mean end time of the evaluated round.")
    return save_figure(fig, path)


def group_figure(group: Group, total: int, path: Path) -> Path:
    """One group: each seed's curve, thin, and their mean with its ± sample-std band."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colour = color(group.number, total)
    ends = []
    for run in group.runs:
        _, t, a = _evaluated(run)
        ax.plot(t, a, color=colour, alpha=0.45, linewidth=0.8, marker=".", markersize=3)
        if len(t) and group.n <= 6:
            ends.append((t[-1], a[-1], f"seed {run.seed}", "0.4"))
    if group.n > 1:
        c = curve(group.runs)
        _draw(ax, c, colour)
        if len(c["round"]):
            ends.append((c["time_s"][-1], c["mean"][-1], "mean", colour))
    _axes(ax, f"{group.label}: test accuracy against simulated time")
    if ends and group.n > 1:
        label_line_ends(ax, ends)
    caption(fig, "Thin: each seed. " + ("Bold: mean over seeds; band (one evaluation: error bar): ± 1 sample std "
                                        "(ddof=1)."
                                        if group.n > 1 else "One seed: no mean or band."))
    return save_figure(fig, path)


def summary(groups: list[Group]) -> Table:
    rows = []
    for g in groups:
        fa = mean_std([final_accuracy(r) for r in g.runs])
        t = mean_std([sim_time(r) for r in g.runs])
        e = mean_std([total_energy(r) for r in g.runs])
        rows.append([g.slug, g.label, g.n, fa[0], fa[1], float(np.mean([best_accuracy(r) for r in g.runs])),
                     t[0], t[1], e[0], e[1]])
    return Table("accuracy_time", "Accuracy, time and energy per group",
                 ["id", "group", "seeds", "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean",
                  "sim_time_s_mean", "sim_time_s_std", "energy_j_mean", "energy_j_std"], rows,
                 f"Final accuracy: last evaluated round; sim time: end of the last round; energy: the fleet's, all "
                 f"rounds. {STD_NOTE}.")


def make(study, out, args=None) -> Section:
    groups = study.groups
    section = Section("Accuracy against simulated time", figures=[figure(groups, out / "accuracy_time.png")])
    section.tables.append(summary(groups))
    finish(section, out)
    points = []
    for g in groups:
        c = curve(g.runs)
        points += [[g.slug, g.label, int(c["round"][i]) if float(c["round"][i]).is_integer() else c["round"][i],
                    c["time_s"][i], c["mean"][i], c["std"][i]] for i in range(len(c["round"]))]
    curves = Table("accuracy_time_curves", "Accuracy against time: curve points",
                   ["id", "group", "round", "time_s_mean", "accuracy_mean", "accuracy_std"], points)
    path = out / "accuracy_time_curves.csv"
    path.write_text(curves.csv())
    section.files.append(path)
    return section


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, argv=argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
