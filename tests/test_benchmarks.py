"""Every benchmark runs in --quick mode and ends with one JSON line holding its documented keys.

No timing assertions: the machines are shared and noisy; docs/PERFORMANCE.md holds the measured figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

KEYS = {
    "grad": {"mlp_speedup", "cnn_speedup", "mlp_peak_fraction", "cnn_peak_fraction", "threads_best",
             "mm_peak_gflops", "data"},
    "end_to_end": {"e2e_speedup", "fedsim_s", "replica_s", "rounds"},
    "engine": {"events_per_s", "round_event_ms", "fleet_100k_rss_mb", "events_per_round"},
}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_benchmark_quick_run(name):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert KEYS[name] <= set(result), sorted(KEYS[name] - set(result))
    assert result["benchmark"] == name and result["quick"] is True
    assert len(lines) > 3, "a readable table comes before the JSON line"
    for key in KEYS[name] - {"threads_best", "mm_peak_gflops", "data"}:
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result[key])
    if name == "grad":
        assert set(result["threads_best"]) == {"mlp", "cnn"}
