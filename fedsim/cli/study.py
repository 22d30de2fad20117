"""`fedsim report` and `fedsim plot`: the analysis package's own command lines (`fedsim_analysis`, or the
checkout's `analysis/` folder)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from fedsim.errors import FedsimError
from fedsim.spec.fields import printable

__all__ = ["cmd_study"]

EXIT_BAD_INPUT = 2


def _analysis():
    """The analysis package: installed as `fedsim_analysis`; from a checkout that is not installed, the
    `analysis/` folder next to `fedsim/`, loaded under that same name (never an unrelated `analysis`)."""
    try:
        return importlib.import_module("fedsim_analysis")
    except ModuleNotFoundError as exc:
        if exc.name != "fedsim_analysis":
            raise
    folder = Path(__file__).resolve().parents[2] / "analysis"
    if not (folder / "__init__.py").is_file():
        raise FedsimError("report and plot need the fedsim_analysis package; reinstall fedsim (pip install -e .)")
    spec = importlib.util.spec_from_file_location("fedsim_analysis", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fedsim_analysis"] = package
    spec.loader.exec_module(package)
    return package


def cmd_study(command: str, rest: list[str]) -> int:
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
