"""The vectorised paths of large rounds against the per-row versions they replace: a round's device columns
equal its rows built one by one (every value, bit for bit), and batches sampled for many devices at once
equal `sample_batch` called device by device on the same stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fedsim.learn.data import Partition
from fedsim.output.trace import DeviceStatus
from fedsim.sim.device_round import DeviceOutcome, StopCause
from fedsim.sim.outcomes import RoundOutcomes
from fedsim.sim.records import device_columns, device_row
from conftest import REPO
from fedsim.spec.scenario import load_scenario


def _outcomes(rng: np.random.Generator, n: int) -> list[DeviceOutcome]:
    out = []
    for _ in range(n):
        o = DeviceOutcome(depth=int(rng.integers(0, 4)), layers_computed=int(rng.integers(0, 4)),
                          download_s=float(rng.exponential()), compute_s=float(rng.exponential() / 3),
                          upload_s=float(rng.exponential() * 7), active_until_at=float(rng.uniform(0, 2)))
        if rng.random() < 0.2:
            o.stopped = StopCause.OFFLINE
        out.append(o)
    return out


@pytest.mark.parametrize("n", [0, 1, 57])
def test_device_columns_equal_the_rows_built_one_by_one(n):
    classes = load_scenario(REPO / "scenarios" / "quickstart.toml").fleet.classes    # two classes, other powers
    rng = np.random.default_rng(n)
    devices = rng.integers(0, 10**6, n)
    class_index = rng.integers(0, len(classes), n)
    outcomes = _outcomes(rng, n)
    statuses = [DeviceStatus.NONFINITE if rng.random() < 0.1 else o.status(3) for o in outcomes]
    samples = rng.integers(1, 33, n)
    speed = rng.lognormal(16, 1, n) / rng.uniform(1, 3, n)
    end_at = 1.5
    idle = np.array([max(0.0, end_at - o.active_until_at) for o in outcomes])
    columns, total_j = device_columns(4, devices, class_index, classes, np.array([list(DeviceStatus).index(s)
                                                                                  for s in statuses], dtype=np.int64),
                                      samples, speed, RoundOutcomes.of(outcomes), idle)
    columns = {name: values.to_pylist() if isinstance(values, pa.Array) else np.asarray(values).tolist()
               for name, values in columns.items()}
    rows, expected_j = [], 0.0
    for i, o in enumerate(outcomes):
        row, energy_j = device_row(4, int(devices[i]), classes[class_index[i]], statuses[i], o.depth, int(samples[i]),
                                   float(speed[i]), o, max(0.0, end_at - o.active_until_at))
        rows.append(row)
        expected_j += energy_j
    assert list(columns) == list(device_row(0, 0, classes[0], DeviceStatus.NOTHING, 0, 1, 1.0, DeviceOutcome(),
                                            0.0)[0])
    assert [dict(zip(columns, values)) for values in zip(*columns.values())] == rows
    for column in columns.values():         # the same Python types as the rows (Arrow converts both alike)
        assert all(type(v) in (int, float, str) for v in column)
    assert total_j == expected_j           # summed device by device: the same float, not merely close


@pytest.mark.parametrize("n", [0, 1, 57])
def test_round_outcomes_read_as_the_device_outcomes_they_gather(n):
    rng = np.random.default_rng(100 + n)
    outcomes = _outcomes(rng, n)
    for o in outcomes:
        if rng.random() < 0.5:
            o.done_at = float(rng.choice([0.25, 0.5, 1.0]))     # ties: participant order breaks them
        elif rng.random() < 0.3:
            o.stopped = StopCause.QUORUM
    nonfinite = rng.random(n) < 0.1
    cols = RoundOutcomes.of(outcomes)
    cols.nonfinite[nonfinite] = True
    assert [list(DeviceStatus)[j] for j in cols.statuses(3)] == [DeviceStatus.NONFINITE if bad else o.status(3)
                                                                  for o, bad in zip(outcomes, nonfinite)]
    assert cols.done_order().tolist() == [i for _, i in sorted((o.done_at, i) for i, o in enumerate(outcomes)
                                                               if o.done_at is not None)]
    assert cols.any_cut() == any(o.done_at is None and o.stopped is None for o in outcomes)


def test_batches_of_many_devices_draw_what_sample_batch_draws_device_by_device():
    sizes = [0, 1, 5, 8, 9, 40, 3, 8]
    partition = Partition.from_lists([np.arange(s) + 100 * k for k, s in enumerate(sizes)])
    devices = np.array([7, 2, 5, 5, 0, 1, 3, 6, 4])
    for batch, steps in ((8, 1), (1, 3), (50, 2), (8, 0)):
        many = partition.sample_batches(devices, batch, steps, np.random.default_rng(3))
        rng = np.random.default_rng(3)
        one_by_one = [[partition.sample_batch(int(d), batch, rng) for _ in range(steps)] for d in devices]
        assert len(many) == len(one_by_one)
        for a, b in zip(many, one_by_one):
            assert len(a) == len(b) == steps and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(6))
def test_runs_of_devices_alike_are_shuffled_at_once_as_one_by_one(seed):
    # runs of consecutive devices holding the same number of samples (at most the batch) are drawn by one
    # `permuted` call; other devices, one by one; the stream must be the same and so must what follows it
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 3, 4, 12], size=30)
    partition = Partition.from_lists([np.arange(s) + 100 * k for k, s in enumerate(sizes)])
    devices = np.repeat(rng.permutation(30)[:12], rng.integers(1, 4, size=12))
    for batch, steps in ((4, 1), (4, 2), (12, 3), (1, 1)):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        many = partition.sample_batches(devices, batch, steps, a)
        one_by_one = [[partition.sample_batch(int(d), batch, b) for _ in range(steps)] for d in devices]
        assert [[x.tolist() for x in d] for d in many] == [[x.tolist() for x in d] for d in one_by_one]
        assert a.random() == b.random()            # the stream is left where the device-by-device draws leave it


def test_sample_batches_checks_its_arguments():
    from fedsim.errors import DataError

    partition = Partition.blocks(4, 3)
    with pytest.raises(DataError, match="device 4 out of range 0..3"):
        partition.sample_batches(np.array([0, 4]), 2, 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="batch_size"):
        partition.sample_batches(np.array([0]), 0, 1, np.random.default_rng(0))


def _synthetic_device(alpha, beta, key, device, spd, tpd, dim, classes):
    """One device's data as the module docstring defines it, drawn with a fresh Philox per stream, in float64,
    device by device (the oracle of the vectorised, chunked generator)."""
    def stream(part):
        return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, device, part]))

    first = stream(0)
    f = first.standard_normal(2 + classes + dim + classes * dim)
    u, shift = np.sqrt(alpha) * f[0], np.sqrt(beta) * f[1]
    b = f[2:2 + classes] + u
    v = f[2 + classes:2 + classes + dim] + shift
    w = f[2 + classes + dim:].reshape(classes, dim) + u
    x_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6
    out = []
    for gen, m in ((first, spd), (stream(1), tpd)):        # training inputs follow the function in stream 0
        x = v + gen.standard_normal((m, dim)) * x_std
        out += [x.astype(np.float32), np.array([int(np.argmax(w @ row + b)) for row in x], dtype=np.int64)]
    return out


@pytest.mark.parametrize("chunk_elements", [1, 5_000, 1 << 22])
@pytest.mark.parametrize("n, spd, tpd, dim, classes", [(37, 10, 1, 60, 10), (5, 3, 0, 7, 2), (64, 1, 4, 20, 30)])
def test_synthetic_data_equal_each_device_drawn_alone_from_its_own_streams(monkeypatch, chunk_elements, n, spd, tpd,
                                                                            dim, classes):
    import fedsim.learn.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_CHUNK_ELEMENTS", chunk_elements)     # one device per chunk, a few, or one
    dataset, partition = synthetic.make_synthetic(0.5, 0.7, n, spd, tpd, np.random.default_rng(11), dim=dim,
                                                  num_classes=classes, lazy=False)
    key = np.random.default_rng(11).integers(0, 2**64, size=2, dtype=np.uint64)
    devices = [_synthetic_device(0.5, 0.7, key, k, spd, tpd, dim, classes) for k in range(n)]
    expected = [np.concatenate([d[i] for d in devices]) for i in range(4)]
    got = (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)
    for g, e in zip(got, expected):
        assert g.numpy().dtype == e.dtype and np.array_equal(g.numpy(), e)
    assert partition.n_devices == n and np.array_equal(partition.device_indices(n - 1), np.arange((n - 1) * spd, n * spd))


def test_lazy_synthetic_rows_equal_the_whole_data_set_and_ignore_the_fleet_size():
    from fedsim.errors import DataError
    from fedsim.learn.rows import LazyRows, take_rows
    from fedsim.learn.synthetic import make_synthetic

    whole, _ = make_synthetic(0.5, 2.0, 50, 7, 3, np.random.default_rng(5), lazy=False)
    lazy, _ = make_synthetic(0.5, 2.0, 50, 7, 3, np.random.default_rng(5), lazy=True)
    larger, _ = make_synthetic(0.5, 2.0, 5_000_000, 7, 3, np.random.default_rng(5))   # lazy: 5M devices, no data held
    assert isinstance(lazy.x_train, LazyRows) and isinstance(larger.x_train, LazyRows)
    assert lazy.x_train.shape == (350, 60) and lazy.y_test.shape == (150,) and len(larger.y_train) == 35_000_000
    index = np.array([349, 0, 3, 3, 200, 7, 13, 349])          # repeated rows, several rows of one device, any order
    for data in (lazy, larger):
        x, y = take_rows(data.x_train, data.y_train, index)
        assert torch.equal(x, whole.x_train[index]) and torch.equal(y, whole.y_train[index])
        assert torch.equal(data.x_train[2:9], whole.x_train[2:9]) and torch.equal(data.y_test[index[1:4]], whole.y_test[index[1:4]])
        assert data.x_train.to(torch.float64)[index].dtype == torch.float64
    with pytest.raises(DataError, match=r"index out of range 0\.\.349"):
        lazy.x_train[np.array([350])]
    assert torch.equal(lazy.x_test.tensor(), whole.x_test) and torch.equal(lazy.y_test.tensor(), whole.y_test)
    assert torch.equal(lazy.y_train.tensor(), whole.y_train)


def test_a_worker_tells_lazy_synthetic_data_of_another_seed_apart():
    from fedsim.cluster.worker import data_digest
    from fedsim.learn.synthetic import make_synthetic

    def digest(seed, **kw):
        return data_digest(*make_synthetic(1.0, 1.0, 100, 10, 1, np.random.default_rng(seed), lazy=True, **kw))

    assert digest(3) == digest(3)
    assert len({digest(3), digest(4), digest(3, num_classes=5)}) == 3
    whole = data_digest(*make_synthetic(1.0, 1.0, 100, 10, 1, np.random.default_rng(3), lazy=False))
    assert whole != digest(3)             # held whole, the data themselves are hashed


@pytest.mark.parametrize("policy", ["salf", "partial", "fedasync"])
def test_a_run_on_synthetic_data_made_on_demand_equals_the_run_holding_them(monkeypatch, tmp_path, policy):
    """The gradient engine, the local trainer and the evaluation see the same rows whether the data are held whole
    or made on demand: every table and the model are the same."""
    import pyarrow.parquet as pq

    import fedsim.learn.synthetic as synthetic
    from fedsim.learn.rows import LazyRows
    from fedsim.run import run_scenario
    from fedsim.sim.build import load_data

    extra = ["policy.duration_s=0.6", "policy.eval_every_s=0.3"] if policy == "fedasync" else []
    runs = {}
    for lazy in (False, True):
        monkeypatch.setattr(synthetic, "EAGER_BYTES", 0 if lazy else 1 << 28)
        scn = load_scenario(REPO / "scenarios" / "quickstart.toml",
                            ["run.rounds=2", "run.eval_every=1", f"policy.name={policy}", *extra])
        assert isinstance(load_data(scn)[0].x_train, LazyRows) == lazy
        out = tmp_path / f"lazy={lazy}"
        run_scenario(scn, out)
        runs[lazy] = ({name: pq.read_table(out / f"{name}.parquet").replace_schema_metadata(None)
                       for name in ("events", "devices", "rounds")}, torch.load(out / "model.pt", weights_only=True))
    (tables, model), (lazy_tables, lazy_model) = runs[False], runs[True]
    for name, table in tables.items():
        assert table.equals(lazy_tables[name]), name
    assert tables["rounds"].column("test_accuracy").null_count < tables["rounds"].num_rows     # it evaluated
    assert model.keys() == lazy_model.keys() and all(torch.equal(model[k], lazy_model[k]) for k in model)


def test_lazy_rows_made_by_several_threads_at_once_are_the_same_rows():
    """Dask runs a worker's shard tasks in threads that share the run's data: each device is made whole."""
    from concurrent.futures import ThreadPoolExecutor

    from fedsim.learn.rows import take_rows
    from fedsim.learn.synthetic import make_synthetic

    whole, _ = make_synthetic(1.0, 1.0, 400, 10, 1, np.random.default_rng(8), lazy=False)
    lazy, _ = make_synthetic(1.0, 1.0, 400, 10, 1, np.random.default_rng(8), lazy=True)
    batches = [np.random.default_rng(i).choice(4000, 500, replace=False) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda idx: take_rows(lazy.x_train, lazy.y_train, idx), batches))
    for idx, (x, y) in zip(batches, got):
        assert torch.equal(x, whole.x_train[idx]) and torch.equal(y, whole.y_train[idx])


def test_the_data_interface_holds_the_synthetic_threshold_without_torch():
    from fedsim.learn import datasets, synthetic

    assert datasets.EAGER_BYTES == synthetic.EAGER_BYTES


def test_lazy_rows_take_a_boolean_mask_as_a_tensor_does_and_an_empty_index_on_a_fresh_thread():
    import threading

    from fedsim.learn.synthetic import make_synthetic

    whole, _ = make_synthetic(0.5, 1.0, 20, 3, 1, np.random.default_rng(8), lazy=False)
    lazy, _ = make_synthetic(0.5, 1.0, 20, 3, 1, np.random.default_rng(8), lazy=True)
    mask = whole.y_train < 5
    assert torch.equal(lazy.x_train[mask], whole.x_train[mask]) and len(lazy.x_train[mask]) == int(mask.sum())
    assert torch.equal(lazy.y_train[mask.numpy()], whole.y_train[mask])
    with pytest.raises(IndexError, match="boolean mask"):
        lazy.x_train[np.ones(5, dtype=bool)]
    got = []
    thread = threading.Thread(target=lambda: got.append(lazy.x_train[np.array([], dtype=np.int64)]))
    thread.start()
    thread.join()
    assert got and tuple(got[0].shape) == (0, 60)
