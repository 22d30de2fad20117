"""Device timeline (Gantt chart) of one round of one run, from events.parquet.

Bars per device, from its events in the order they were recorded:
  download   download_start -> download_end
  forward    download_end -> forward_end
  backward   previous compute end (forward_end or the previous backward_end) -> backward_end of the layer
  upload     upload_start -> upload_end of the layer
  cut        start of the phase the deadline interrupted -> cut (an open upload of the cut's layer, else an
             open download, else the last compute end); `offline` (churn) and `stopped` (quorum reached)
             interruptions are drawn the same way, as their own phases
Vertical lines: the deadline (the `deadline` event, else round start + policy.deadline_s unless the
policy is one that ignores it: wait, overselect, fedasync, fedbuff) and the round end.
`--run` picks a run of a sweep (default: the first), `--round` the round (default 0), `--max-devices`
the devices shown (lowest ids first).
Writes gantt.png and gantt.md/.csv (one row per bar, absolute simulated times).
"""

from __future__ import annotations

import pyarrow.parquet as pq

from analysis.common import AnalysisError, Section, Table, finish, plt, save_figure, script_main

COLORS = {"download": "tab:blue", "forward": "tab:orange", "upload": "tab:purple", "cut": "tab:red",
          "offline": "tab:gray", "stopped": "tab:brown"}
INTERRUPTIONS = ("cut", "offline", "stopped")      # end an unfinished phase (energy up to that instant)
BACKWARD = ["#2ca02c", "#98df8a"]      # alternate shades so adjacent layers are told apart


def gantt_bars(events: dict[str, list]) -> list[dict]:
    """Bars of the devices' phases from one round's events (columns of events.parquet)."""
    bars: list[dict] = []
    state: dict[int, dict] = {}
    for device, kind, layer, t in zip(events["device"], events["event"], events["layer"], events["time_s"]):
        if device < 0:
            continue
        s = state.setdefault(device, {"download": None, "compute": None, "uploads": {}})

        def bar(phase: str, start: float) -> None:
            bars.append({"device": device, "phase": phase, "layer": layer, "start_s": start, "end_s": t})

        if kind == "download_start":
            s["download"] = t
        elif kind == "download_end":
            bar("download", s["download"])
            s["download"], s["compute"] = None, t
        elif kind == "forward_end":
            bar("forward", s["compute"])
            s["compute"] = t
        elif kind == "backward_end":
            bar("backward", s["compute"])
            s["compute"] = t
        elif kind == "upload_start":
            s["uploads"][layer] = t
        elif kind == "upload_end":
            bar("upload", s["uploads"].pop(layer))
        elif kind in INTERRUPTIONS:
            if layer in s["uploads"]:
                start = s["uploads"].pop(layer)
            elif s["download"] is not None:
                start, s["download"] = s["download"], None
            else:
                start = s["compute"]
            bar(kind, start)
    return bars


def add_arguments(parser) -> None:
    parser.add_argument("--run", default=None, help="run id of a sweep (default: the first completed run)")
    parser.add_argument("--round", type=int, default=0, help="round to draw (default 0)")
    parser.add_argument("--max-devices", type=int, default=40, help="devices drawn, lowest ids first (default 40)")


def make(runs, out, args) -> Section:
    if args.run is None:
        run = runs[0]
    else:
        matches = [r for r in runs if r.run_id == args.run]
        if not matches:
            raise AnalysisError(f"no completed run {args.run!r}; known: {', '.join(r.run_id for r in runs)}")
        run = matches[0]
    events = run.events(args.round)
    if not events["round"]:
        raise AnalysisError(f"{run.path}: no events in round {args.round}")
    devices = sorted({d for d in events["device"] if d >= 0})[: args.max_devices]
    shown = set(devices)
    bars = sorted((b for b in gantt_bars(events) if b["device"] in shown), key=lambda b: b["device"])  # stable
    server = {kind: t for d, kind, t in zip(events["device"], events["event"], events["time_s"]) if d < 0}
    start_at, end_at = server.get("round_start"), server.get("round_end")
    deadline_at = server.get("deadline")
    if deadline_at is None and start_at is not None:
        # the deadline did not fire (everyone was done before it): the run's deadline is in the metadata
        meta = pq.read_schema(run.path / "rounds.parquet").metadata or {}
        deadline_s = meta.get(b"policy.deadline_s", b"").decode()
        if deadline_s:
            deadline_at = start_at + float(deadline_s)

    row_of = {d: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * len(devices)))
    for b in bars:
        color = BACKWARD[b["layer"] % 2] if b["phase"] == "backward" else COLORS[b["phase"]]
        ax.barh(row_of[b["device"]], b["end_s"] - b["start_s"], left=b["start_s"], height=0.7, color=color,
                hatch="//" if b["phase"] in INTERRUPTIONS else None, edgecolor="black", linewidth=0.3)
    if deadline_at is not None:
        ax.axvline(deadline_at, color="red", linestyle="--", label=f"deadline {deadline_at:.4g} s")
    if end_at is not None:
        ax.axvline(end_at, color="black", linestyle=":", label=f"round end {end_at:.4g} s")
    phases = ["download", "forward", "backward", "upload"] + [k for k in INTERRUPTIONS
                                                               if any(b["phase"] == k for b in bars)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=BACKWARD[0] if p == "backward" else COLORS[p]) for p in phases]
    legend_lines = ax.get_legend_handles_labels()
    ax.legend(handles + legend_lines[0], phases + legend_lines[1],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_yticks(range(len(devices)), [str(d) for d in devices])
    ax.invert_yaxis()
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("device")
    ax.set_title(f"{run.run_id}: round {args.round}")
    ax.grid(alpha=0.3, axis="x")
    section = Section(f"Device timeline, round {args.round}", figures=[save_figure(fig, out / "gantt.png")])
    rows = [[b["device"], b["phase"], b["layer"], b["start_s"], b["end_s"], b["end_s"] - b["start_s"]] for b in bars]
    section.tables.append(Table(
        "gantt", f"Device timeline: run {run.run_id}, round {args.round}",
        ["device", "phase", "layer", "start_s", "end_s", "duration_s"], rows,
        f"{len(devices)} devices shown; layer -1: none (download, forward, or a cut before backward)."))
    return finish(section, out)


def main(argv=None) -> int:
    return script_main(__doc__, make, add_arguments, argv)


if __name__ == "__main__":
    raise SystemExit(main())
