"""Device timeline (Gantt chart) of one round of one run, from events.parquet.

Bars per device, from its events in the order they were recorded:
  download   download_start -> download_end
  forward    download_end -> forward_end
  backward   previous compute end (forward_end or the previous backward_end) -> backward_end of the layer
  upload     upload_start -> upload_end of the layer
  cut        start of the phase the deadline interrupted -> cut (an open upload of the cut's layer, else an
             open download, else the last compute end); `offline` (churn) and `stopped` (quorum reached)
             interruptions are drawn the same way, as their own phases
Vertical lines: the deadline (the `deadline` event, else round start + the deadline in force, if any) and
the round end.

Which devices: the round's participants are sorted into kinds by device class, status (nothing, partial,
offline, complete) and depth reached; one device of each kind is taken in turn, stragglers first, until
`--max-devices` (default 16) rows are shown, so a chart shows every way a device ended the round rather
than many identical rows. Rows are grouped by class and labelled in the class's colour; the text after
each row says what it delivered. `--devices 3,17` shows those devices instead.
Which run and round: `--run` (a run id, default the first run of the first group) and `--round` (default:
the round whose participants ended in the most different ways, the earliest of equals).
Writes gantt.png and gantt.md/.csv (one row per bar of the devices shown, absolute simulated times).
"""

from __future__ import annotations

from pathlib import Path

from .common import Section, Table, finish, script_main
from .figures import caption, plt, save_figure
from .runs import AnalysisError

COLORS = {"download": "tab:blue", "forward": "tab:orange", "upload": "tab:purple", "cut": "tab:red",
          "offline": "tab:gray", "stopped": "tab:brown"}
INTERRUPTIONS = ("cut", "offline", "stopped")      # end an unfinished phase (energy up to that instant)
BACKWARD = ["#2ca02c", "#98df8a"]      # alternate shades so adjacent layers are told apart
CLASS_COLORS = ["#1b4f8a", "#b5522a", "#2f7d32", "#7b3f9e", "#8a6d1b", "#1b7f8a", "#8a1b4f", "#555555"]
STATUS_ORDER = {"nothing": 0, "partial": 1, "offline": 2, "nonfinite": 3, "complete": 4}


def gantt_bars(events: dict[str, list]) -> list[dict]:
    """Bars of the devices' phases from one round's events (columns of events.parquet)."""
    bars: list[dict] = []
    state: dict[int, dict] = {}
    for device, kind, layer, t in zip(events["device"], events["event"], events["layer"], events["time_s"]):
        if device < 0:
            continue
        s = state.setdefault(device, {"download": None, "compute": None, "uploads": {}})

        def bar(phase: str, start: float, lane: str = "compute") -> None:
            bars.append({"device": device, "phase": phase, "layer": layer, "start_s": start, "end_s": t,
                         "lane": lane})

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
            bar("upload", s["uploads"].pop(layer), "uplink")
        elif kind in INTERRUPTIONS:
            lane = "compute"
            if layer in s["uploads"]:
                start, lane = s["uploads"].pop(layer), "uplink"
            elif s["download"] is not None:
                start, s["download"] = s["download"], None
            else:
                start = s["compute"]
            bar(kind, start, lane)
    return bars


def add_arguments(parser) -> None:
    parser.add_argument("--run", default=None, help="run id (default: the first run of the first group)")
    parser.add_argument("--round", type=int, default=None,
                        help="round to draw (default: the one whose devices ended in the most different ways)")
    parser.add_argument("--max-devices", type=int, default=16, help="devices shown (default 16)")
    parser.add_argument("--devices", default=None, help="comma-separated device ids to show instead")


def _participants(run, round_: int) -> list[dict]:
    d = run.devices
    return [{"device": dev, "class": cls, "status": st, "depth": dep} for r, dev, cls, st, dep in
            zip(d["round"], d["device"], d["class"], d["status"], d["depth"]) if r == round_]


def default_round(run) -> int:
    """The round whose participants ended in the most different ways (class, status, depth), earliest first."""
    d = run.devices
    kinds: dict[int, set] = {}
    for r, cls, st, dep in zip(d["round"], d["class"], d["status"], d["depth"]):
        kinds.setdefault(r, set()).add((cls, st, dep))
    if not kinds:
        return 0
    return min(kinds, key=lambda r: (-len(kinds[r]), r))


def pick_devices(participants: list[dict], limit: int) -> list[int]:
    """One device of each kind (class, status, depth) in turn, stragglers first, up to `limit`."""
    kinds: dict[tuple, list[int]] = {}
    for p in sorted(participants, key=lambda p: (STATUS_ORDER.get(p["status"], 5), p["depth"], p["device"])):
        kinds.setdefault((STATUS_ORDER.get(p["status"], 5), p["depth"], p["class"]), []).append(p["device"])
    queues = [list(v) for _, v in sorted(kinds.items(), key=lambda kv: kv[0][:2])]
    chosen: list[int] = []
    while len(chosen) < limit and any(queues):
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0))
    return chosen


def _delivered(p: dict | None, n_layers: int) -> str:
    if p is None:
        return ""
    if p["status"] == "complete":
        return f"all {n_layers} layers"
    what = "no layer" if p["depth"] == 0 else f"{p['depth']} of {n_layers} layers"
    return f"{p['status']}: {what}"


def chart(study, run, path, round_: int | None = None, devices: str | None = None,
          max_devices: int = 16) -> tuple[Path, Table]:
    """The Gantt chart of `run`'s round `round_` (default: default_round) at `path`, and its table of bars."""
    group = study.group_of(run)
    round_ = round_ if round_ is not None else default_round(run)
    events = run.events(round_)
    if not events["round"]:
        raise AnalysisError(f"--round {round_}: {run.path} has no events in that round")
    participants = {p["device"]: p for p in _participants(run, round_)}
    present = sorted({d for d in events["device"] if d >= 0})
    asked = devices
    if asked is not None:
        try:
            devices = [int(x) for x in asked.split(",") if x.strip()]
        except ValueError:
            raise AnalysisError(f"--devices {asked}: expected device ids like 3,17") from None
        missing = [d for d in devices if d not in present]
        if missing or not devices:
            raise AnalysisError(f"--devices {asked}: device {(missing or [asked])[0]} took no part in round {round_}")
    elif max_devices < 1:
        raise AnalysisError(f"--max-devices {max_devices}: must be at least 1")
    else:
        devices = pick_devices([participants[d] for d in present if d in participants] or
                               [{"device": d, "class": "?", "status": "?", "depth": 0} for d in present],
                               max_devices)
    classes = list(dict.fromkeys(p["class"] for p in participants.values()))
    class_of = {d: participants.get(d, {}).get("class", "?") for d in devices}
    devices.sort(key=lambda d: (classes.index(class_of[d]) if class_of[d] in classes else len(classes),
                                STATUS_ORDER.get(participants.get(d, {}).get("status"), 5),
                                participants.get(d, {}).get("depth", 0), d))
    shown = set(devices)
    bars = sorted((b for b in gantt_bars(events) if b["device"] in shown), key=lambda b: devices.index(b["device"]))
    server = {kind: t for d, kind, t in zip(events["device"], events["event"], events["time_s"]) if d < 0}
    start_at, end_at = server.get("round_start"), server.get("round_end")
    deadline_at = server.get("deadline")
    if deadline_at is None and start_at is not None and run.deadline_s is not None:
        deadline_at = start_at + run.deadline_s        # everyone was done before the deadline fired

    row_of = {d: i for i, d in enumerate(devices)}
    # a device whose uploads overlap its computing (streaming) gets two lanes: compute above, uplink below
    two_lanes = {d for d in devices if any(u["start_s"] < c["end_s"] for u in bars if u["device"] == d and
                                           u["lane"] == "uplink" for c in bars if c["device"] == d and
                                           c["lane"] == "compute" and c["phase"] != "download")}
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.32 * len(devices)))
    for b in bars:
        colour = BACKWARD[b["layer"] % 2] if b["phase"] == "backward" else COLORS[b["phase"]]
        y, height = row_of[b["device"]], 0.66
        if b["device"] in two_lanes:
            y, height = y + (0.17 if b["lane"] == "uplink" else -0.17), 0.32
        ax.barh(y, b["end_s"] - b["start_s"], left=b["start_s"], height=height, color=colour,
                hatch="///" if b["phase"] in INTERRUPTIONS else None, edgecolor="white", linewidth=0.4)
    ends = {d: max((b["end_s"] for b in bars if b["device"] == d), default=start_at or 0.0) for d in devices}
    for d in devices:
        ax.text(ends[d], row_of[d], "  " + _delivered(participants.get(d), run.n_layers), va="center",
                fontsize=7, color="0.3")
    marks = [(deadline_at, "deadline", "red", "--"), (end_at, "round end", "black", ":")]
    if deadline_at is not None and end_at is not None and abs(deadline_at - end_at) <= 1e-9 * max(1.0, end_at):
        marks = [(end_at, "deadline = round end", "red", "--")]
    for at, text, colour, style in marks:
        if at is not None:
            ax.axvline(at, color=colour, linestyle=style, linewidth=1)
            ahead = text == "deadline" and end_at is not None and at > end_at
            ax.annotate(f"{text} {at:.4g} s", (at, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2 if ahead or text != "deadline" else -2, 2), textcoords="offset points", fontsize=7,
                        va="bottom", ha="left" if ahead or text != "deadline" else "right")
    colour_of = {c: CLASS_COLORS[i % len(CLASS_COLORS)] for i, c in enumerate(classes)}
    ax.set_yticks(range(len(devices)), [f"{class_of[d]} {d}" for d in devices], fontsize=8)
    for tick, d in zip(ax.get_yticklabels(), devices):
        tick.set_color(colour_of.get(class_of[d], "black"))
    for i in range(1, len(devices)):
        if class_of[devices[i]] != class_of[devices[i - 1]]:
            ax.axhline(i - 0.5, color="0.7", linewidth=0.6)
    ax.set_ylim(len(devices) - 0.5, -0.5)
    x_end = max([end_at or 0.0, deadline_at or 0.0] + list(ends.values()))
    ax.set_xlim(start_at or 0.0, x_end + 0.22 * (x_end - (start_at or 0.0) or 1.0))
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("device (class and id)")
    ax.set_title(f"{group.label}, seed {run.seed}: round {round_}", pad=14)
    ax.grid(alpha=0.3, axis="x")
    phases = [p for p in ("download", "forward", "backward", "upload", *INTERRUPTIONS)
              if any(b["phase"] == p for b in bars)]
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=BACKWARD[0] if p == "backward" else COLORS[p],
                             hatch="///" if p in INTERRUPTIONS else None, edgecolor="white") for p in phases]
    ax.legend(handles, [p if p not in INTERRUPTIONS else f"{p} (unfinished phase)" for p in phases], fontsize=7.5,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="phase", title_fontsize=8)
    how = "the devices asked for" if asked is not None else \
        "one of each class, status and depth in turn, stragglers first"
    caption(fig, f"{len(devices)} of {len(present)} participants shown ({how}); backward: one bar per layer, "
                 "last layer first, shades alternating" + ("; uploads that overlap computing: lower half of the row"
                                                           if two_lanes else "")
            + ". Tick labels: device class (colour) and id.")
    save_figure(fig, path)
    rows = [[b["device"], class_of[b["device"]], b["phase"], b["layer"], b["start_s"], b["end_s"],
             b["end_s"] - b["start_s"]] for b in bars]
    table = Table(path.stem, f"Device timeline: run {run.run_id}, round {round_}",
                  ["device", "class", "phase", "layer", "start_s", "end_s", "duration_s"], rows,
                  f"{len(devices)} of {len(present)} participants; layer -1: none (download, forward, or a cut "
                  "before backward).")
    return path, table


def make(study, out, args) -> Section:
    run = study.find(args.run) if args.run is not None else study.groups[0].runs[0]
    path, table = chart(study, run, out / "gantt.png", args.round, args.devices, args.max_devices)
    return finish(Section("Device timeline", figures=[path], tables=[table]), out)


def main(argv=None, prog: str | None = None) -> int:
    return script_main(__doc__, make, add_arguments, argv, prog)


if __name__ == "__main__":
    raise SystemExit(main())
