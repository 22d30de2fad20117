"""One self-contained HTML page of a study: every figure and table, one section per group.

`report DIR [--out OUT]` writes OUT/report.html (OUT defaults to DIR) and its figures and tables into
OUT/analysis/. The page opens with what was run: the scenario (its file and text), the fedsim version, the
command lines that made the runs, and a table of contents; then the groups compared (accuracy against
simulated time first, the deadline study when the runs have two deadlines or more, the Pareto front when
there are two groups or more, per-layer updates, straggler depths); then one section per group: the
settings that set it apart, its runs, each seed's accuracy curve and the device timeline of a round of its
first seed. Figures are embedded (base64 PNG), so the page can be mailed alone.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
from pathlib import Path

from . import accuracy_time, deadline, depths, gantt, layer_updates, pareto
from .common import Section, Table, fmt, parse, parser, pm
from .groups import Group, Study, load_study
from .runs import STD_NOTE, AnalysisError, best_accuracy, final_accuracy, mean_std, sim_time, total_energy

_STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}caption{text-align:left;padding:0.3em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}td:first-child{text-align:left}
img{max-width:100%}figure{margin:1em 0}h2{border-bottom:1px solid #ccc;margin-top:2em}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}nav li{margin:0.1em 0}
.facts td{text-align:left}.note{color:#555;font-size:0.9em}"""


def add_arguments(p) -> None:
    p.add_argument("--target", type=float, default=None, help="target accuracy of the deadline study")
    p.add_argument("--deadline-key", default="policy.deadline_s", help="the deadline study's x axis")
    p.add_argument("--round", type=int, default=None, help="the round of the device timelines (default: see gantt)")
    p.add_argument("--max-devices", type=int, default=16, help="devices per timeline (default 16)")


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _sweep_command(sweep: Path) -> str | None:
    try:
        s = json.loads((sweep / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    words = ["fedsim", "sweep", s.get("scenario", "?")]
    for key, values in s.get("grid", {}).items():
        words += ["--grid", f"{key}={','.join(values)}"]
    words += ["--seeds", str(s.get("seeds", 1))]
    for item in s.get("set", []):
        words += ["--set", item]
    if s.get("target_accuracy") is not None:
        words += ["--target-accuracy", str(s["target_accuracy"])]
    return " ".join(shlex.quote(str(w)) for w in words + ["--out", str(sweep)])


def header(study: Study) -> list[str]:
    runs = study.runs
    versions = sorted({str(r.marker.get("fedsim_version", "?")) for r in runs})
    torch = sorted({r.metadata.get("torch.version", "?") for r in runs})
    sources = list(dict.fromkeys(r.marker["scenario"].get("source", "?") for r in runs))
    commands = [c for c in (_sweep_command(s) for s in study.sweeps) if c]
    commands += [r.command() for r in runs if r.sweep is None]
    facts = [("directory", str(study.directory)), ("scenario", ", ".join(sources)),
             ("fedsim version", ", ".join(versions)), ("torch version", ", ".join(torch)),
             ("runs", f"{len(runs)} completed, in {len(study.groups)} group(s) of "
                      f"{', '.join(sorted({str(g.n) for g in study.groups}))} seed(s)")]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    out = [f"<table class='facts'>{rows}</table>", "<h3>Commands</h3>",
           "<pre>" + html.escape("\n".join(commands)) + "</pre>"]
    texts = list(dict.fromkeys((r.marker["scenario"].get("source", "?"), r.marker["scenario"]["text"]) for r in runs))
    for source, text in texts:
        out.append(f"<details><summary>Scenario file {html.escape(source)} (before overrides)</summary>"
                   f"<pre>{html.escape(text)}</pre></details>")
    return out


def runs_table(group: Group) -> Table:
    rows = [[r.seed, r.run_id, len(r.rounds["round"]), final_accuracy(r), best_accuracy(r), sim_time(r),
             total_energy(r), float(r.rounds["delivered_any"].mean())] for r in group.runs]
    fa = mean_std([final_accuracy(r) for r in group.runs])
    return Table(f"{group.slug}_runs", f"Runs of {group.slug}",
                 ["seed", "run", "rounds", "final_accuracy", "best_accuracy", "sim_time_s", "energy_j",
                  "mean_delivered"], rows,
                 f"Final accuracy over the seeds: {pm(fa[0], fa[1])} ({STD_NOTE.lower()}). mean_delivered: "
                 "participants "
                 "per round that delivered at least one layer.")


def _comparison(study: Study, out: Path, args) -> list[tuple[str, Section | str]]:
    """(anchor, section or a note saying why it is not drawn), in page order."""
    parts: list[tuple[str, Section | str]] = [("accuracy", accuracy_time.make(study, out, args))]
    try:
        parts.append(("deadline", deadline.make(study, out, args)))
    except AnalysisError as exc:
        parts.append(("deadline", f"Deadline study not drawn: {exc}."))
    if len(study.groups) > 1:
        args.by = "group"
        parts.append(("pareto", pareto.make(study, out, args)))
    parts.append(("layers", layer_updates.make(study, out, args)))
    parts.append(("depths", depths.make(study, out, args)))
    return parts


def _section_html(section: Section) -> list[str]:
    body = [_image(p, p.stem) for p in section.figures]
    body += [t.html(max_rows=60) for t in section.tables]
    return body


def write_report(study: Study, page: Path, figures: Path, args) -> list[Path]:
    figures.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    comparison = _comparison(study, figures, args)
    toc = ["<li><a href='#setup'>What was run</a></li>", "<li><a href='#comparison'>The groups compared</a><ol>"]
    body = ["<h2 id='setup'>What was run</h2>", *header(study), "<h2 id='comparison'>The groups compared</h2>",
            f"<p class='note'>A group: the runs of one scenario that differ only by seed; groups are never pooled. "
            f"Across seeds: {html.escape(STD_NOTE.lower())}.</p>"]
    for anchor, part in comparison:
        if isinstance(part, str):
            body += [f"<p class='note' id='{anchor}'>{html.escape(part)}</p>"]
            continue
        toc.append(f"<li><a href='#{anchor}'>{html.escape(part.title)}</a></li>")
        body += [f"<h3 id='{anchor}'>{html.escape(part.title)}</h3>", *_section_html(part)]
        files += part.files
    toc.append("</ol></li><li><a href='#groups'>Each group</a><ol>")
    body.append("<h2 id='groups'>Each group</h2>")
    for g in study.groups:
        toc.append(f"<li><a href='#{g.slug}'>{g.slug}: {html.escape(g.label)} ({g.n} seed(s))</a></li>")
        settings = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>"
                           for k, v in g.settings.items())
        body += [f"<h3 id='{g.slug}'>{g.slug}: {html.escape(g.label)}</h3>",
                 f"<p class='note'>Scenario identity (without the seed) {html.escape(g.gid)}; seeds "
                 f"{', '.join(map(str, g.seeds))}.</p>"]
        if settings:
            body.append(f"<table class='facts'><caption>What sets it apart</caption>{settings}</table>")
        table = runs_table(g)
        curve = accuracy_time.group_figure(g, len(study.groups), figures / f"{g.slug}_accuracy.png")
        chart, bars = gantt.chart(study, g.runs[0], figures / f"{g.slug}_gantt.png", args.round, None,
                                  args.max_devices)
        body += [table.html(), _image(curve, curve.stem), _image(chart, chart.stem),
                 f"<p class='note'>{html.escape(bars.title)}: every bar in {html.escape(bars.name)}.csv.</p>"]
        files += [curve, chart, *table.write(figures), *bars.write(figures)]
    toc.append("</ol></li>")
    page_html = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fedsim report: "
                 f"{html.escape(str(study.directory))}</title><style>{_STYLE}</style></head><body>\n"
                 f"<h1>fedsim report: {html.escape(str(study.directory))}</h1>\n"
                 f"<nav><h2>Contents</h2><ol>{''.join(toc)}</ol></nav>\n" + "\n".join(body) + "\n</body></html>\n")
    page.write_text(page_html, encoding="utf-8")
    return [page] + files


def main(argv=None, prog: str | None = None) -> int:
    import sys

    p = parser(__doc__, prog or __name__, out_help="where report.html goes (default: DIR); figures and tables in "
                                                  "OUT/analysis")
    add_arguments(p)
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    out = args.out if args.out is not None else args.dir
    try:
        study = load_study(args.dir)
        if args.max_devices < 1:
            raise AnalysisError(f"--max-devices {args.max_devices}: must be at least 1")
        files = write_report(study, out / "report.html", out / "analysis", args)
    except AnalysisError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{p.prog}: error: {exc.filename or out}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
