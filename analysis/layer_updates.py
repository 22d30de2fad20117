"""Per-layer update frequency: how often each layer is aggregated, and over how many devices.

From rounds.parquet `contributors` (per layer, forward order: devices aggregated into it). Per group
of runs (seeds pooled, all rounds): `update_fraction` = fraction of rounds with contributors > 0,
`mean_contributors`, and `mean_share` = mean of contributors / participants. Under SALF the last layers
are updated most often. Writes layer_updates.png and layer_updates.md/.csv.
"""

from __future__ import annotations

import numpy as np

from analysis.common import Section, Table, finish, group_label, group_runs, plt, save_figure, script_main


def layer_stats(runs) -> dict[str, np.ndarray]:
    contributors = np.array([c for r in runs for c in r.rounds["contributors"]], dtype=float)
    participants = np.concatenate([r.rounds["participants"] for r in runs])
    share = contributors / np.maximum(participants, 1)[:, None]
    return {"update_fraction": (contributors > 0).mean(axis=0), "mean_contributors": contributors.mean(axis=0),
            "mean_share": share.mean(axis=0)}


def make(runs, out, args=None) -> Section:
    groups = group_runs(runs, drop=("seed",))
    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = []
    width = 0.8 / len(groups)
    for g, (key, members) in enumerate(groups.items()):
        label = group_label(key)
        stats = layer_stats(members)
        layers = np.arange(len(stats["update_fraction"]))
        ax_f.bar(layers - 0.4 + (g + 0.5) * width, stats["update_fraction"], width, label=label)
        ax_c.plot(layers, stats["mean_contributors"], marker="o", label=label)
        rows += [[label, int(l), stats["update_fraction"][l], stats["mean_contributors"][l], stats["mean_share"][l]]
                 for l in layers]
    ax_f.set_ylabel("fraction of rounds with the layer updated")
    ax_c.set_ylabel("mean contributors per round")
    for ax in (ax_f, ax_c):
        ax.set_xlabel("layer (forward order: 0 = first, backprop reaches the last first)")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=8)
    fig.suptitle("Per-layer updates (all rounds, seeds pooled)")
    section = Section("Per-layer updates", figures=[save_figure(fig, out / "layer_updates.png")])
    section.tables.append(Table("layer_updates", "Per-layer updates",
                                ["group", "layer", "update_fraction", "mean_contributors", "mean_share"], rows,
                                "Layers in forward order; all rounds of all seeds of a group pooled."))
    return finish(section, out)


def main(argv=None) -> int:
    return script_main(__doc__, make, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
