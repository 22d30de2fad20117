"""Tests of fedsim.learn.data: IDX/MNIST loading and its failure modes, synthetic data, partitions."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.learn.synthetic import make_synthetic
from fedsim.learn.data import (Dataset, Partition, load_mnist, partition_dirichlet,
                         partition_iid, read_idx)
from fedsim.errors import DataError

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"]


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist_like(directory: Path, compress: bool, n_train: int = 7, n_test: int = 3,
                     seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)]
    for name, array in zip(NAMES, arrays):
        payload = idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not available: {MNIST_DIR} does not exist")
    return load_mnist(MNIST_DIR)


# ------------------------------------------------------------------------------------------ MNIST


def test_real_mnist_loads(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    counts = np.bincount(mnist.y_train.numpy(), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(float(mnist.x_train.mean())) < 0.01
    assert abs(float(mnist.x_train.std()) - 1.0) < 0.05


def test_raw_and_gzipped_idx_load_identically(tmp_path):
    write_mnist_like(tmp_path / "raw", compress=False)
    write_mnist_like(tmp_path / "gz", compress=True)
    raw, gz = load_mnist(tmp_path / "raw"), load_mnist(tmp_path / "gz")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(raw, field), getattr(gz, field))
    assert raw.x_train.shape == (7, 1, 28, 28) and raw.y_test.shape == (3,)
    pixels = read_idx(tmp_path / "raw" / NAMES[0])
    assert pixels.dtype == np.uint8
    expected = ((pixels.astype(np.float64) / 255 - 0.1307) / 0.3081).astype(np.float32)
    np.testing.assert_array_equal(raw.x_train.numpy()[:, 0], expected)


def test_gzip_detected_by_content_not_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain.bin").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.bin"), array)


# -------------------------------------------------------------------------------- corrupt inputs

GOOD = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))


def huge_header(dims=(2**31, 2**31, 1)) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + b"\0" * 100


CORRUPT = {
    "truncated_payload_raw": (GOOD[:-7], "truncated"),
    "truncated_payload_gz": (gzip.compress(GOOD[:-7]), "truncated"),
    "trailing_data_raw": (GOOD + b"\0", "trailing data"),
    "trailing_data_gz": (gzip.compress(GOOD + b"\0"), "trailing data"),
    "truncated_gzip_stream": (gzip.compress(GOOD)[:-12], "gzip"),
    "bad_crc_gzip": (gzip.compress(GOOD)[:-8] + b"\0" * 8, "gzip"),
    "wrong_magic": (b"\x00\x00\x09\x99" + GOOD[4:], "bad magic number 0x00000999"),
    "nonzero_magic_prefix": (b"\x12\x34" + GOOD[2:], "bad magic number 0x1234"),
    "huge_dims_raw": (huge_header(), "truncated"),
    "huge_dims_gz": (gzip.compress(huge_header()), "data bytes"),
    "wrong_dtype_code": (bytes([0, 0, 0x0D, 3]) + GOOD[4:], "type code 0x0d (float32) is not supported"),
    "zero_dims": (bytes([0, 0, 8, 0]), "0 dimensions"),
    "header_cut_in_dims": (GOOD[:9], "truncated"),
    "short_header": (b"\0\0", "truncated"),
    "empty": (b"", "empty file"),
    "empty_gzip_stream": (gzip.compress(b""), "empty file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_idx_raises_data_error_naming_file(tmp_path, case):
    content, fragment = CORRUPT[case]
    path = tmp_path / f"{case}-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert path.name in str(info.value)
    assert fragment in str(info.value)


def test_truncated_message_gives_both_sizes(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(GOOD[:-10]))
    with pytest.raises(DataError, match=r"t\.gz: truncated: header says 60 data bytes \(3x4x5\), "
                                        r"decompressed stream has 50"):
        read_idx(path)


def test_lying_gzip_header_does_not_allocate_what_it_claims(tmp_path):
    path = tmp_path / "liar.gz"
    path.write_bytes(gzip.compress(huge_header((2**20, 2**10)) + b"\0" * 1000))  # claims 1 GiB
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated"):
            read_idx(path)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 64 * 2**20


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(DataError, match="nope-idx1-ubyte: file not found"):
        read_idx(tmp_path / "nope-idx1-ubyte")
    with pytest.raises(DataError, match=str(tmp_path.name)):
        read_idx(tmp_path)


def test_mnist_directory_missing(tmp_path):
    with pytest.raises(DataError, match="absent.*train-images-idx3-ubyte"):
        load_mnist(tmp_path / "absent")


def test_mnist_directory_missing_one_file(tmp_path):
    write_mnist_like(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "missing MNIST file(s) t10k-labels-idx1-ubyte" in message
    assert all(name in message for name in NAMES)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist_like(tmp_path, compress=False)
    (tmp_path / NAMES[1]).write_bytes(idx_bytes(np.zeros(6, dtype=np.uint8)))
    with pytest.raises(DataError, match=f"{NAMES[1]}: 6 labels but {NAMES[0]} has 7 images"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    write_mnist_like(tmp_path, compress=False)
    (tmp_path / NAMES[3]).write_bytes(idx_bytes(np.array([1, 11, 2], dtype=np.uint8)))
    with pytest.raises(DataError, match=f"{NAMES[3]}: label 11 out of range"):
        load_mnist(tmp_path)


def test_mnist_wrong_image_shape(tmp_path):
    write_mnist_like(tmp_path, compress=False)
    (tmp_path / NAMES[2]).write_bytes(idx_bytes(np.zeros((3, 28, 27), dtype=np.uint8)))
    with pytest.raises(DataError, match=f"{NAMES[2]}: expected images of shape"):
        load_mnist(tmp_path)


# database=None: the example database would litter the repository with a .hypothesis folder.
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(compress=st.booleans(),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_mutated_idx_loads_or_raises_data_error(tmp_path, compress, edits, cut):
    content = bytearray(gzip.compress(GOOD, mtime=0) if compress else GOOD)
    for position, value in edits:
        content[position % len(content)] = value
    if cut is not None:
        content = content[: cut % (len(content) + 1)]
    path = tmp_path / "mutated-idx3-ubyte"
    path.write_bytes(bytes(content))
    try:
        array = read_idx(path)
    except DataError as err:
        assert path.name in str(err)
    else:
        assert array.dtype == np.uint8 and array.size == int(np.prod(array.shape))


# ------------------------------------------------------------------------------------ partitions


def test_partition_iid_disjoint_when_enough_samples():
    part = partition_iid(1000, 10, 100, np.random.default_rng(0))
    assert part.n_devices == 10 and part.sizes().tolist() == [100] * 10
    assert np.unique(part.indices).size == 1000 and part.indices.min() >= 0 and part.indices.max() < 1000


@pytest.mark.parametrize("n_samples,samples_per_device", [(1000, 50), (120, 100), (100, 100)])
def test_partition_iid_overlapping_devices_have_distinct_indices(n_samples, samples_per_device):
    part = partition_iid(n_samples, 300, samples_per_device, np.random.default_rng(1))
    assert part.sizes().tolist() == [samples_per_device] * 300
    for k in range(part.n_devices):
        own = part.device_indices(k)
        assert np.unique(own).size == samples_per_device and own.min() >= 0 and own.max() < n_samples


def test_partition_iid_100k_devices():
    part = partition_iid(60000, 100_000, 100, np.random.default_rng(2))
    assert part.n_devices == 100_000 and part.indices.size == 10_000_000
    sorted_rows = np.sort(part.indices.reshape(100_000, 100), axis=1)
    assert not np.any(sorted_rows[:, 1:] == sorted_rows[:, :-1])
    # Every sample should be used about 10_000_000 / 60_000 ~ 167 times.
    uses = np.bincount(part.indices, minlength=60000)
    assert uses.min() > 90 and uses.max() < 260


def labels_fixture(n_per_class: int = 500, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(3).permutation(np.repeat(np.arange(num_classes), n_per_class))


def class_shares(part: Partition, labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    return np.stack([np.bincount(labels[part.device_indices(k)], minlength=num_classes)
                     for k in range(part.n_devices)]) / part.sizes()[:, None]


def test_partition_dirichlet_small_alpha_concentrates_labels():
    labels = labels_fixture()
    part = partition_dirichlet(labels, 200, 100, 0.01, 10, np.random.default_rng(4))
    assert part.sizes().tolist() == [100] * 200
    assert np.mean(class_shares(part, labels).max(axis=1) > 0.9) > 0.8
    for k in range(part.n_devices):  # 100 <= 500 samples per class, so no repeats are needed
        assert np.unique(part.device_indices(k)).size == 100


def test_partition_dirichlet_large_alpha_is_near_uniform():
    labels = labels_fixture()
    part = partition_dirichlet(labels, 200, 200, 1000.0, 10, np.random.default_rng(5))
    shares = class_shares(part, labels)
    assert shares.max() < 0.25 and shares.min() > 0.0
    assert abs(shares.mean() - 0.1) < 1e-9


def test_partition_dirichlet_small_class_falls_back_to_replacement():
    labels = np.array([0] * 5 + [1] * 1000)
    part = partition_dirichlet(labels, 50, 40, 0.01, 2, np.random.default_rng(6))
    assert part.sizes().tolist() == [40] * 50
    heavy_zero = [k for k in range(50) if np.sum(labels[part.device_indices(k)] == 0) > 5]
    assert heavy_zero, "some device should want more class-0 samples than exist"
    assert set(part.device_indices(heavy_zero[0])) <= set(range(1005))


def test_partition_dirichlet_ignores_absent_classes():
    labels = np.array([0, 2, 2, 0, 2] * 20)
    part = partition_dirichlet(labels, 20, 10, 1.0, 4, np.random.default_rng(7))
    assert set(np.unique(labels[part.indices])) <= {0, 2}


@pytest.mark.parametrize("make", [
    lambda rng: partition_iid(500, 20, 10, rng),
    lambda rng: partition_iid(100, 50, 30, rng),
    lambda rng: partition_dirichlet(labels_fixture(50), 30, 20, 0.5, 10, rng),
])
def test_partitions_deterministic_given_seed(make):
    a, b = make(np.random.default_rng(8)), make(np.random.default_rng(8))
    c = make(np.random.default_rng(9))
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_partition_dirichlet_10k_devices_on_real_labels(mnist):
    labels = mnist.y_train.numpy()
    part = partition_dirichlet(labels, 10_000, 200, 0.3, 10, np.random.default_rng(10))
    assert part.indices.size == 2_000_000 and part.indices.max() < labels.size


def test_sample_batch():
    part = Partition.from_lists([np.arange(10, 30), np.array([5, 7, 9]), np.array([], dtype=np.int64)])
    rng = np.random.default_rng(11)
    batch = part.sample_batch(0, 8, rng)
    assert batch.size == 8 and np.unique(batch).size == 8 and set(batch) <= set(range(10, 30))
    small = part.sample_batch(1, 8, rng)
    assert sorted(small.tolist()) == [5, 7, 9]
    assert part.sample_batch(2, 4, rng).size == 0
    seen = {tuple(part.sample_batch(1, 8, rng)) for _ in range(50)}
    assert len(seen) > 1, "a short device's samples should come back in a random order"
    with pytest.raises(DataError, match="batch_size"):
        part.sample_batch(0, 0, rng)
    with pytest.raises(DataError, match="device 3 out of range"):
        part.sample_batch(3, 1, rng)


def test_partition_structure_and_validation():
    part = Partition.from_lists([np.array([3, 1]), np.array([], dtype=np.int32), np.array([4])])
    assert part.n_devices == 3 and part.sizes().tolist() == [2, 0, 1]
    assert part.offsets.dtype == np.int64 and part.indices.dtype == np.int64
    view = part.device_indices(0)
    assert view.tolist() == [3, 1] and np.shares_memory(view, part.indices)
    with pytest.raises(ValueError):  # numpy's own read-only error: the partition cannot be mutated
        view[0] = 99
    for offsets, indices in [([0, 2, 1], [1, 2]), ([1, 2], [1]), ([0, 3], [1, 2]), ([0, 1], [-1])]:
        with pytest.raises(DataError, match="Partition"):
            Partition(np.array(offsets), np.array(indices))
    with pytest.raises(DataError, match="device 1"):
        Partition.from_lists([np.array([1]), np.array([0.5])])


@pytest.mark.parametrize("call,name", [
    (lambda rng: partition_iid(0, 5, 1, rng), "n_samples"),
    (lambda rng: partition_iid(10, 0, 1, rng), "n_devices"),
    (lambda rng: partition_iid(10, 5, 11, rng), "samples_per_device"),
    (lambda rng: partition_iid(10, 5, 2.5, rng), "samples_per_device"),
    (lambda rng: partition_dirichlet(np.arange(5) % 2, 5, 3, 0.0, 2, rng), "alpha"),
    (lambda rng: partition_dirichlet(np.arange(5) % 2, 5, 3, float("nan"), 2, rng), "alpha"),
    (lambda rng: partition_dirichlet(np.arange(5) % 3, 5, 3, 1.0, 2, rng), "labels"),
    (lambda rng: partition_dirichlet(np.array([]), 5, 3, 1.0, 2, rng), "labels"),
    (lambda rng: make_synthetic(-1, 1, 5, 5, 5, rng), "alpha"),
    (lambda rng: make_synthetic(1, float("inf"), 5, 5, 5, rng), "beta"),
    (lambda rng: make_synthetic(1, 1, 0, 5, 5, rng), "n_devices"),
    (lambda rng: make_synthetic(1, 1, 5, 5, -1, rng), "test_samples_per_device"),
    (lambda rng: make_synthetic(1, 1, 5, 5, 5, rng, num_classes=1), "num_classes"),
])
def test_bad_arguments_raise_data_error_naming_them(call, name):
    with pytest.raises(DataError, match=name):
        call(np.random.default_rng(0))


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_partition():
    data, part = make_synthetic(1.0, 1.0, 100, 500, 50, np.random.default_rng(12))
    assert data.x_train.shape == (50_000, 60) and data.y_train.shape == (50_000,)
    assert data.x_test.shape == (5_000, 60) and data.y_test.shape == (5_000,)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.input_shape == (60,) and data.num_classes == 10
    assert int(data.y_train.min()) >= 0 and int(data.y_train.max()) < 10
    assert part.n_devices == 100 and part.device_indices(3).tolist() == list(range(1500, 2000))
    small, _ = make_synthetic(0.5, 0.5, 4, 3, 0, np.random.default_rng(0), dim=5, num_classes=3)
    assert small.x_train.shape == (12, 5) and small.x_test.shape == (0, 5) and small.y_train.max() < 3


def test_synthetic_deterministic_and_sensitive_to_beta():
    def make(alpha, beta, seed):
        return make_synthetic(alpha, beta, 10, 50, 10, np.random.default_rng(seed))[0]

    a, b = make(1, 1, 13), make(1, 1, 13)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x_train, make(1, 1, 14).x_train)
    other_beta = make(1, 0.5, 13)
    assert not torch.equal(a.x_train, other_beta.x_train)
    assert not torch.equal(a.y_train, other_beta.y_train)


def test_synthetic_alpha_is_inert_as_in_the_paper():
    # u_k adds u_k * (sum(x) + 1) to every logit alike, so argmax, hence the data, ignores alpha.
    a = make_synthetic(0.0, 1.0, 10, 50, 10, np.random.default_rng(17))[0]
    b = make_synthetic(25.0, 1.0, 10, 50, 10, np.random.default_rng(17))[0]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)


def test_synthetic_beta_spreads_device_input_means():
    def device_mean_spread(beta):
        data, _ = make_synthetic(0.0, beta, 200, 100, 0, np.random.default_rng(15))
        return float(data.x_train.reshape(200, 100, 60).mean(dim=(1, 2)).std())

    # Device means are B_k + mean of 60 N(0, 1) entries: spread ~ sqrt(beta + 1/60).
    assert device_mean_spread(0.0) < 0.2 and 2.0 < device_mean_spread(9.0) < 4.0


def test_synthetic_devices_are_non_iid():
    data, part = make_synthetic(1.0, 1.0, 30, 200, 0, np.random.default_rng(16))
    shares = class_shares(part, data.y_train.numpy())
    total_variation = 0.5 * np.abs(shares[:, None] - shares[None]).sum(axis=-1)
    # Pooled iid devices of 200 samples would be ~0.1 apart; FedProx devices are far more.
    assert total_variation[np.triu_indices(30, 1)].mean() > 0.5
