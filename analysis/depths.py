"""How deep stragglers got: the depths reached by device-rounds that did not deliver every layer.

From devices.parquet: a straggler device-round has `status` != complete; its `depth` is the number of
layers it delivered, counted from the last layer. Per run, the share of its straggler device-rounds at
each depth 0 .. L-1; per group, the mean and sample std (ddof=1) of that share over the seeds, and the
count over all seeds. Writes depths.png and depths.md/.csv.
"""

from __future__ import annotations

import numpy as np

from .common import Section, Table, finish, script_main
from .figures import bars, caption, plt, save_figure, shared_legend
from .groups import Group
from .runs import STD_NOTE


def counts(run, n_layers: int) -> np.ndarray:
    out = np.zeros(n_layers, dtype=int)
    d = run.devices
    for status, depth in zip(d["status"], d["depth"]):
        if status != "complete":
            out[depth] += 1
    return out


def group_shares(group: Group, n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count over seeds, mean share, sample std of the share) per depth; a seed without stragglers has
    no share and is left out of the mean."""
    per_run = [counts(r, n_layers) for r in group.runs]
    shares = np.array([c / c.sum() for c in per_run if c.sum()]).reshape(-1, n_layers)
    mean = shares.mean(axis=0) if len(shares) else np.full(n_layers, np.nan)
    std = shares.std(axis=0, ddof=1) if len(shares) > 1 else np.full(n_layers, np.nan)
    return np.sum(per_run, axis=0), mean, std


def make(study, out, args=None) -> Section:
    groups = study.groups
    n_layers = max(r.n_layers for r in study.runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.3), layout="constrained")
    if not any(counts(r, n_layers).sum() for r in study.runs):
        ax.text(0.5, 0.5, "no stragglers: every participant delivered every layer", ha="center", transform=ax.transAxes)
    rows, values, drawn, none = [], [], [], []
    for g in groups:
        total, mean, std = group_shares(g, n_layers)
        rows += [[g.slug, g.label, depth, int(total[depth]), int(total.sum()), mean[depth], std[depth]]
                 for depth in range(n_layers)]
        if total.sum():
            drawn.append(g)
            values.append((mean, std))
        else:
            none.append(g.label)
    bars(ax, drawn, values, np.arange(n_layers), total=len(groups))
    ax.set_xlabel(f"layers delivered by the straggler, of {n_layers} (counted from the last layer)")
    ax.set_ylabel("share of the straggler device-rounds (fraction)")
    ax.set_xticks(np.arange(n_layers))
    ax.set_title("Depths reached by stragglers")
    ax.grid(alpha=0.3, axis="y")
    shared_legend(fig, drawn, total=len(groups))
    caption(fig, "Straggler: a device-round that did not deliver every layer. Bars: mean over seeds of each run's "
                 "share; error bars: ± 1 sample std (ddof=1)." + (f" No stragglers: {'; '.join(none)}." if none else ""))
    section = Section("Straggler depths", figures=[save_figure(fig, out / "depths.png")])
    section.tables.append(Table(
        "depths", "Depths reached by stragglers",
        ["id", "group", "depth", "count", "stragglers", "share_mean", "share_std"], rows,
        f"count and stragglers: device-rounds over all seeds; share: per run, then over seeds ({STD_NOTE.lower()})."))
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, argv=argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
