"""Shared helpers of the benchmarks: timing, the matmul peak, MNIST (or a stand-in), table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "datasets" / "mnist"


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls, in seconds (the least disturbed by other load on the machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(threads: int, sizes: Sequence[int] = (1024, 2048), repeats: int = 3) -> float:
    """Achieved fp32 GFLOP/s of large square torch.mm on `threads` threads (the best size and repeat)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = 0.0
        gen = torch.Generator().manual_seed(0)
        for n in sizes:
            a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
            out = torch.empty(n, n)
            t = best_time(lambda: torch.mm(a, b, out=out), repeats)
            best = max(best, 2.0 * n ** 3 / t / 1e9)
        return best
    finally:
        torch.set_num_threads(saved)


def thread_counts() -> list[int]:
    """1 and the number of cores (2 here): torch's default is every core."""
    return sorted({1, max(1, os.cpu_count() or 1)})


def load_mnist_or_random(directory: Path = MNIST_DIR):
    """(x_train, y_train, x_test, y_test, source): real MNIST, else random data of the same shapes."""
    from fedsim.learn.data import load_mnist

    if directory.is_dir():
        try:
            d = load_mnist(directory)
            return d.x_train, d.y_train, d.x_test, d.y_test, f"MNIST from {directory}"
        except Exception as exc:  # any unreadable file: fall back, and say so
            reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = f"{directory} not found"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60_000, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (60_000,), generator=gen)
    xt = torch.randn(10_000, 1, 28, 28, generator=gen)
    yt = torch.randint(0, 10, (10_000,), generator=gen)
    return x, y, xt, yt, f"RANDOM data of MNIST's shapes ({reason})"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))


def write_random_mnist(directory: Path, seed: int = 0) -> Path:
    """Random uint8 IDX files with MNIST's names and shapes in `directory` (a stand-in when MNIST is missing)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (directory / name).write_bytes(header + array.tobytes())
    return directory
