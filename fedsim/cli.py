"""`fedsim run | validate | sweep | report | plot`: the command line. Bad input exits 2 with one line on stderr,
no traceback. `report` and `plot` run the analysis package (`fedsim_analysis`, the checkout's `analysis/`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

from fedsim.errors import FedsimError
from fedsim.spec.fields import printable

__all__ = ["main"]

EXIT_RUN_FAILED = 1       # a sweep in which some runs failed
EXIT_BAD_INPUT = 2        # bad input, or a run that cannot go on (FedsimError)
EXIT_ENVIRONMENT = 3      # the operating system refused: permissions, a full disk, a name it rejects
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with fedsim's error contract: one line on stderr, exit 2 (`--help` shows the usage)."""

    def error(self, message: str):
        from fedsim.spec.fields import printable

        self.exit(EXIT_BAD_INPUT, f"fedsim: error: {self.prog}: {printable(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsim", description="Simulate federated learning on device fleets.")
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
                                "layers, depths, gantt, paper-check (fedsim plot KIND DIR --help)")

    val = sub.add_parser("validate", help="check a scenario file and print a summary")
    val.add_argument("scenario", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _cmd_validate(args) -> int:
    from fedsim.sim.build import build_components
    from fedsim.sim.preview import preview
    from fedsim.spec.scenario import load_scenario

    scn = load_scenario(args.scenario, args.overrides)
    comp = build_components(scn)      # every check a run makes before it writes: data, model, fleet files
    fleet = scn.fleet
    print(f"{scn.source}: ok")
    print(f"  run       {scn.run.name}: {scn.run.rounds} rounds, seed {scn.run.seed}, eval every {scn.run.eval_every}")
    print(f"  model     {scn.model.name} ({scn.model.granularity} layers, {scn.model.dtype})")
    print(f"  data      {scn.data.name}, {scn.data.partition}, {scn.data.samples_per_device} samples/device")
    print(f"  fleet     {fleet.n_devices} devices in {len(fleet.classes)} classes, participants "
          f"{'all' if fleet.participants is None else fleet.participants}")
    deadline = getattr(scn.policy, "deadline_s", None)    # a number, or a schedule (printed as such)
    print(f"  policy    {scn.policy.describe()}, "
          f"{'no fixed deadline' if deadline is None else f'deadline {deadline} s'}, upload {scn.network.upload_mode.value}")
    planned = preview(scn, comp)
    for line in [] if planned is None else planned.lines():
        print(line)
    for notice in scn.notices:
        print(f"  notice    {notice}")
    return 0


def _cmd_run(args) -> int:
    from fedsim.sim.build import build_components
    from fedsim.run import resume_run, run_scenario
    from fedsim.spec.scenario import load_scenario

    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise FedsimError(f"--checkpoint-every: must be a positive integer, got {args.checkpoint_every}")
    if args.resume is not None:
        if args.scenario is not None or args.overrides or args.force:
            raise FedsimError("--resume takes the scenario from the run directory; give no FILE, --set or --force")
        with _progress(None, args.quiet) as progress:
            summary = resume_run(args.resume, progress, args.checkpoint_every, gradients=_gradients(args.cluster))
    else:
        if args.scenario is None:
            raise FedsimError("run: give a scenario FILE (or --resume RUN_DIR)")
        scn = load_scenario(args.scenario, args.overrides)
        for notice in () if args.quiet else scn.notices:
            print(f"fedsim: notice: {notice}", file=sys.stderr)
        components = build_components(scn)          # loads data and builds the model: errors before any output
        out = args.out if args.out is not None else Path("runs") / scn.run.name
        with _progress(scn, args.quiet) as progress:
            summary = run_scenario(scn, out, progress, components, args.checkpoint_every,
                                   base_dir=args.scenario.resolve().parent, gradients=_gradients(args.cluster),
                                   force=args.force)
    acc = "n/a" if summary.test_accuracy is None else f"{summary.test_accuracy:.4f}"
    print(f"{summary.run_dir}: {summary.rounds} rounds, simulated {summary.sim_time_s:.3f} s, "
          f"test accuracy {acc}")
    return 0


def _gradients(cluster):
    """`--cluster`: the run's gradients on a Dask cluster (fedsim.cluster.shards); None: in this process."""
    if cluster is None:
        return None
    from fedsim.cluster.shards import cluster_gradients

    return cluster_gradients(cluster)


@contextlib.contextmanager
def _progress(scn, quiet: bool):
    """A progress bar on stderr: rounds (or, for asynchronous policies, simulated seconds), the simulated
    time and the last accuracy."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    budget_s = getattr(scn.policy, "duration_s", None) if scn is not None else None
    total = budget_s if budget_s is not None else (None if scn is None else scn.run.rounds)
    unit = "sim s" if budget_s is not None else "round"
    name = "resume" if scn is None else scn.run.name
    with tqdm(total=total, unit=unit, desc=name, file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(done: int, sim_s: float, acc: float | None) -> None:
            bar.set_postfix_str(f"sim {sim_s:.1f}s" + ("" if acc is None else f" acc {acc:.3f}"), refresh=False)
            bar.update((min(sim_s, budget_s) if budget_s is not None else done) - bar.n)

        yield progress


def _cmd_sweep(args) -> int:
    from fedsim.sweep import INDEX_FILE, run_sweep

    remote = None
    if args.cluster is not None:
        from fedsim.cluster.sweep import ClusterSweep

        remote = ClusterSweep(args.cluster)
    result = run_sweep(args.scenario, args.grid, args.seeds, args.overrides, args.out, args.jobs,
                       args.target_accuracy, progress=not args.quiet, remote=remote)
    shared = result.points - result.total
    also = f" ({result.points} grid points x seeds; {shared} differ only in ignored fields)" if shared else ""
    print(f"{result.out}: {result.total} runs{also}: {result.skipped} already done, {result.completed} completed "
          f"now, {result.failed} failed; index {result.out / INDEX_FILE}")
    return 0 if result.failed == 0 else 1


def _analysis():
    """The analysis package: installed as `fedsim_analysis`; from a checkout that is not installed, the
    `analysis/` folder next to `fedsim/`, loaded under that same name (never an unrelated `analysis`)."""
    try:
        return importlib.import_module("fedsim_analysis")
    except ModuleNotFoundError as exc:
        if exc.name != "fedsim_analysis":
            raise
    folder = Path(__file__).resolve().parent.parent / "analysis"
    if not (folder / "__init__.py").is_file():
        raise FedsimError("report and plot need the fedsim_analysis package; reinstall fedsim (pip install -e .)")
    spec = importlib.util.spec_from_file_location("fedsim_analysis", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fedsim_analysis"] = package
    spec.loader.exec_module(package)
    return package


def _cmd_study(command: str, rest: list[str]) -> int:
    """`fedsim report ...` and `fedsim plot KIND ...`: the analysis module's own command line."""
    package = _analysis()
    if command == "report":
        return importlib.import_module(f"{package.__name__}.report").main(rest, prog="fedsim report")
    kinds = package.KINDS
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: fedsim plot KIND DIR [--out OUT] [options]  (fedsim plot KIND --help)\n"
              f"kinds: {', '.join(kinds)}")
        return 0
    if rest[0] not in kinds:
        print(f"fedsim: error: plot: unknown kind {printable(rest[0])!r}; one of {', '.join(kinds)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(f"{package.__name__}.{kinds[rest[0]]}")
    return module.main(rest[1:], prog=f"fedsim plot {rest[0]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("report", "plot"):
        try:
            return _cmd_study(argv[0], argv[1:])
        except FedsimError as exc:
            print(f"fedsim: error: {printable(str(exc))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("fedsim: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:         # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    handlers = {"run": _cmd_run, "validate": _cmd_validate, "sweep": _cmd_sweep}
    try:
        return handlers[args.command](args)
    except FedsimError as exc:
        print(f"fedsim: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"fedsim: error: {printable(_os_error(exc))}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:       # the handlers return their code: this came from user code (a model, a loss)
        print(f"fedsim: error: user code called sys.exit({exc.code!r}); the run was stopped", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecursionError:
        print("fedsim: error: input nested too deeply (recursion limit reached)", file=sys.stderr)
        return EXIT_BAD_INPUT


def _os_error(exc: OSError) -> str:
    """One line naming the path(s) and the operating system's reason."""
    reason = exc.strerror or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return f"{reason} ({exc})" if str(exc) and str(exc) != reason else reason
    return f"{': '.join(str(p) for p in paths)}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
