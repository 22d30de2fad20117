"""Flower is optional: fedsim imports and runs without it, and the flower policy says what to install.

Runs whether or not the `fedsim[flower]` extra is installed (a subprocess hides `flwr`).
"""

from __future__ import annotations

import subprocess
import sys

from conftest import BASE_TOML, REPO

FLOWER_POLICY = '[policy]\nname = "flower"\nstrategy = "flwr.serverapp.strategy:FedAvg"\n'


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_fedsim_reads_and_runs_without_importing_flower(tmp_path):
    """Reading any scenario (which lists every built-in policy's fields) and a run import no flwr."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    done = _python(f"""
import sys
import fedsim.cli, fedsim.policies.flower, fedsim.run, fedsim.sweep
from fedsim.cli import main
assert main(["run", {str(scenario)!r}, "--out", {str(tmp_path / "run")!r}, "--quiet", "--set", "run.rounds=1"]) == 0
assert "flwr" not in sys.modules, "a run of salf imported flwr"
""")
    assert done.returncode == 0, done.stderr


def test_without_flower_the_policy_names_the_extra(tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML.replace('[policy]\nname = "salf"\ndeadline_s = 0.1\n', FLOWER_POLICY)
                        .replace("momentum = 0.5", "momentum = 0.0"))
    done = _python(f"""
import sys
sys.modules["flwr"] = None            # as if Flower were not installed: `import flwr` raises ImportError
from fedsim.cli import main
sys.exit(main(["validate", {str(scenario)!r}]))
""")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "policy.name" in line and 'pip install "fedsim[flower]"' in line, line
