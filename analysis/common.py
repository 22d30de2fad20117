"""What every study writes (tables as Markdown and CSV, sections of the report) and their command line.

Every study runs as `python -m analysis.NAME DIR [--out OUT]` (installed: `python -m fedsim_analysis.NAME`,
or `fedsim plot KIND DIR`), where DIR is a run directory, a sweep directory or any folder of runs, and
writes its PNG figures, Markdown tables and CSV files into OUT, by default `DIR/analysis/`. It writes
nothing anywhere else. Bad input: one line on stderr naming the path or value, exit 2 (3 when the
operating system refuses to write).
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .groups import Study, load_study
from .runs import AnalysisError

__all__ = ["Table", "Section", "fmt", "pm", "finish", "script_main", "parser", "parse", "output_dir"]


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def pm(mean: float, std: float, digits: int = 3) -> str:
    """`mean ± std` (std n/a with one seed)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± " + ("n/a" if math.isnan(std) else f"{std:.{digits}f}")


@dataclass
class Table:
    name: str                 # file stem: NAME.md and NAME.csv
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in row])
        return buf.getvalue()

    def html(self, max_rows: int | None = None) -> str:
        rows, cut = self.rows, ""
        if max_rows is not None and len(rows) > max_rows:
            rows, cut = rows[:max_rows], f" First {max_rows} of {len(self.rows)} rows; all in {self.name}.csv."
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        note = (self.note + cut).strip()
        caption = f"<b>{html.escape(self.title)}.</b> {html.escape(note)}"
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"

    def write(self, out: Path) -> list[Path]:
        md, cs = out / f"{self.name}.md", out / f"{self.name}.csv"
        md.write_text(self.markdown())
        cs.write_text(self.csv())
        return [md, cs]


@dataclass
class Section:
    """What one study produced: for its command line and for the HTML report."""
    title: str
    figures: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    text: str = ""
    files: list[Path] = field(default_factory=list)


def finish(section: Section, out: Path) -> Section:
    """Write the section's tables; its figures are already saved."""
    section.files = list(section.figures)
    for table in section.tables:
        section.files += table.write(out)
    return section


class _Parser(argparse.ArgumentParser):
    """One line on stderr and exit 2 for a usage error (`--help` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module_name(name: str) -> str:
    """A module's dotted name, also when it runs as `python -m` (then it is `__main__`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if name == "__main__" and spec is not None else name


def parser(doc: str, prog: str | None = None, out_help: str = "output directory (default: DIR/analysis)"):
    p = _Parser(prog=_module_name(prog) if prog else None, description=doc.strip().splitlines()[0])
    p.add_argument("dir", type=Path, help="a run directory, a sweep directory or a folder of runs")
    p.add_argument("--out", type=Path, default=None, help=out_help)
    return p


def parse(p: argparse.ArgumentParser, argv):
    """The parsed arguments, or the exit code of `--help` or of a usage error (already printed)."""
    try:
        return p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def output_dir(args) -> Path:
    out = args.out if args.out is not None else args.dir / "analysis"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnalysisError(f"{out}: cannot make the output directory ({exc.strerror or exc})") from None
    return out


def script_main(doc: str, make: Callable[[Study, Path, Any], Section], add_arguments: Callable | None = None,
                argv=None, prog: str | None = None) -> int:
    """The command line shared by every study: `NAME DIR [--out OUT] [options]`."""
    p = parser(doc, prog or make.__module__)
    if add_arguments is not None:
        add_arguments(p)
    args = parse(p, argv)
    if isinstance(args, int):
        return args
    name = p.prog
    try:
        study = load_study(args.dir)
        section = make(study, output_dir(args), args)
    except AnalysisError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:           # the operating system refused (as fedsim: exit 3)
        where = exc.filename if exc.filename is not None else args.out
        print(f"{name}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    for path in section.files:
        print(path)
    return 0
