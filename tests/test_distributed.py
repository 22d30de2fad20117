"""`--cluster` on Dask: sweeps as cluster tasks, sharded gradients of one run, worker deaths, clear errors.

The tests share one LocalCluster of 2 single-thread worker processes (starting one and importing torch in
its workers costs seconds); command-line tests reach it by its scheduler address, as on a real cluster.
Worker deaths are provoked by hooks in the worker-side functions (a task that ends its own process at a
chosen point), or by SIGKILL from the driver at a chosen point of the run, never by timing. A killed worker
is restarted by its nanny (a few seconds: it imports torch again), so the cluster stays usable whatever the
order; the four fault tests are spread over the file so that those restarts overlap tests that need no
second worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("distributed", reason='Dask is not installed (pip install "fedsim[dask]"): --cluster untested')

from conftest import BASE_TOML, scenario                          # noqa: E402
from fedsim.cluster import limits                                 # noqa: E402
from fedsim.cluster import session as fc                          # noqa: E402
from fedsim.cluster import shards as fd                           # noqa: E402
from fedsim.cluster import worker as fw                           # noqa: E402
from fedsim.sim.build import build_components                     # noqa: E402
from fedsim.cli import main                                       # noqa: E402
from fedsim.learn.grads import GradientEngine                     # noqa: E402
from fedsim.run import run_scenario                               # noqa: E402

FLOAT64 = ('model.dtype="float64"',)
TRACES = ("events", "devices", "rounds")
MODEL_COLUMNS = ("train_loss", "test_loss", "test_accuracy")      # depend on the model: equal to rounding
SHARD = 3      # devices per shard here: the test fleet's 8 devices make up to 3 shards a round


@pytest.fixture(scope="module")
def client():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fd, "DEVICES_PER_SHARD", SHARD)
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


def assert_identical_files(a_dir, b_dir):
    """Byte for byte: the three traces and the final model."""
    for name in (*(f"{t}.parquet" for t in TRACES), "model.pt"):
        assert (a_dir / name).read_bytes() == (b_dir / name).read_bytes(), name


def local_and_distributed(tmp_path, cluster, *overrides):
    scn = scenario(*FLOAT64, *overrides)
    run_scenario(scn, tmp_path / "local")
    run_scenario(scn, tmp_path / "dist", gradients=fd.cluster_gradients(cluster))
    return tmp_path / "local", tmp_path / "dist"


# -- faults: the undisturbed run, worker deaths at chosen points -----------------------------------

FAULT_SCENARIO = (*FLOAT64, "run.rounds=4")


@pytest.fixture(scope="module")
def calm(tmp_path_factory, client):
    """The fault tests' run on the cluster, undisturbed: what every disturbed run must equal, byte for byte."""
    out = tmp_path_factory.mktemp("calm")
    run_scenario(scenario(*FAULT_SCENARIO), out, gradients=fd.cluster_gradients(client))
    return out


def dies_once(real, marker: str, match=None, counter: str | None = None, nth: int = 1):
    """`real`, as a worker runs it, except that one call ends its worker process first: the `nth` call for
    which `match(*args)` holds (counted in the file `counter`), or the first such call if no counter.
    The marker file, created atomically, makes it happen once whichever worker gets there."""
    def hook(*args):
        import os

        if match is None or match(*args):
            if counter is not None:
                with open(counter, "a") as fh:
                    fh.write(f"{os.getpid()}\n")
                with open(counter) as fh:
                    if len(fh.readlines()) != nth:
                        return real(*args)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real(*args)
            os._exit(1)                         # the worker process dies here, mid-task
        return real(*args)
    return hook


def run_with_a_death(tmp_path, client, calm, progress=None):
    """The fault scenario on the cluster, with both workers up at the start; its files must be the
    undisturbed run's, byte for byte, and the death must have happened."""
    client.wait_for_workers(2, timeout=60)
    start = time.monotonic()
    run_scenario(scenario(*FAULT_SCENARIO), tmp_path / "run", gradients=fd.cluster_gradients(client),
                 progress=progress)
    elapsed = time.monotonic() - start
    assert (tmp_path / "died").exists(), "the worker death did not happen"
    assert_identical_files(calm, tmp_path / "run")
    assert elapsed < 60
    return elapsed


def test_a_worker_killed_while_building_the_data_changes_nothing(tmp_path, monkeypatch, client, calm):
    """Before round 0: the first worker to build the run's data dies doing it."""
    hook = dies_once(fw.load_run, str(tmp_path / "died"))
    monkeypatch.setattr(fd.ShardedGradientEngine, "load", staticmethod(hook))
    print(f"\nkilled while building the data: identical, {run_with_a_death(tmp_path, client, calm):.1f} s")


# -- sweeps (the local half runs while the worker killed above restarts) ---------------------------

def test_sweep_on_cluster_equals_local_sweep_and_resumes(tmp_path, capsys, client):
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    argv = ["sweep", str(path), "--grid", "policy.name=salf,drop", "--set", "run.rounds=3",
            "--target-accuracy", "0.3", "--quiet"]
    address = client.scheduler.address
    assert main([*argv, "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    assert main([*argv, "--cluster", address, "--out", str(tmp_path / "dask")]) == 0
    assert "2 runs: 0 already done, 2 completed now, 0 failed" in capsys.readouterr().out

    local, dask = tmp_path / "local", tmp_path / "dask"
    index = pq.read_table(local / "index.parquet")
    assert pq.read_table(dask / "index.parquet").equals(index, check_metadata=True)
    assert index.column("status").to_pylist() == ["completed"] * 2
    # the same Hive layout on the cluster: runs/KEY=VALUE/seed=S/
    assert index.column("run_dir").to_pylist() == ["runs/policy.name=salf/seed=3", "runs/policy.name=drop/seed=3"]
    assert all((dask / d / "status.json").is_file() for d in index.column("run_dir").to_pylist())
    assert (dask / "sweep.json").read_text() == (local / "sweep.json").read_text()
    assert (dask / "partitioning.parquet").read_bytes() == (local / "partitioning.parquet").read_bytes()
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
    assert "2 runs: 1 already done, 1 completed now, 0 failed" in capsys.readouterr().out
    assert pq.read_table(dask / "index.parquet").equals(index, check_metadata=True)
    assert pq.read_table(dask / gone / "rounds.parquet").equals(pq.read_table(local / gone / "rounds.parquet"))


# -- fault: a death inside a shard task (then tests without cluster work, while the worker restarts) 

def test_a_worker_killed_inside_a_shard_task_changes_nothing(tmp_path, monkeypatch, client, calm):
    """Shard 1's task of the second round ends its worker process mid-task: another worker computes it."""
    monkeypatch.setattr(fd.ShardedGradientEngine, "task", staticmethod(dies_once(
        fw.shard_layer_sums, str(tmp_path / "died"), match=lambda spec, shard, *rest: shard == 1,
        counter=str(tmp_path / "calls"), nth=2)))
    print(f"\nkilled inside a shard task: identical, {run_with_a_death(tmp_path, client, calm):.1f} s")


# -- errors that need no cluster work --------------------------------------------------------------

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
    monkeypatch.setattr(limits, "CONNECT_TIMEOUT_S", 1)
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


def test_a_cluster_without_workers_fails_before_writing(tmp_path, monkeypatch):
    import logging

    from distributed import Client, LocalCluster

    monkeypatch.setattr(limits, "WORKER_WAIT_S", 0.5)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0", silence_logs=logging.CRITICAL) as empty, \
            Client(empty) as c:
        with pytest.raises(fc.ClusterError, match="before round 0: no Dask worker after 0.5 s") as info:
            run_scenario(scenario(), tmp_path / "run", gradients=fd.cluster_gradients(c))
        assert str(info.value).startswith(f"--cluster {c.scheduler.address}: ")
    assert not (tmp_path / "run").exists()


def test_local_workers_that_do_not_start_in_time_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(limits, "START_TIMEOUT_S", 0)
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    start = time.monotonic()
    assert main(["run", str(path), "--cluster", "local:1", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "local:1 (tcp://" in err and "0 of 1 Dask workers started within 0 s" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - start < 3 * limits.CLOSE_TIMEOUT_S


# -- one run, sharded gradients --------------------------------------------------------------------

def test_sharded_layer_sums_equal_the_single_process_engine_and_the_same_shards_here(client):
    scn = scenario(*FLOAT64, "fleet.classes[0].count=7", "fleet.classes[1].count=6")
    comp = build_components(scn)
    local = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train)
    engine = fd.ShardedGradientEngine(client, scn, comp.model, comp.profile, comp.partition, comp.dataset,
                                      devices_per_shard=4)
    spec = fw.RunSpec("in-process", scn, fw.data_digest(comp.dataset, comp.partition))
    weights = fw.Weights(comp.model.state_dict(), True)
    try:
        assert engine.devices_per_shard == 4 and engine.layer_of_param == local.layer_of_param
        rng = np.random.default_rng(0)
        n_layers = comp.profile.n_layers
        devices = rng.permutation(13)[:11]
        batches = [comp.partition.sample_batch(int(d), int(rng.integers(1, 9)), rng) for d in devices]
        cases = [(d, None) for d in (rng.integers(0, n_layers + 1, 11), np.zeros(11, dtype=np.int64),
                                     np.full(11, n_layers))]
        cases.append((rng.integers(0, n_layers + 1, 11), rng.uniform(1.0, 9.0, 11)))   # weighted devices
        for depths, w in cases:
            engine.begin_round(devices)
            want, got = local.layer_sums(batches, depths, w), engine.layer_sums(batches, depths, w)
            assert sorted(got.sums) == sorted(want.sums)
            for name in want.sums:
                torch.testing.assert_close(got.sums[name], want.sums[name], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(got.counts, want.counts)
            assert got.n_devices == want.n_devices
            assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-12)
            # the same shards computed in this process (one torch thread, like a worker), added in the same
            # order: bit for bit what the cluster returned, so the cluster adds no rounding of its own
            live = np.flatnonzero(depths)
            here = None
            for k, i in enumerate(range(0, len(live), 4)):
                members = live[i:i + 4]
                part = fw.shard_layer_sums(spec, k, weights, np.concatenate([batches[j] for j in members]),
                                           np.array([len(batches[j]) for j in members]), depths[members],
                                           None if w is None else w[members])
                here = fw.add_sums(here, part)
            if here is not None:
                assert all(torch.equal(got.sums[name], here.sums[name]) for name in here.sums)
                assert got.loss_sum == here.loss_sum
    finally:
        fw.forget_run("in-process")
        engine.close()


def test_a_run_is_byte_identical_on_any_number_of_workers(tmp_path, client):
    """Shards are fixed by size, not by the cluster: the shared cluster's 2 worker processes, 1 worker and 3
    workers (threads of this process, one torch thread each) write the same bytes, in float32."""
    import logging

    from distributed import Client, LocalCluster

    scn = scenario("run.rounds=4", "policy.name=wait")
    run_scenario(scn, tmp_path / "two", gradients=fd.cluster_gradients(client))
    for workers in (1, 3):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=":0",
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster) as other:
            run_scenario(scn, tmp_path / f"{workers}", gradients=fd.cluster_gradients(other))
        assert_identical_files(tmp_path / "two", tmp_path / f"{workers}")


@pytest.mark.parametrize("overrides", [
    ("policy.name=salf", "policy.aggregation=unbiased"),
    ("policy.name=drop",),
    ("policy.name=overselect", "fleet.participants=4"),
    ("policy.name=salf", "policy.batch_scaling=true"),
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
    run_scenario(scn, tmp_path / "straight", gradients=fd.cluster_gradients(client))

    def stop(done, sim_s, acc):
        if done == 3:
            raise KeyboardInterrupt          # after the checkpoint of round 2

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scn, tmp_path / "resumed", stop, checkpoint_every=2)
    assert main(["run", "--resume", str(tmp_path / "resumed"), "--cluster", client.scheduler.address, "--quiet"]) == 0
    assert same_model(tmp_path / "straight", tmp_path / "resumed")
    assert_same_traces(tmp_path / "straight", tmp_path / "resumed")


def test_a_stuck_cluster_fails_the_run_cleanly_within_the_bound(tmp_path, capsys, monkeypatch, client):
    """No task finishing for the stall timeout: one line naming the cluster and the round, exit 2, the run
    directory marked failed."""
    release = str(tmp_path / "release")

    def stuck_task(spec, shard, *rest):
        import os
        import time

        from fedsim.cluster.worker import shard_layer_sums

        give_up = time.monotonic() + 60
        while shard == 1 and not os.path.exists(release) and time.monotonic() < give_up:
            time.sleep(0.02)                   # the worker stays stuck until the test releases it
        return shard_layer_sums(spec, shard, *rest)

    monkeypatch.setattr(limits, "TASK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(fd.ShardedGradientEngine, "task", staticmethod(stuck_task))
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    address = client.scheduler.address
    start = time.monotonic()
    try:
        code = main(["run", str(path), "--set", "run.rounds=3", "--out", str(tmp_path / "run"),
                     "--cluster", address, "--quiet"])
    finally:
        open(release, "w").close()
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedsim: error: --cluster {address}: round 0: no gradient shard task finished in "), err
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    print(f"\nstuck shard task: exit 2 after {elapsed:.1f} s")
    assert elapsed < 30


# -- fault: a death while receiving a model (then in-process tests, while the worker restarts) -----

def test_a_worker_killed_while_receiving_a_model_changes_nothing(tmp_path, monkeypatch, client, calm):
    """The worker that receives the second round's model (the task holding it) dies doing it: the scheduler
    sends the model again, to another worker."""
    monkeypatch.setattr(fd.ShardedGradientEngine, "receive", staticmethod(dies_once(
        fw.hold, str(tmp_path / "died"), match=lambda value: isinstance(value, fw.Weights),
        counter=str(tmp_path / "calls"), nth=2)))
    print(f"\nkilled while receiving a model: identical, {run_with_a_death(tmp_path, client, calm):.1f} s")


def test_a_shard_task_in_many_passes_equals_one_engine_call(monkeypatch):
    """The worker function alone, in this process: every device in a pass of its own."""
    scn = scenario(*FLOAT64)
    comp = build_components(scn)
    n_devices, n_layers = comp.partition.n_devices, comp.profile.n_layers
    spec = fw.RunSpec("in-process", scn, fw.data_digest(comp.dataset, comp.partition))
    rng = np.random.default_rng(1)
    batches = [comp.partition.sample_batch(d, int(rng.integers(2, 9)), rng) for d in range(n_devices)]
    depths = rng.integers(1, n_layers + 1, n_devices)
    rows = np.concatenate(batches)
    sizes = np.array([len(b) for b in batches])
    weights = fw.Weights(comp.model.state_dict(), True)
    monkeypatch.setattr(fw, "_PASS_FWD_FLOPS", 1.0)
    try:
        got = fw.shard_layer_sums(spec, 0, weights, rows, sizes, depths)
    finally:
        fw.forget_run("in-process")
    want = GradientEngine(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train).layer_sums(batches, depths)
    assert sorted(got.sums) == sorted(want.sums)
    for name in want.sums:
        torch.testing.assert_close(got.sums[name], want.sums[name], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert (got.n_devices, got.loss_sum) == (want.n_devices, pytest.approx(want.loss_sum, rel=1e-12))


# -- fault: a death between rounds (last: the killed worker restarts as the cluster closes) --------

def test_a_worker_killed_between_rounds_changes_nothing(tmp_path, client, calm):
    """SIGKILL from here once round 1 is done, without waiting for the scheduler to notice."""
    client.wait_for_workers(2, timeout=60)
    pid = max(client.run(os.getpid, callback_timeout=30).values())

    def progress(done, sim_s, acc):
        if done == 2:
            os.kill(pid, signal.SIGKILL)
            (tmp_path / "died").touch()

    print(f"\nkilled between rounds: identical, {run_with_a_death(tmp_path, client, calm, progress):.1f} s")
