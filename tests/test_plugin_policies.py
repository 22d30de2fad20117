"""Policies from outside the package: the worked example (docs/examples/keep_fastest.py), plugin paths and their
errors, declared fields (notices, did-you-mean) and a policy's learned state."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, scenario, table

EXAMPLES = REPO / "docs" / "examples"
QUICKSTART = REPO / "scenarios" / "quickstart.toml"


def _run_cli(tmp_path, *args, pythonpath=EXAMPLES):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("k", [None, 8])
def test_keep_fastest_example_runs_from_the_command_line(tmp_path, k):
    """The README's command: each round ends when the K-th fastest participant is expected to finish; the update
    holds exactly the K complete devices (synthetic data, ideal uploads: finish = download + compute)."""
    out = tmp_path / "kf"
    sets = ["--set", "policy.name=keep_fastest:KeepFastest", "--set", "run.rounds=4"]
    if k is not None:
        sets += ["--set", f"policy.k={k}"]
    proc = _run_cli(tmp_path, "run", str(QUICKSTART), *sets, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "fedsim: notice: keep_fastest ignores policy.deadline_s" in proc.stderr
    k = k or 5
    rounds, devices = table(out, "rounds"), table(out, "devices")
    assert rounds["policy"] == [f"keep_fastest(k={k})"] * 4
    assert rounds["contributors"] == [[k, k, k]] * 4
    for r in range(4):
        rows = [i for i, rr in enumerate(devices["round"]) if rr == r]
        finish = sorted(devices["download_s"][i] + devices["compute_s"][i] for i in rows
                        if devices["status"][i] == "complete")
        assert len(finish) == k
        # the deadline is the K-th expected finish (x (1 + 1e-9)); a later device was cut
        assert rounds["duration_s"][r] == pytest.approx(finish[-1], rel=1e-8)
        assert all(devices["status"][i] in ("complete", "partial", "nothing") for i in rows)
        assert sum(devices["status"][i] == "complete" for i in rows) == k


@pytest.mark.parametrize("value,words", [
    ("nosuch_module_xyz:Policy", ["policy.name", "cannot import module 'nosuch_module_xyz'"]),
    ("keep_fastest:Missing", ["policy.name", "has no attribute 'Missing'"]),
    ("keep_fastest:MARGIN", ["policy.name", "policy 'keep_fastest:MARGIN' is not a fedsim policy", "got float"]),
    ("keep_fastest:KeepFastest:x", ["policy.name", "'package.module:Class'"]),
    ("salff", ["policy.name", "unknown policy 'salff'", "did you mean 'salf'"]),
])
def test_bad_plugin_paths_exit_2_naming_field_and_value(tmp_path, value, words):
    proc = _run_cli(tmp_path, "run", str(QUICKSTART), "--set", f"policy.name={value}", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedsim: error: {QUICKSTART}: policy.name: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_plugin_module_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken_policy.py").write_text("import nosuch_dependency_xyz\n")
    proc = _run_cli(tmp_path, "validate", str(QUICKSTART), "--set", "policy.name=broken_policy:P", pythonpath=tmp_path)
    assert proc.returncode == 2
    assert "policy.name: importing module 'broken_policy' of policy 'broken_policy:P' failed: ModuleNotFoundError: No module named 'nosuch_dependency_xyz'" in proc.stderr


def test_fields_other_policies_read_are_notices_and_typos_are_errors():
    from fedsim.errors import ScenarioError

    scn = scenario('policy.name="wait"', 'policy.aggregation="mean"')
    assert scn.ignored == ("policy.aggregation", "policy.deadline_s")
    assert scn.notices == ("wait ignores policy.aggregation, policy.deadline_s",)
    assert scenario().ignored == () and scenario().notices == ()
    # the data set's section too: synthetic data has no files and partitions itself
    scn = scenario("data.dir='/tmp'", 'data.partition="dirichlet"', 'policy.name="wait"')
    assert scn.notices == ("synthetic ignores data.dir, data.partition", "wait ignores policy.deadline_s")
    assert scn.all_ignored == ("data.dir", "data.partition", "policy.deadline_s")
    with pytest.raises(ScenarioError, match=r"policy\.dedline_s: unknown field; did you mean policy\.deadline_s\?"):
        scenario("policy.dedline_s=0.1")
    # a misspelt required field: the missing one names the typo
    with pytest.raises(ScenarioError, match=r"policy\.deadline_s: missing required field \(policy\.dedline_s is "
                                            r"given: a typo\?\)"):
        scenario('policy.name="drop"', "policy.dedline_s=0.1", text=_without_deadline())
    # in other sections too
    with pytest.raises(ScenarioError, match=r"training\.lrr: unknown field; did you mean training\.lr\?"):
        scenario("training.lrr=0.1")


def _without_deadline() -> str:
    from conftest import BASE_TOML

    lines = [ln for ln in BASE_TOML.splitlines() if not ln.strip().startswith("deadline_s")]
    assert len(lines) == len(BASE_TOML.splitlines()) - 1
    return "\n".join(lines) + "\n"


def test_a_policy_reading_an_undeclared_field_is_refused(tmp_path, monkeypatch):
    from fedsim.errors import ScenarioError

    (tmp_path / "sloppy_policy.py").write_text(
        "from dataclasses import dataclass\n"
        "from typing import ClassVar\n"
        "from fedsim.policies import SyncPolicy\n"
        "from fedsim.policies.layerwise import full_model_update\n"
        "@dataclass(frozen=True)\n"
        "class Sloppy(SyncPolicy):\n"
        "    name: ClassVar[str] = 'sloppy'\n"
        "    reads: ClassVar[frozenset] = frozenset()\n"
        "    @classmethod\n"
        "    def read(cls, fields, training):\n"
        "        fields.raw('deadline_s', None)\n"
        "        return cls()\n"
        "    def aggregate(self, inputs, grads):\n"
        "        return full_model_update(inputs, grads, inputs.done_order)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ScenarioError, match=r"policy\.deadline_s: policy 'sloppy_policy:Sloppy' read a field it "
                                            r"does not declare"):
        scenario('policy.name="sloppy_policy:Sloppy"')


def test_a_deadline_hook_that_returns_a_bad_value_fails_the_run(tmp_path, monkeypatch):
    from fedsim.errors import FedsimError
    from fedsim.policies.salf import Salf

    monkeypatch.setattr(Salf, "deadline", lambda self, round_, ctx: -1.0)
    from conftest import run

    with pytest.raises(FedsimError, match=r"policy\.name: salf\(mean\) set round 0's deadline to -1\.0 s"):
        run(tmp_path)


def test_an_adaptive_deadline_salf_is_one_file(tmp_path, monkeypatch):
    """A SALF variant whose deadline changes every round and learns from what arrived: one module, no edit in
    fedsim. Its deadline is policy.deadline_s in round 0, then the mean time of the rounds so far x 1.5; the
    state (rounds seen, their summed duration) comes back from every round through `observe`."""
    (tmp_path / "adaptive_salf.py").write_text('''
from dataclasses import dataclass
from typing import ClassVar

from fedsim.policies import JSONValue, PolicyState
from fedsim.policies.salf import DepthHistogram, Salf


@dataclass(frozen=True)
class Seen(PolicyState):
    histogram: DepthHistogram
    rounds: int
    busy_s: float            # summed over rounds: the latest finish of a delivering device

    def to_json(self) -> JSONValue:
        return [self.histogram.to_json(), self.rounds, self.busy_s]


@dataclass(frozen=True)
class AdaptiveSalf(Salf):
    name: ClassVar[str] = "adaptive_salf"

    def start(self, run):
        return Seen(super().start(run), 0, 0.0)

    def deadline(self, round_, ctx):
        s = ctx.state
        return self.deadline_s if s.rounds == 0 else 1.5 * s.busy_s / s.rounds

    def aggregate(self, inputs, grads):
        from dataclasses import replace
        return super().aggregate(replace(inputs, context=replace(inputs.context, state=inputs.state.histogram)), grads)

    def observe(self, state, inputs):
        plan = inputs.context.plan()
        finish = plan.download_s + plan.forward_s + plan.backward_s.sum(axis=1)
        delivered = finish[inputs.depths > 0]
        return Seen(super().observe(state.histogram, inputs), state.rounds + 1,
                    state.busy_s + (float(delivered.max()) if len(delivered) else 0.0))
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    from conftest import run

    out = run(tmp_path, 'policy.name="adaptive_salf:AdaptiveSalf"', "policy.deadline_s=0.02", "run.rounds=4")
    durations = table(out, "rounds")["duration_s"]
    assert durations[0] == pytest.approx(0.02)
    assert len(set(round(d, 12) for d in durations)) > 1       # the deadline changed
    assert table(out, "rounds")["policy"] == ["salf(mean)"] * 4


def test_a_policy_registered_by_an_installed_package_is_named_by_its_name(tmp_path, monkeypatch):
    """`[project.entry-points."fedsim.policies"] keep_fastest = "keep_fastest:KeepFastest"` in a package."""
    from test_plugins import install

    install(tmp_path, "fastpolicies", {"fedsim.policies": {"fastest": "keep_fastest:KeepFastest"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    scn = scenario('policy.name="fastest"', "policy.k=3")
    assert type(scn.policy).__name__ == "KeepFastest" and scn.policy.k == 3
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match=r"policy\.name: unknown policy 'fastes' \(did you mean 'fastest'\?\)"):
        scenario('policy.name="fastes"')


def test_ignored_fields_do_not_change_a_runs_identity():
    """Analysis groups by identity: wait written with two deadlines is one scenario; salf with two is two."""
    from conftest import BASE_TOML
    from fedsim.output.rundir import scenario_identity

    def identity(*overrides):
        scn = scenario(*overrides)
        return scenario_identity(BASE_TOML, list(overrides), scn.all_ignored)

    assert identity('policy.name="wait"', "policy.deadline_s=0.1") == identity('policy.name="wait"', "policy.deadline_s=0.2")
    assert identity("policy.deadline_s=0.1") != identity("policy.deadline_s=0.2")
    assert identity('policy.name="wait"', "run.seed=4")["group"] == identity('policy.name="wait"')["group"]


def test_reading_a_scenario_imports_the_other_policies_only_to_name_a_field_it_ignores():
    """Every built-in policy's fields are looked up only when the `[policy]` table holds a key its policy does
    not read (to tell a field another policy reads, named in a notice, from a misspelt one)."""
    code = ("import sys; from pathlib import Path; from fedsim.spec.scenario import load_scenario; "
            "scn = load_scenario(Path('scenarios/quickstart.toml'), sys.argv[1:]); "
            "print(scn.ignored, 'fedsim.policies.fedbuff' in sys.modules, 'fedsim.policies.heterofl' in sys.modules)")
    quiet = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert quiet.stdout.split() == ["()", "False", "False"]
    other = subprocess.run([sys.executable, "-c", code, "policy.buffer_size=3"], cwd=REPO, capture_output=True,
                           text=True, check=True)
    assert other.stdout.split() == ["('policy.buffer_size',)", "True", "True"]
