"""Final accuracy, and simulated time and energy to a target accuracy, against the round deadline.

x is the deadline in force (`--deadline-key`, default policy.deadline_s, read from each run's resolved
scenario). A series is the groups that differ only in that key; groups whose policy has no deadline (wait,
overselect, the asynchronous ones) are drawn as horizontal reference lines. Per group: the mean and sample
std (ddof=1) over seeds of the final accuracy; the number of seeds that reached the target; the mean and
sample std of the simulated time and fleet energy to the target over the seeds that reached it (end of the
first evaluated round with test accuracy >= target). `--target` defaults to the sweep's
`--target-accuracy`, else to the 25th percentile of the runs' best accuracies rounded down to 0.01.
Writes deadline.png and deadline.md/.csv. Needs at least two deadlines.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq

from .common import Section, Table, finish, script_main
from .figures import caption, color, plt, save_figure, shared_legend
from .runs import STD_NOTE, AnalysisError, best_accuracy, final_accuracy, mean_std, reach


def default_target(study) -> float:
    for sweep in study.sweeps:
        raw = (pq.read_schema(sweep / "index.parquet").metadata or {}).get(b"fedsim.sweep.target_accuracy")
        if raw is not None and json.loads(raw) is not None:
            return float(json.loads(raw))
    bests = [best_accuracy(r) for r in study.runs]
    return math.floor(float(np.nanpercentile(bests, 25)) * 100) / 100


def add_arguments(parser) -> None:
    parser.add_argument("--target", type=float, default=None, help="target test accuracy (default: see above)")
    parser.add_argument("--deadline-key", default="policy.deadline_s", help="the scenario key on the x axis")


def _x(group, key: str) -> float | None:
    """The group's deadline in force: None when its policy has none."""
    run = group.runs[0]
    if key == "policy.deadline_s" and run.deadline_s is None:
        return None
    value = run.setting(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series_label(group, key: str) -> str:
    rest = [k for k in group.settings if k != key]
    if not rest:
        return group.runs[0].policy_name
    parts = []
    for k in rest:
        v = group.settings[k]
        parts.append(str(v) if k == "policy.name" else f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float)
                     else f"{k.rsplit('.', 1)[-1]}={v}")
    return ", ".join(parts)


def rows_of(study, key: str, target: float) -> tuple[list[list], dict, list]:
    series: dict[str, list] = {}
    free = []
    rows = []
    for g in study.groups:
        x = _x(g, key)
        fa = mean_std([final_accuracy(r) for r in g.runs])
        hits = [p for p in (reach(r, target) for r in g.runs) if p is not None]
        t = mean_std([h[0] for h in hits])
        e = mean_std([h[1] for h in hits])
        row = [g.slug, g.label, x, g.n, fa[0], fa[1], f"{len(hits)}/{g.n}", t[0], t[1], e[0], e[1]]
        rows.append(row)
        if x is None:
            free.append((g, row))
        else:
            series.setdefault(_series_label(g, key), []).append((x, g, row))
    return rows, series, free


def make(study, out, args) -> Section:
    key = args.deadline_key
    target = args.target if args.target is not None else default_target(study)
    rows, series, free = rows_of(study, key, target)
    xs = sorted({x for points in series.values() for x, _, _ in points})
    if len(xs) < 2:
        raise AnalysisError(f"{args.dir}: {key} takes {len(xs)} value(s) among the runs with a deadline "
                            f"({', '.join(f'{x:g}' for x in xs) or 'none'}); the deadline study needs two")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), layout="constrained")
    columns = [(4, 5), (7, 8), (9, 10)]
    total = len(study.groups)
    gap = min(np.diff(xs))
    handles, labels = [], []
    for k, (name, points) in enumerate(series.items()):
        points.sort(key=lambda p: p[0])
        colour = color(points[0][1].number, total)
        dodge = gap * 0.04 * (k - (len(series) - 1) / 2)        # error bars of equal x side by side
        for ax, (m, s) in zip(axes, columns):
            h = ax.errorbar([p[0] + dodge for p in points], [p[2][m] for p in points],
                            yerr=[0 if math.isnan(p[2][s]) else p[2][s] for p in points],
                            marker="o", markersize=4, capsize=3, color=colour)
        handles.append(h)
        labels.append(name)
    for g, row in free:
        colour = color(g.number, total)
        for ax, (m, _) in zip(axes, columns):
            if not math.isnan(row[m]):
                ax.axhline(row[m], color=colour, linestyle="--", linewidth=1)
        handles.append(plt.Line2D([], [], color=colour, linestyle="--"))
        labels.append(f"{g.label} (no deadline)")
    titles = ["Final accuracy", f"Simulated time to accuracy {target:g}", f"Energy to accuracy {target:g}"]
    ylabels = ["final test accuracy (fraction correct)", "simulated time (s)", "fleet energy (J)"]
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel(f"{key} (s)" if key.endswith("_s") else key)
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
    shared_legend(fig, study.groups, handles, labels)
    caption(fig, "Points: mean over seeds; error bars: ± 1 sample std (ddof=1). Time and energy to the target: "
                 "over the seeds that reached it (see the table). Dashed: policies without a deadline.")
    section = Section("Against the deadline", figures=[save_figure(fig, out / "deadline.png")])
    section.tables.append(Table(
        "deadline", "Against the deadline",
        ["id", "group", "deadline_s", "seeds", "final_accuracy_mean", "final_accuracy_std", "reached",
         "time_to_target_s_mean", "time_to_target_s_std", "energy_to_target_j_mean", "energy_to_target_j_std"],
        rows, f"Target accuracy {target:g}. Time and energy to the target: over the seeds that reached it. "
              f"{STD_NOTE}. deadline_s n/a: the policy has no deadline."))
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, add_arguments, argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
