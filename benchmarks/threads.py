"""How many torch threads a run should use: the paper's MNIST MLP scenario run end to end with 1 and 2 threads.

Each setting runs `fedsim run` in its own process (`--threads N`), alternating, `--repeats` times; the table
shows each setting's best and median wall time, the machine's load average at the start, and the ratio.
Ends with one JSON line. `fedsim run` defaults to 1 thread: on a busy machine more threads than free cores
cost several times more (threads wait on each other at every small operation), on an idle one two threads
gain little on this model (its matrices are small).

    python -m benchmarks.threads [--rounds 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import MNIST_DIR, REPO


def _run(threads: int, rounds: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "fedsim.cli", "run", str(REPO / "scenarios" / "paper_mnist_mlp.toml"), "--quiet",
           "--force", "--threads", str(threads), "--out", str(out), "--set", f"run.rounds={rounds}",
           "--set", f'data.dir="{MNIST_DIR}"']
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for threads in times:
                times[threads].append(_run(threads, args.rounds, Path(tmp) / f"t{threads}"))
    print(f"paper_mnist_mlp, {args.rounds} rounds, {os.cpu_count()} cores, load average {load:.1f} at start")
    print(f"{'threads':>8} {'best s':>8} {'median s':>9}")
    for threads, ts in times.items():
        print(f"{threads:>8} {min(ts):>8.2f} {statistics.median(ts):>9.2f}")
    ratio = statistics.median(times[2]) / statistics.median(times[1])
    print(f"2 threads / 1 thread (median): {ratio:.2f}")
    print(json.dumps({"rounds": args.rounds, "load_average": round(load, 2), "cores": os.cpu_count(),
                      "one_thread_s": statistics.median(times[1]), "two_threads_s": statistics.median(times[2]),
                      "ratio_two_over_one": round(ratio, 3)}))


if __name__ == "__main__":
    main()
