"""How long fedsim takes to start: the command line's import, the commands that need no model, and the import
and build of the paper's MLP scenario.

    python -m benchmarks.startup [--quick] [--repeats N] [--mnist DIR]

Each figure is the best of N fresh processes (default 5; `--quick`: 1), wall time from `exec` to exit, so the
interpreter's own start is included. The processes cache compiled modules as Python does by default
(PYTHONDONTWRITEBYTECODE is dropped from their environment), so all but the first start from bytecode. The build
reads `scenarios/paper_mnist_mlp.toml` with its MNIST files (`--mnist`, default ../shared/datasets/mnist; the
synthetic data set of the same shapes if absent) and times, inside the process, the imports of `fedsim.sim.build`
and `fedsim.spec.scenario` plus `load_scenario` and `build_components` (data, model, profile, fleet). Each process
also says whether torch, `torch._dynamo` and sympy were imported. Prints a table, then one JSON line; `import_build_s` is the headline figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import MNIST_DIR, REPO, emit, print_table

BUILD = r"""
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from fedsim.sim.build import build_components
from fedsim.spec.scenario import load_scenario
imported = time.perf_counter()
overrides = [f'data.dir="{sys.argv[1]}"'] if Path(sys.argv[1]).is_dir() else ['data.name="synthetic"']
scn = load_scenario(Path("scenarios/paper_mnist_mlp.toml"), overrides)
build_components(scn)
end = time.perf_counter()
print(json.dumps({"import_s": imported - start, "build_s": end - imported, "import_build_s": end - start,
                  "data": scn.data.name, "modules": sorted(m for m in ("torch", "torch._dynamo", "sympy")
                                                           if m in sys.modules)}))
"""

MODULES = "; import sys, json; print(json.dumps(sorted(m for m in ('torch', 'torch._dynamo', 'sympy') if m in sys.modules)))"

COMMANDS = {
    "python -c 'import fedsim.cli'": ["-c", "import fedsim.cli" + MODULES],
    "fedsim --help": ["-c", "from fedsim.cli.main import main; main(['--help'])" + MODULES],
    "fedsim --version": ["-c", "from fedsim.cli.main import main; main(['--version'])" + MODULES],
    "fedsim policies": ["-c", "from fedsim.cli.main import main; main(['policies'])" + MODULES],
}


def _timed(args: list[str]) -> tuple[float, str]:
    # as a user's Python: compiled modules cached in __pycache__ (a sandbox may turn that off)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"startup: {args} failed:\n{out.stderr[-2000:]}")
    return wall, out.stdout.strip().splitlines()[-1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one process per figure")
    ap.add_argument("--repeats", type=int, default=None, help="processes per figure, best kept (default 5)")
    ap.add_argument("--mnist", default=str(MNIST_DIR), help="MNIST folder for the build (default: %(default)s)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    rows, commands = [], {}
    for label, cmd in COMMANDS.items():
        runs = [_timed(cmd) for _ in range(repeats)]
        wall = min(w for w, _ in runs)
        modules = json.loads(runs[0][1])
        commands[label] = {"wall_s": round(wall, 4), "modules": modules}
        rows.append([label, wall, "-", ", ".join(modules) or "none"])
    builds = [_timed(["-c", BUILD, args.mnist]) for _ in range(repeats)]
    best = min((json.loads(line) for _, line in builds), key=lambda r: r["import_build_s"])
    wall = min(w for w, _ in builds)
    rows.append([f"import + build paper MLP ({best['data']})", wall, best["import_build_s"],
                 ", ".join(best["modules"]) or "none"])
    print(f"benchmarks.startup: best of {repeats} fresh processes each")
    print_table("start-up", ["what", "process wall s", "in-process s", "imported"], rows)
    result = {"benchmark": "startup", "quick": args.quick, "repeats": repeats, "commands": commands,
              "import_cli_s": commands["python -c 'import fedsim.cli'"]["wall_s"],
              "import_s": round(best["import_s"], 4), "build_s": round(best["build_s"], 4),
              "import_build_s": round(best["import_build_s"], 4), "build_process_s": round(wall, 4),
              "build_data": best["data"], "build_modules": best["modules"]}
    emit(result)
    return result


if __name__ == "__main__":
    main()
