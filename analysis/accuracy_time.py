"""Test accuracy against simulated time, one curve per group of runs (policy and grid parameters).

Runs differing only by seed form a group. A curve's point at an evaluated round is the mean over the
group's seeds of that round's end time (x) and test accuracy (y); the band spans the seeds' min..max
accuracy. Only rounds evaluated in every seed are used. Writes accuracy_time.png, accuracy_time.md/.csv
(one row per group) and accuracy_time_curves.csv (the plotted points).
"""

from __future__ import annotations

import numpy as np

from analysis.common import (Section, Table, best_accuracy, final_accuracy, finish, group_label, group_runs, plt,
                             save_figure, script_main, sim_time)


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
    """Mean time and mean/min/max accuracy over `runs` at the points evaluated in all of them."""
    evals = [_evaluated(run) for run in runs]
    common = set(evals[0][0].tolist())
    for key, _, _ in evals[1:]:
        common &= set(key.tolist())
    keys = np.array(sorted(common))
    times = np.array([[t[k == x][0] for x in keys] for k, t, _ in evals])
    accs = np.array([[a[k == x][0] for x in keys] for k, _, a in evals])
    return {"round": keys, "time_s": times.mean(axis=0), "mean": accs.mean(axis=0),
            "min": accs.min(axis=0), "max": accs.max(axis=0)}


def make(runs, out, args=None) -> Section:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary, points = [], []
    for key, members in group_runs(runs, drop=("seed",)).items():
        label = group_label(key)
        c = curve(members)
        line, = ax.plot(c["time_s"], c["mean"], marker=".", label=f"{label} (n={len(members)})")
        ax.fill_between(c["time_s"], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
        finals = [final_accuracy(r) for r in members]
        summary.append([label, len(members), float(np.mean([sim_time(r) for r in members])),
                        float(np.mean(finals)), float(np.min(finals)), float(np.max(finals)),
                        float(np.mean([best_accuracy(r) for r in members]))])
        points += [[label, int(c["round"][i]), c["time_s"][i], c["mean"][i], c["min"][i], c["max"][i]]
                   for i in range(len(c["round"]))]
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs simulated time (mean, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    section = Section("Accuracy vs simulated time", figures=[save_figure(fig, out / "accuracy_time.png")])
    section.tables.append(Table(
        "accuracy_time", "Accuracy vs time: per group",
        ["group", "seeds", "sim_time_s_mean", "final_accuracy_mean", "final_accuracy_min",
         "final_accuracy_max", "best_accuracy_mean"], summary,
        "final accuracy: last evaluated round; sim time: end of the last round; means over seeds."))
    finish(section, out)
    curves = Table("accuracy_time_curves", "Accuracy vs time: curve points",
                   ["group", "round", "time_s_mean", "accuracy_mean", "accuracy_min", "accuracy_max"], points)
    path = out / "accuracy_time_curves.csv"
    path.write_text(curves.csv())
    section.files.append(path)
    return section


def main(argv=None) -> int:
    return script_main(__doc__, make, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
