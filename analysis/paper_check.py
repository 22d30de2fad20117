"""The SALF paper's claims against several sweeps of one model: one table and three figures.

`python -m analysis.paper_check SWEEP [SWEEP ...] --out DIR --budget-s B --target A`

Runs are grouped by policy and deadline (seeds pooled). Per group, mean and standard deviation over seeds
of: the fraction of device-rounds that were stragglers (did not deliver every layer), the test accuracy
after the last round, the accuracy at a simulated-time budget B (the last evaluation at or before B), the
simulated time and the fleet energy to reach accuracy A (runs that never reach it are counted apart).
Figures: accuracy per round at the tightest deadline (does SALF track wait round by round?), accuracy
against simulated time at that deadline, and final accuracy against the deadline.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from analysis.common import AnalysisError, Table, load_runs, plt, reach, save_figure

__all__ = ["main", "summarise"]

FREE = "-"      # the deadline column of policies without a deadline
# one colour per policy, the same in every figure
COLORS = {"salf": "tab:red", "drop": "tab:blue", "wait": "black", "partial": "tab:green", "heterofl": "tab:orange",
          "overselect": "tab:purple", "fedasync": "tab:brown", "fedbuff": "tab:gray"}


def _policy(run) -> str:
    return run.policy.split("(")[0]


def _deadline(run) -> str:
    return run.params.get("policy.deadline_s", FREE) if _policy(run) in ("salf", "drop", "partial", "heterofl") else FREE


def _straggler_fraction(run) -> float:
    status = pq.read_table(run.path / "devices.parquet", columns=["status"]).column("status").to_pylist()
    return float(np.mean([s != "complete" for s in status])) if status else float("nan")


def _accuracy_at(run, budget_s: float) -> float:
    r = run.rounds
    ok = ~np.isnan(r["test_accuracy"]) & (r["end_s"] <= budget_s + 1e-9)
    return float(r["test_accuracy"][ok][-1]) if ok.any() else float("nan")


def _mean_std(values) -> str:
    v = np.array([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def summarise(runs, budget_s: float, target: float) -> tuple[Table, dict]:
    groups: dict[tuple[str, str], list] = {}
    for run in runs:
        groups.setdefault((_policy(run), _deadline(run)), []).append(run)
    order = sorted(groups, key=lambda k: (k[1] == FREE, float(k[1]) if k[1] != FREE else 0.0, k[0]))
    rows = []
    for key in order:
        members = groups[key]
        reached = [reach(r, target) for r in members]
        hits = [x for x in reached if x is not None]
        finals = [float(r.rounds["test_accuracy"][~np.isnan(r.rounds["test_accuracy"])][-1]) for r in members]
        rows.append([key[0], key[1], len(members), _mean_std([_straggler_fraction(r) for r in members]),
                     _mean_std(finals), _mean_std([_accuracy_at(r, budget_s) for r in members]),
                     _mean_std([float(r.rounds["end_s"][-1]) for r in members]),
                     _mean_std([h[0] for h in hits]) + ("" if len(hits) == len(members) else f" ({len(hits)}/{len(members)} reached)"),
                     _mean_std([h[1] for h in hits])])
    table = Table("paper_check", "Policies against deadlines (mean ± std over seeds)",
                  ["policy", "deadline_s", "seeds", "straggler fraction", "final accuracy",
                   f"accuracy at {budget_s:g} s", "simulated time_s", f"time_s to {target:g}", f"energy_j to {target:g}"],
                  rows)
    return table, groups


def _curves(ax, members, x: str) -> None:
    points = []
    for run in members:
        r = run.rounds
        ok = ~np.isnan(r["test_accuracy"])
        points.append((r["round"][ok] + 1 if x == "round" else r["end_s"][ok], r["test_accuracy"][ok]))
    if x == "round":       # synchronous runs share their evaluated rounds
        xs = points[0][0]
        ys = np.array([p[1][: len(xs)] for p in points])
        policy = _policy(members[0])
        line, = ax.plot(xs, ys.mean(axis=0), color=COLORS.get(policy, "tab:cyan"))
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15, linewidth=0)
    else:
        grid = np.linspace(0, max(p[0].max() for p in points), 200)
        ys = np.array([np.interp(grid, p[0], p[1], left=np.nan) for p in points])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)      # before a run's first evaluation: no value
            line, = ax.plot(grid, np.nanmean(ys, axis=0))
    return line


def figures(groups, out: Path, budget_s: float) -> list[Path]:
    deadlines = sorted({float(k[1]) for k in groups if k[1] != FREE})
    if not deadlines:
        raise AnalysisError("no deadline policy among the runs")
    tight = deadlines[0]
    chosen = {k: v for k, v in groups.items() if k[1] == FREE or float(k[1]) == tight}
    paths = []
    for x in ("round", "time"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (policy, deadline), members in sorted(chosen.items()):
            if x == "round" and policy in ("fedasync", "fedbuff"):
                continue
            line = _curves(ax, members, x)
            line.set_label(policy if deadline == FREE else f"{policy} (deadline {deadline} s)")
            line.set_color(COLORS.get(policy, "tab:cyan"))
        ax.set_xlabel("round" if x == "round" else "simulated time (s)")
        if x == "time":
            ax.set_xlim(0, budget_s * 3)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"accuracy per {'round' if x == 'round' else 'simulated second'} at the tightest deadline ({tight:g} s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / f"accuracy_{x}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in sorted({k[0] for k in groups if k[1] != FREE}):
        xs = [d for d in deadlines if (policy, _fmt_deadline(groups, policy, d)) in groups]
        finals = [np.mean([r.rounds["test_accuracy"][~np.isnan(r.rounds["test_accuracy"])][-1]
                           for r in groups[(policy, _fmt_deadline(groups, policy, d))]]) for d in xs]
        ax.plot(xs, finals, marker="o", label=policy, color=COLORS.get(policy, "tab:cyan"))
    for (policy, deadline), members in groups.items():
        if deadline == FREE and policy not in ("fedasync", "fedbuff"):
            ax.axhline(np.mean([r.rounds["test_accuracy"][~np.isnan(r.rounds["test_accuracy"])][-1] for r in members]),
                       linestyle="--", color="gray" if policy == "wait" else "silver", label=f"{policy} (no deadline)")
    ax.set_xscale("log")
    ax.set_xticks(deadlines, [f"{d:g}" for d in deadlines])
    ax.minorticks_off()
    ax.set_xlabel("deadline (s)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("final accuracy against the deadline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "final_vs_deadline.png"))
    return paths


def _fmt_deadline(groups, policy: str, d: float) -> str:
    for p, deadline in groups:
        if p == policy and deadline != FREE and float(deadline) == d:
            return deadline
    return FREE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", help="sweep (or run) directories of one model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=10.0, help="simulated-time budget for the accuracy column")
    parser.add_argument("--target", type=float, default=0.85, help="target test accuracy")
    args = parser.parse_args(argv)
    try:
        runs = [run for d in args.dirs for run in load_runs(d)]
        args.out.mkdir(parents=True, exist_ok=True)
        table, groups = summarise(runs, args.budget_s, args.target)
        files = table.write(args.out) + figures(groups, args.out, args.budget_s)
    except AnalysisError as exc:
        print(f"analysis: error: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
