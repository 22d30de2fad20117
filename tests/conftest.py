from __future__ import annotations

import os

# One thread per test process, for torch and for numpy's BLAS: two cores shared by parallel test
# processes (pytest-xdist) and the subprocesses tests start (which inherit these variables) would
# otherwise oversubscribe. Set before numpy or torch is imported; a test that needs more threads sets
# them itself.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MNIST_DIR = SHARED / "datasets" / "mnist"
TRACES_DIR = SHARED / "traces"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A small synthetic scenario; tests change it with --set style overrides.
BASE_TOML = """
[run]
name = "t"
seed = 3
rounds = 3
eval_every = 1

[model]
name = "mlp"

[data]
name = "synthetic"
samples_per_device = 40
test_samples_per_device = 10

[training]
batch_size = 8
lr = 0.1
momentum = 0.5

[[fleet.classes]]
name = "slow"
count = 4
speed_flops = { dist = "lognormal", median = 2.0e6, sigma = 0.5 }
slowdown = { dist = "uniform", low = 1.0, high = 2.0 }
downlink_bps = 1.0e8
uplink_bps = 1.0e7
latency_s = 0.001
power_compute_w = 2.0
power_tx_w = 1.0
power_rx_w = 0.5
power_idle_w = 0.1

[[fleet.classes]]
name = "fast"
count = 4
speed_flops = 2.0e7
downlink_bps = 1.0e8
uplink_bps = 1.0e7

[policy]
name = "salf"
deadline_s = 0.1
"""


def scenario(*overrides: str, text: str = BASE_TOML):
    from fedsim.spec.scenario import parse_scenario

    return parse_scenario(text, "test.toml", list(overrides))


def run(tmp_path: Path, *overrides: str, name: str = "run", text: str = BASE_TOML):
    from fedsim.run import run_scenario

    out = tmp_path / name
    run_scenario(scenario(*overrides, text=text), out)
    return out


def table(run_dir: Path, name: str) -> dict:
    return pq.read_table(run_dir / f"{name}.parquet").to_pydict()


@pytest.fixture
def mnist_dir() -> Path:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    return MNIST_DIR
