"""The command line's entry point: arguments, dispatch, and the error contract (one line on stderr, an exit
code, no traceback)."""

from __future__ import annotations

import argparse
import gc
import os
import select
import sys
from pathlib import Path

from fedsim import __version__
from fedsim.cli.commands import cmd_policies, cmd_run, cmd_sweep, cmd_validate
from fedsim.cli.study import cmd_study
from fedsim.errors import FedsimError
from fedsim.spec.fields import printable

__all__ = ["main", "entry", "EXIT_RUN_FAILED", "EXIT_BAD_INPUT", "EXIT_ENVIRONMENT", "EXIT_INTERRUPTED"]

EXIT_RUN_FAILED = 1       # a sweep in which some runs failed
EXIT_BAD_INPUT = 2        # bad input, or a run that cannot go on (FedsimError)
EXIT_ENVIRONMENT = 3      # the operating system refused: permissions, a full disk, a name it rejects
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE, as a shell reports a tool a pipe stopped
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with fedsim's error contract: one line on stderr, exit 2 (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"fedsim: error: {self.prog}: {printable(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsim", description="Simulate federated learning on device fleets.")
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario and write its trace directory")
    run.add_argument("scenario", type=Path, nargs="?", help="scenario TOML file (omit with --resume)")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="save the whole state every N rounds so the run can be resumed")
    run.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<run.name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario field, e.g. --set policy.deadline_s=0.5 (repeatable)")
    run.add_argument("--force", action="store_true",
                     help="replace a completed or interrupted run in the --out directory (only fedsim's files "
                          "are removed)")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no notices")
    run.add_argument("--threads", type=int, default=1, metavar="N",
                     help="torch threads for the run's gradients (default 1: measured the fastest on a busy "
                          "machine, within about 10%% of two on an idle one; see docs/PERFORMANCE.md)")
    run.add_argument("--cluster", default=None, metavar="ADDRESS|local[:N]",
                     help="compute the gradients on a Dask cluster: a scheduler address, or local:N worker "
                          "processes (needs fedsim[dask]; see docs/DISTRIBUTED.md)")

    swp = sub.add_parser("sweep", help="run a scenario over a grid of overrides x seeds, in parallel")
    swp.add_argument("scenario", type=Path, help="scenario TOML file")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="a grid axis, e.g. --grid policy.deadline_s=0.5,1,2 (repeatable; cartesian product)")
    swp.add_argument("--seeds", type=int, default=1, help="seeds per grid point: run.seed = base + 0..N-1")
    swp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario field for every run (repeatable)")
    swp.add_argument("--jobs", type=int, default=None,
                     help="parallel processes (default: number of cores; not with --cluster)")
    swp.add_argument("--out", type=Path, default=None, help="sweep directory (default: sweeps/<run.name>)")
    swp.add_argument("--target-accuracy", type=float, default=None,
                     help="also index the simulated time and energy to reach this test accuracy")
    swp.add_argument("--quiet", action="store_true", help="no progress bar and no notices")
    swp.add_argument("--cluster", default=None, metavar="ADDRESS|local[:N]",
                     help="run the runs as tasks on a Dask cluster: a scheduler address, or local:N worker "
                          "processes; the sweep directory must be on a filesystem every worker sees")

    # report and plot hand their arguments to the analysis package, which parses them (see main)
    sub.add_parser("report", help="one HTML page of a run, a sweep or a folder of runs: DIR/report.html "
                                  "(fedsim report DIR --help)")
    sub.add_parser("plot", help="one kind of figure and its tables, into DIR/analysis: accuracy, deadline, pareto, "
                                "layers, depths, gantt, paper-check, equal-time (fedsim plot KIND DIR --help)")

    sub.add_parser("policies", help="every policy: its fields, their defaults and what each does")

    val = sub.add_parser("validate", help="check a scenario as a run would and print a dry run of its rounds")
    val.add_argument("scenario", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--no-model", action="store_true",
                     help="check the scenario, its policy and its fleet (with measurement files) only: no data "
                          "loaded, no model built, no dry run (and no torch imported)")
    return parser


def entry() -> None:
    """The `fedsim` command (and `python -m fedsim.cli`): `main`, then exit without the interpreter's last scan of
    the heap for garbage cycles.

    Every file a command writes is closed by the time `main` returns. At exit Python would traverse every object
    left, torch's and pyarrow's hundreds of thousands included, which took 0.5-1 s after `fedsim validate` or a
    run here; frozen objects (`gc.freeze`) are not traversed, and the operating system takes their memory back.
    A command that raises leaves through the normal exit."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("report", "plot"):      # the analysis package parses its own arguments
        return _guarded(lambda: cmd_study(argv[0], argv[1:]), own_exit=True)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:         # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    handlers = {"run": cmd_run, "validate": cmd_validate, "sweep": cmd_sweep, "policies": cmd_policies}
    return _guarded(lambda: handlers[args.command](args))


def _guarded(command, own_exit: bool = False) -> int:
    """Run `command`, turning every expected failure into one line on stderr and an exit code.
    `own_exit`: the command may end with sys.exit (an argument parser's --help or usage error)."""
    try:
        code = command()
        sys.stdout.flush()       # a closed pipe shows here, not in the interpreter's last flush
        return code
    except FedsimError as exc:
        _say(f"fedsim: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError as exc:
        if not _stdout_gone():             # another pipe (a worker's): an error like any other
            _say(f"fedsim: error: {printable(_os_error(exc))}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        # the reader of stdout left (`fedsim validate s.toml | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        _say(f"fedsim: error: {printable(_os_error(exc))}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        _say("fedsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if own_exit:
            return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        # the handlers return their code: this came from user code (a model, a loss)
        _say(f"fedsim: error: user code called sys.exit({exc.code!r}); the run was stopped", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecursionError:
        _say("fedsim: error: input nested too deeply (recursion limit reached)", file=sys.stderr)
        return EXIT_BAD_INPUT


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (polling its write end reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):     # no poll on this system, or stdout is not a file
        return False


def _say(message: str, file=None) -> None:
    """A message on stderr, on a line of its own (a terminal's progress status line is cleared first)."""
    stream = file or sys.stderr
    clear = "\r\033[K" if getattr(stream, "isatty", lambda: False)() else ""
    print(clear + message, file=stream)


def _os_error(exc: OSError) -> str:
    """One line naming the path(s) and the operating system's reason."""
    reason = exc.strerror or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return f"{reason} ({exc})" if str(exc) and str(exc) != reason else reason
    return f"{': '.join(str(p) for p in paths)}: {reason}"
