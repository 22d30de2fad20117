"""Every scenario file shipped in scenarios/ runs as shipped (two rounds) through `fedsim run`, and writes a
well-formed run directory whose tables agree with each other and with the scenario.

The files are globbed, so a new scenario gets this test without anyone writing it. MNIST scenarios read
the real files (skipped if absent); scenarios with measurement traces read them from ../shared/traces.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import REPO, TRACES_DIR

SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))
ROUNDS = 2
INPUT_SHAPES = {"mnist": (1, 28, 28), "synthetic": (60,)}


def test_the_shipped_scenarios_are_found():
    assert {"quickstart", "paper_mnist_mlp", "paper_mnist_mlp_depths", "paper_mnist_cnn", "phones",
                                                   "flower_fedavg"} <= {p.stem for p in SCENARIOS}


def _overrides(path, request) -> list[str]:
    raw = tomllib.loads(path.read_text())
    if raw.get("policy", {}).get("name") == "flower":
        pytest.importorskip("flwr", reason='Flower is not installed (pip install "fedsim[flower]")')
    overrides = [f"run.rounds={ROUNDS}", f"run.eval_every={ROUNDS}"]
    if raw.get("data", {}).get("name") == "mnist":
        overrides.append(f"data.dir={str(request.getfixturevalue('mnist_dir'))!r}")
    if "traces_dir" in raw.get("fleet", {}):
        if not TRACES_DIR.is_dir():
            pytest.skip(f"measurement traces not found at {TRACES_DIR}")
        overrides.append(f"fleet.traces_dir={str(TRACES_DIR)!r}")
    return overrides


def _n_layers(scn) -> int:
    import torch

    from fedsim.learn.models import build_model
    from fedsim.learn.profile import Granularity, build_profile

    shape = INPUT_SHAPES[scn.data.name]
    model = build_model(scn.model.name, shape, 10, generator=torch.Generator(), source=scn.source)
    return build_profile(model, shape, Granularity(scn.model.granularity)).n_layers


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenario_runs_and_writes_consistent_tables(tmp_path, request, path):
    from fedsim.cli import main
    from fedsim.spec.scenario import load_scenario
    from fedsim.policies import is_asynchronous
    from fedsim.output.trace import DEVICES_SCHEMA, EVENTS_SCHEMA, ROUNDS_SCHEMA

    overrides = _overrides(path, request)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet", *(a for o in overrides for a in ("--set", o))]) == 0
    scn = load_scenario(path, overrides)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["rounds_done"] == ROUNDS
    assert (out / "model.pt").is_file() and not list(out.glob("*.arrows"))

    tables = {}
    for name, schema in (("events", EVENTS_SCHEMA), ("rounds", ROUNDS_SCHEMA), ("devices", DEVICES_SCHEMA)):
        t = pq.read_table(out / f"{name}.parquet")
        assert t.num_rows > 0, name
        assert t.schema.remove_metadata().equals(schema.remove_metadata()), name
        meta = t.schema.metadata
        assert meta[b"scenario.text"].decode() == path.read_text()
        assert json.loads(meta[b"scenario.overrides"]) == overrides
        assert meta[b"run.seed"].decode() == str(scn.run.seed)
        assert meta[b"policy"].decode() == scn.policy.describe()
        tables[name] = t.to_pydict()
    if is_asynchronous(scn.policy):
        return
    rounds, devices, events = tables["rounds"], tables["devices"], tables["events"]
    n_layers = _n_layers(scn)
    n_devices = scn.fleet.n_devices
    k = scn.fleet.participants or n_devices
    classes = {c.name for c in scn.fleet.classes}

    assert rounds["round"] == list(range(ROUNDS))
    assert set(rounds["policy"]) == {scn.policy.describe()}
    assert rounds["start_s"][0] >= 0.0
    for r in range(ROUNDS):
        start, end = rounds["start_s"][r], rounds["end_s"][r]
        assert rounds["duration_s"][r] == end - start and end > start
        if r:
            assert start >= rounds["end_s"][r - 1]
        if scn.policy.deadline_s is not None:       # the round's own deadline (a schedule's r-th)
            assert 0 < rounds["deadline_s"][r] and end - start <= rounds["deadline_s"][r] * (1 + 1e-12)
            if isinstance(scn.policy.deadline_s, float):
                assert rounds["deadline_s"][r] == scn.policy.deadline_s
        rows = [i for i, rr in enumerate(devices["round"]) if rr == r]
        ids = [devices["device"][i] for i in rows]
        depths = [devices["depth"][i] for i in rows]
        assert len(ids) == len(set(ids)) == rounds["participants"][r]
        assert 0 < len(ids) <= k and all(0 <= d < n_devices for d in ids)
        assert all(0 <= d <= n_layers for d in depths)
        assert all(devices["class"][i] in classes for i in rows)
        assert rounds["delivered_any"][r] == sum(d > 0 for d in depths)
        assert rounds["completed"][r] == sum(d == n_layers for d in depths)
        contributors = rounds["contributors"][r]
        assert len(contributors) == n_layers and all(0 <= c <= len(ids) for c in contributors)
        assert rounds["energy_j"][r] == pytest.approx(sum(devices["energy_j"][i] for i in rows), rel=1e-9)
        assert all(devices["energy_j"][i] >= 0 and devices["idle_s"][i] >= 0 for i in rows)
        # events: the round's start and end, every participant downloading from the start, nothing outside
        ev = [(events["device"][i], events["event"][i], events["time_s"][i]) for i, rr in enumerate(events["round"]) if rr == r]
        assert [(e, t) for d, e, t in ev if d == -1 and e == "round_start"] == [("round_start", start)]
        assert [(e, t) for d, e, t in ev if d == -1 and e == "round_end"] == [("round_end", end)]
        assert Counter(d for d, e, _ in ev if e == "download_start") == Counter(ids)
        assert all(start <= t <= end for _, _, t in ev)
    assert all(v is None for v in rounds["test_accuracy"][:-1])            # eval_every = ROUNDS
    last = rounds["test_accuracy"][-1]
    assert last is not None and 0.0 <= last <= 1.0 and math.isfinite(rounds["test_loss"][-1])
    assert last == status["test_accuracy"]
