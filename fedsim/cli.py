"""`fedsim run | validate`: the command line. Bad input exits 2 with one line on stderr, no traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedsim.errors import FedsimError

__all__ = ["main"]

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Simulate federated learning on device fleets.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario and write its trace directory")
    run.add_argument("scenario", type=Path, help="scenario TOML file")
    run.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<run.name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario field, e.g. --set policy.deadline_s=0.5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    val = sub.add_parser("validate", help="check a scenario file and print a summary")
    val.add_argument("scenario", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _cmd_validate(args) -> int:
    from fedsim.scenario import load_scenario

    scn = load_scenario(args.scenario, args.overrides)
    fleet = scn.fleet
    print(f"{scn.source}: ok")
    print(f"  run       {scn.run.name}: {scn.run.rounds} rounds, seed {scn.run.seed}, eval every {scn.run.eval_every}")
    print(f"  model     {scn.model.name} ({scn.model.granularity} layers, {scn.model.dtype})")
    print(f"  data      {scn.data.name}, {scn.data.partition}, {scn.data.samples_per_device} samples/device")
    print(f"  fleet     {fleet.n_devices} devices in {len(fleet.classes)} classes, participants "
          f"{'all' if fleet.participants is None else fleet.participants}")
    print(f"  policy    {scn.policy.describe()}, deadline {scn.policy.deadline_s} s, "
          f"upload {scn.network.upload_mode.value}")
    return 0


def _cmd_run(args) -> int:
    from fedsim.build import build_components
    from fedsim.run import run_scenario
    from fedsim.scenario import load_scenario

    scn = load_scenario(args.scenario, args.overrides)
    components = build_components(scn)          # loads data and builds the model: errors before any output
    out = args.out if args.out is not None else Path("runs") / scn.run.name
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=scn.run.rounds, unit="round", desc=scn.run.name, file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, sim_s: float, acc: float | None) -> None:
        bar.update(1)
        bar.set_postfix_str(f"sim {sim_s:.1f}s" + ("" if acc is None else f" acc {acc:.3f}"), refresh=False)

    try:
        summary = run_scenario(scn, out, progress if bar is not None else None, components)
    finally:
        if bar is not None:
            bar.close()
    acc = "n/a" if summary.test_accuracy is None else f"{summary.test_accuracy:.4f}"
    print(f"{summary.run_dir}: {summary.rounds} rounds, simulated {summary.sim_time_s:.3f} s, "
          f"test accuracy {acc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _cmd_run, "validate": _cmd_validate}
    try:
        return handlers[args.command](args)
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
