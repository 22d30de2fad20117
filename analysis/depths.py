"""Histogram of the depths stragglers reached: devices.parquet `depth` where `status` != complete.

Per group of runs (seeds and rounds pooled): for each depth 0 .. L-1 (layers delivered, counted from the
last layer), the number of straggler device-rounds and their fraction of the group's stragglers.
Writes depths.png and depths.md/.csv.
"""

from __future__ import annotations

import numpy as np

from analysis.common import Section, Table, finish, group_label, group_runs, plt, save_figure, script_main


def straggler_depths(runs, n_layers: int) -> np.ndarray:
    counts = np.zeros(n_layers, dtype=int)
    for run in runs:
        d = run.devices
        for status, depth in zip(d["status"], d["depth"]):
            if status != "complete":
                counts[depth] += 1
    return counts


def make(runs, out, args=None) -> Section:
    groups = group_runs(runs, drop=("seed",))
    n_layers = max(r.n_layers for r in runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(groups)
    rows = []
    for g, (key, members) in enumerate(groups.items()):
        label = group_label(key)
        counts = straggler_depths(members, n_layers)
        total = int(counts.sum())
        ax.bar(np.arange(n_layers) - 0.4 + (g + 0.5) * width, counts, width, label=f"{label} ({total} stragglers)")
        rows += [[label, depth, int(counts[depth]), counts[depth] / total if total else None]
                 for depth in range(n_layers)]
    ax.set_xlabel("depth reached (layers delivered, from the last)")
    ax.set_ylabel("straggler device-rounds")
    ax.set_xticks(np.arange(n_layers))
    ax.set_title("Depths reached by stragglers (status != complete)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    section = Section("Straggler depths", figures=[save_figure(fig, out / "depths.png")])
    section.tables.append(Table("depths", "Straggler depths", ["group", "depth", "count", "fraction"], rows,
                                "Device-rounds with status != complete, seeds and rounds pooled."))
    return finish(section, out)


def main(argv=None) -> int:
    return script_main(__doc__, make, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
