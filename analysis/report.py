"""One self-contained HTML page (report.html) with every figure and table of a run or a sweep.

Runs every analysis script into the output directory (their PNG, Markdown and CSV files stay there),
then writes report.html with the figures embedded as base64 PNG, so the page can be mailed alone.
Accepts the options of the scripts (--target, --deadline-key, --run, --round, --max-devices).
"""

from __future__ import annotations

import base64
import html

from analysis import SCRIPTS
from analysis.common import (Section, Table, best_accuracy, final_accuracy, group_key, group_label, script_main,
                             sim_time, total_energy)

_STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ccc;margin-top:2em}"""


def _modules():
    import importlib

    return [importlib.import_module(f"analysis.{name}") for name in SCRIPTS]


def add_arguments(parser) -> None:
    for module in _modules():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)


def overview(runs) -> Table:
    rows = [[r.run_id, group_label(group_key(r, ("seed",))), r.seed, len(r.rounds["round"]), final_accuracy(r),
             best_accuracy(r), sim_time(r), total_energy(r), float(r.rounds["delivered_any"].mean())]
            for r in runs]
    return Table("overview", "Runs", ["run_id", "group", "seed", "rounds", "final_accuracy", "best_accuracy",
                                      "sim_time_s", "energy_j", "mean_delivered"], rows,
                 "Completed runs only. mean_delivered: participants per round that delivered at least one layer.")


def _image(path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"></p>'


def _short(table: Table, max_rows: int = 60) -> Table:
    """Long tables (the Gantt bars) are cut in the page; the full table is in NAME.md / NAME.csv."""
    if len(table.rows) <= max_rows:
        return table
    note = f"{table.note} First {max_rows} of {len(table.rows)} rows; all in {table.name}.csv.".strip()
    return Table(table.name, table.title, table.columns, table.rows[:max_rows], note)


def make(runs, out, args) -> Section:
    sections = [Section("Overview", tables=[overview(runs)])]
    sections += [module.make(runs, out, args) for module in _modules()]
    body = [f"<h1>fedsim report: {html.escape(str(args.dir))}</h1>",
            f"<p>{len(runs)} completed run(s). Figures and tables also in {html.escape(str(out))}.</p>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [_image(p) for p in section.figures]
        body += [_short(t).html() for t in section.tables]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fedsim report</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    report = Section("Report", files=[path])
    for section in sections[1:]:
        report.files += section.files
    return report


def main(argv=None) -> int:
    return script_main(__doc__, make, add_arguments, argv)


if __name__ == "__main__":
    raise SystemExit(main())
