"""`--cluster` on Dask: sweeps as cluster tasks, sharded gradients of one run, worker deaths, clear errors.

The tests share one LocalCluster of 2 single-thread worker processes (starting one and importing torch in
its workers costs seconds); command-line tests reach it by its scheduler address, as on a real cluster.
A worker the fault tests kill is restarted by its nanny, so the cluster stays usable whatever the order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("distributed", reason='Dask is not installed (pip install "fedsim[dask]"): --cluster untested')

from conftest import BASE_TOML, scenario                          # noqa: E402
from fedsim.cluster import session as fc                          # noqa: E402
from fedsim.cluster import shards as fd                           # noqa: E402
from fedsim.sim.build import build_components                         # noqa: E402
from fedsim.cli import main                                       # noqa: E402
from fedsim.learn.grads import GradientEngine                           # noqa: E402
from fedsim.run import run_scenario                               # noqa: E402

FLOAT64 = ('model.dtype="float64"',)
TRACES = ("events", "devices", "rounds")
MODEL_COLUMNS = ("train_loss", "test_loss", "test_accuracy")      # depend on the model: equal to rounding


@pytest.fixture(scope="module")
def client():
    with fc.connect("local:2") as c:
        yield c


def same_model(a_dir, b_dir, tol=1e-12):
    a, b = torch.load(a_dir / "model.pt"), torch.load(b_dir / "model.pt")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) <= tol


def assert_same_traces(a_dir, b_dir):
    """Timing rows equal exactly; what the model decides (losses, accuracy) equal to float64 rounding."""
    for name in TRACES:
        a, b = pq.read_table(a_dir / f"{name}.parquet"), pq.read_table(b_dir / f"{name}.parquet")
        assert a.schema.equals(b.schema, check_metadata=True), name
        exact = [c for c in a.column_names if c not in MODEL_COLUMNS]
        assert a.select(exact).equals(b.select(exact)), name
        for c in set(a.column_names) & set(MODEL_COLUMNS):
            assert a.column(c).to_pylist() == pytest.approx(b.column(c).to_pylist(), rel=1e-12, abs=1e-12), c


def local_and_distributed(tmp_path, cluster, *overrides):
    scn = scenario(*FLOAT64, *overrides)
    run_scenario(scn, tmp_path / "local")
    run_scenario(scn, tmp_path / "dist", gradients=fd.cluster_gradients(cluster))
    return tmp_path / "local", tmp_path / "dist"


# -- sweeps -----------------------------------------------------------------------------------------

def test_sweep_on_cluster_equals_local_sweep_and_resumes(tmp_path, capsys, client):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    argv = ["sweep", str(path), "--grid", "policy.name=salf,drop", "--seeds", "2", "--set", "run.rounds=3",
            "--target-accuracy", "0.3", "--quiet"]
    address = client.scheduler.address
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "local")]) == 0
    assert main([*argv, "--cluster", address, "--out", str(tmp_path / "dask")]) == 0
    assert "4 runs: 0 already done, 4 completed now, 0 failed" in capsys.readouterr().out

    local, dask = tmp_path / "local", tmp_path / "dask"
    index = pq.read_table(local / "index.parquet")
    assert pq.read_table(dask / "index.parquet").equals(index, check_metadata=True)
    assert index.column("status").to_pylist() == ["completed"] * 4
    assert (dask / "sweep.json").read_text() == (local / "sweep.json").read_text()
    for run_dir in index.column("run_dir").to_pylist():
        for name in TRACES:       # bit for bit: one torch thread per run on both sides
            assert pq.read_table(dask / run_dir / f"{name}.parquet").equals(
                pq.read_table(local / run_dir / f"{name}.parquet"), check_metadata=True), (run_dir, name)
        assert (dask / run_dir / "params.json").read_text() == (local / run_dir / "params.json").read_text()
        assert torch.equal(torch.load(dask / run_dir / "model.pt")["fc1.weight"],
                           torch.load(local / run_dir / "model.pt")["fc1.weight"])

    # resumable like a local sweep: only the missing run is redone, and the index comes out the same
    gone = index.column("run_dir").to_pylist()[1]
    shutil.rmtree(dask / gone)
    assert main([*argv, "--cluster", address, "--out", str(dask)]) == 0
    assert "4 runs: 3 already done, 1 completed now, 0 failed" in capsys.readouterr().out
    assert pq.read_table(dask / "index.parquet").equals(index, check_metadata=True)
    assert pq.read_table(dask / gone / "rounds.parquet").equals(pq.read_table(local / gone / "rounds.parquet"))


# -- one run, sharded gradients ---------------------------------------------------------------------

def test_sharded_layer_sums_equal_the_single_process_engine(client):
    scn = scenario(*FLOAT64, "fleet.classes[0].count=7", "fleet.classes[1].count=6")
    comp = build_components(scn)
    local = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train)
    engine = fd.ShardedGradientEngine(client, scn, comp.model, comp.profile, comp.partition, comp.dataset,
                                      shards=3)
    try:
        assert engine.n_shards == 3 and engine.layer_of_param == local.layer_of_param
        rng = np.random.default_rng(0)
        n_layers = comp.profile.n_layers
        devices = rng.permutation(13)[:11]
        batches = [comp.partition.sample_batch(int(d), int(rng.integers(1, 9)), rng) for d in devices]
        for depths in (rng.integers(0, n_layers + 1, 11), np.zeros(11, dtype=np.int64), np.full(11, n_layers)):
            engine.begin_round(devices)
            want, got = local.layer_sums(batches, depths), engine.layer_sums(batches, depths)
            assert sorted(got.sums) == sorted(want.sums)
            for name in want.sums:
                torch.testing.assert_close(got.sums[name], want.sums[name], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(got.counts, want.counts)
            assert got.n_devices == want.n_devices
            assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-12)
        with pytest.raises(ValueError, match="begin_round"):
            engine.begin_round(devices[:3])
            engine.layer_sums(batches, np.ones(11, dtype=np.int64))
    finally:
        engine.close()


def test_a_shard_task_in_many_passes_equals_one_engine_call(monkeypatch):
    """The worker function alone, in this process: every device in a pass of its own."""
    scn = scenario(*FLOAT64)
    comp = build_components(scn)
    n_devices, n_layers = comp.partition.n_devices, comp.profile.n_layers
    spec = fd.ShardSpec("in-process", 0, 0, n_devices, scn, fd.data_digest(comp.dataset, comp.partition))
    rng = np.random.default_rng(1)
    batches = [comp.partition.sample_batch(d, int(rng.integers(2, 9)), rng) for d in range(n_devices)]
    depths = rng.integers(1, n_layers + 1, n_devices)
    rows = np.concatenate(batches)        # synthetic data: device k owns rows k*40.., so positions = indices
    sizes = np.array([len(b) for b in batches])
    weights = fd._Weights(comp.model.state_dict(), True)
    monkeypatch.setattr(fd, "_PASS_FWD_FLOPS", 1.0)
    try:
        got = fd.shard_layer_sums(spec, weights, rows, sizes, depths)
    finally:
        fd.forget_run("in-process")
    want = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train).layer_sums(batches, depths)
    assert sorted(got.sums) == sorted(want.sums)
    for name in want.sums:
        torch.testing.assert_close(got.sums[name], want.sums[name], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert (got.n_devices, got.loss_sum) == (want.n_devices, pytest.approx(want.loss_sum, rel=1e-12))


@pytest.mark.parametrize("overrides", [
    ("policy.name=salf", "policy.aggregation=unbiased"),
    ("policy.name=drop",),
    ("policy.name=overselect", "fleet.participants=4"),
])
def test_distributed_run_equals_single_process_run(tmp_path, client, overrides):
    local, dist = local_and_distributed(tmp_path, client, *overrides)
    assert same_model(local, dist)
    assert_same_traces(local, dist)


def test_cli_run_on_a_cluster(tmp_path, capsys, client):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    sets = ["--set", 'model.dtype="float64"', "--set", "run.rounds=2"]
    assert main(["run", str(path), *sets, "--out", str(tmp_path / "local"), "--quiet"]) == 0
    assert main(["run", str(path), *sets, "--out", str(tmp_path / "dist"), "--cluster", client.scheduler.address,
                 "--quiet"]) == 0
    assert "2 rounds" in capsys.readouterr().out
    assert same_model(tmp_path / "local", tmp_path / "dist")
    assert_same_traces(tmp_path / "local", tmp_path / "dist")


def test_resume_on_a_cluster_equals_the_straight_run(tmp_path, client):
    scn = scenario(*FLOAT64, "run.rounds=4")
    run_scenario(scn, tmp_path / "straight")

    def stop(done, sim_s, acc):
        if done == 3:
            raise KeyboardInterrupt          # after the checkpoint of round 2

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scn, tmp_path / "resumed", stop, checkpoint_every=2)
    assert main(["run", "--resume", str(tmp_path / "resumed"), "--cluster", client.scheduler.address, "--quiet"]) == 0
    assert same_model(tmp_path / "straight", tmp_path / "resumed")
    assert_same_traces(tmp_path / "straight", tmp_path / "resumed")


# -- faults -----------------------------------------------------------------------------------------

def test_worker_killed_during_a_run(tmp_path, client):
    """A thread kills the worker holding shard 1 once round 0 is done; the run ends with the same model."""
    scn = scenario(*FLOAT64, "run.rounds=5")
    client.wait_for_workers(2, timeout=60)
    run_scenario(scn, tmp_path / "local")
    run_scenario(scn, tmp_path / "calm", gradients=fd.cluster_gradients(client))
    victim = sorted(client.nthreads())[1]               # owner of shard 1 (shards go to workers in order)
    pid = client.run(os.getpid, workers=[victim])[victim]
    first_round, dead = threading.Event(), threading.Event()

    def kill():
        first_round.wait(timeout=60)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in client.nthreads() and time.monotonic() < deadline:
            time.sleep(0.05)
        dead.set()

    def progress(done, sim_s, acc):
        if done == 1:                  # hold the run until the scheduler has seen the death: rounds 1-4 follow it
            first_round.set()
            assert dead.wait(timeout=60)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    run_scenario(scn, tmp_path / "killed", gradients=fd.cluster_gradients(client), progress=progress)
    killer.join(timeout=60)
    assert dead.is_set() and victim not in client.nthreads()
    assert same_model(tmp_path / "calm", tmp_path / "killed", tol=0.0)    # same shards, same order: bit for bit
    assert_same_traces(tmp_path / "calm", tmp_path / "killed")
    assert same_model(tmp_path / "local", tmp_path / "killed")


def test_worker_dying_inside_a_shard_task_is_recomputed_elsewhere(tmp_path, monkeypatch, client):
    """Deterministic mid-round death: shard 1's task of the second round exits its worker process."""
    scn = scenario(*FLOAT64, "run.rounds=3")
    run_scenario(scn, tmp_path / "local")
    calls, marker = str(tmp_path / "calls"), str(tmp_path / "died")

    def dying_task(spec, weights, rows, sizes, depths):
        import os

        from fedsim.cluster.shards import shard_layer_sums

        if spec.shard == 1:
            with open(calls, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            with open(calls) as fh:
                second_round = len(fh.readlines()) == 2
            if second_round and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)                             # the worker process dies mid-task
        return shard_layer_sums(spec, weights, rows, sizes, depths)

    monkeypatch.setattr(fd.ShardedGradientEngine, "task", staticmethod(dying_task))
    client.wait_for_workers(2, timeout=60)
    run_scenario(scn, tmp_path / "dist", gradients=fd.cluster_gradients(client))
    assert os.path.exists(marker)
    pids = open(calls).read().split()
    assert len(pids) == 4 and pids[1] != pids[2]        # round 1 ran twice: on the dead worker, then elsewhere
    assert same_model(tmp_path / "local", tmp_path / "dist")
    assert_same_traces(tmp_path / "local", tmp_path / "dist")


# -- errors -----------------------------------------------------------------------------------------

def test_cluster_without_dask_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)      # `import distributed` now fails
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    for argv in (["run", str(path), "--cluster", "local:2", "--out", str(tmp_path / "run"), "--quiet"],
                 ["sweep", str(path), "--grid", "policy.name=salf,drop", "--cluster", "local:2",
                  "--out", str(tmp_path / "sweep"), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert 'pip install "fedsim[dask]"' in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args,words", [
    (["run", "--cluster", "local:0"], ["local:0", "positive integer"]),
    (["run", "--cluster", "local:two"], ["local:two", "positive integer"]),
    (["run", "--cluster", "local:2", "--set", "policy.name=heterofl"], ["heterofl", "without --cluster"]),
    (["run", "--cluster", "local:2", "--set", "policy.name=drop", "--set", "training.local_steps=2"],
     ["training.local_steps = 2"]),
    (["run", "--cluster", "tcp://127.0.0.1:9"], ["tcp://127.0.0.1:9", "cannot reach a Dask scheduler"]),
    (["sweep", "--grid", "policy.name=salf,drop", "--cluster", "local:2", "--jobs", "2"], ["--jobs", "--cluster"]),
    (["sweep", "--grid", "policy.name=salf,drop", "--cluster", "local:"], ["local:", "positive integer"]),
])
def test_bad_cluster_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.setattr(fc, "CONNECT_TIMEOUT_S", 1)
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    command, *rest = args
    assert main([command, str(path), *rest, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


def test_cluster_spec_parsing():
    assert fc.parse_cluster("local:3") == fc.ClusterSpec(local_workers=3)
    assert fc.parse_cluster("local").local_workers >= 1
    assert fc.parse_cluster("tcp://10.0.0.5:8786") == fc.ClusterSpec(address="tcp://10.0.0.5:8786")
    assert fc.parse_cluster("localhost:8786") == fc.ClusterSpec(address="localhost:8786")
    assert json.loads(json.dumps(fd.DISTRIBUTED_POLICIES)) == ["salf", "drop", "wait", "overselect"]
