"""Per-layer updates: how often each layer is aggregated, and over how many devices.

From rounds.parquet `contributors` (per layer, forward order: devices aggregated into it). Per run: the
fraction of rounds in which the layer had contributors (`update_fraction`), the mean number of
contributors per round and their mean share of the round's participants; per group, the mean and sample
std (ddof=1) of each over the seeds. Under SALF the last layers are updated most often.
Writes layer_updates.png and layer_updates.md/.csv.
"""

from __future__ import annotations

import numpy as np

from .common import Section, Table, finish, script_main
from .figures import bars, caption, color, plt, save_figure, shared_legend
from .groups import Group
from .runs import STD_NOTE

STATS = ("update_fraction", "mean_contributors", "mean_share")


def run_stats(run) -> dict[str, np.ndarray]:
    contributors = np.array(run.rounds["contributors"], dtype=float)
    share = contributors / np.maximum(run.rounds["participants"], 1)[:, None]
    return {"update_fraction": (contributors > 0).mean(axis=0), "mean_contributors": contributors.mean(axis=0),
            "mean_share": share.mean(axis=0)}


def group_stats(group: Group) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, sample std) over the seeds of each statistic, per layer."""
    per_run = [run_stats(r) for r in group.runs]
    out = {}
    for name in STATS:
        values = np.array([s[name] for s in per_run])
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
        out[name] = (values.mean(axis=0), std)
    return out


def make(study, out, args=None) -> Section:
    groups = study.groups
    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(13, 4.3), layout="constrained")
    rows = []
    stats = {g.slug: group_stats(g) for g in groups}
    n_layers = max(len(s["update_fraction"][0]) for s in stats.values())
    layers = np.arange(n_layers)
    bars(ax_f, groups, [stats[g.slug]["update_fraction"] for g in groups], layers)
    for g in groups:
        mean, std = stats[g.slug]["mean_contributors"]
        ax_c.errorbar(np.arange(len(mean)), mean, yerr=np.nan_to_num(std), marker="o", markersize=4, capsize=3,
                      color=color(g.number, len(groups)))
        for layer in range(len(mean)):
            rows.append([g.slug, g.label, layer] + [float(stats[g.slug][name][k][layer]) for name in STATS
                                                     for k in (0, 1)])
    ax_f.set_ylabel("rounds with the layer updated (fraction)")
    ax_f.set_ylim(0, 1.05)
    ax_c.set_ylabel("devices aggregated into the layer (mean per round)")
    for ax in (ax_f, ax_c):
        ax.set_xlabel("layer (forward order: 0 = first; backprop reaches the last one first)")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3, axis="y")
    ax_f.set_title("How often each layer is updated")
    ax_c.set_title("How many devices each layer's update averages")
    shared_legend(fig, groups)
    caption(fig, "Bars and points: mean over seeds of each run's per-layer statistic; error bars: ± 1 sample std "
                 "(ddof=1) over seeds.")
    section = Section("Per-layer updates", figures=[save_figure(fig, out / "layer_updates.png")])
    section.tables.append(Table(
        "layer_updates", "Per-layer updates",
        ["id", "group", "layer"] + [f"{name}_{k}" for name in STATS for k in ("mean", "std")], rows,
        f"Layers in forward order. Per run over its rounds, then over seeds: {STD_NOTE.lower()}."))
    return finish(section, out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, argv=argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
