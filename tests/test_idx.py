"""MNIST read without torch (fedsim.learn.idx), gzip inflated in one call, and the images held as bytes
(fedsim.learn.byte_images): the rows a round gathers are the numbers of the whole set converted at once."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

from fedsim.errors import DataError
from fedsim.learn import idx
from fedsim.learn.byte_images import ByteImages
from fedsim.learn.data import load_mnist
from fedsim.learn.rows import TEST, TRAIN, LazyRows, full_tensor, take_rows
from test_data import MNIST_DIR, idx_bytes, write_mnist_like


def test_mnist_arrays_are_the_tensors_of_load_mnist(tmp_path):
    write_mnist_like(tmp_path / "gz", compress=True, seed=3)
    arrays = idx.mnist_arrays(tmp_path / "gz")
    data = load_mnist(tmp_path / "gz")
    for array, tensor in zip(arrays, (data.x_train, data.y_train, data.x_test, data.y_test)):
        assert isinstance(array, np.ndarray) and torch.equal(torch.from_numpy(array), full_tensor(tensor))
    assert arrays[0].dtype == np.float32 and arrays[0].shape == (7, 1, 28, 28) and arrays[1].dtype == np.int64


def naive_inputs(pixels: np.ndarray) -> np.ndarray:
    """The oracle: each pixel normalised in float64 with MNIST's mean and std, rounded once to float32."""
    out = np.empty((len(pixels), 1, *pixels.shape[1:]), dtype=np.float32)
    for i, image in enumerate(pixels.astype(np.float64)):
        out[i, 0] = ((image / 255.0 - 0.1307) / 0.3081).astype(np.float32)
    return out


def test_gathered_rows_are_the_whole_set_converted_at_once(tmp_path):
    write_mnist_like(tmp_path, compress=False, n_train=40, n_test=9, seed=5)
    data = load_mnist(tmp_path)
    assert isinstance(data.x_train, LazyRows) and isinstance(data.y_train, torch.Tensor)
    pixels = {TRAIN: idx.read_idx(tmp_path / "train-images-idx3-ubyte"),
              TEST: idx.read_idx(tmp_path / "t10k-images-idx3-ubyte")}
    rng = np.random.default_rng(0)
    for part, x, y in ((TRAIN, data.x_train, data.y_train), (TEST, data.x_test, data.y_test)):
        expected = naive_inputs(pixels[part])
        for _ in range(5):
            index = rng.integers(0, len(expected), size=int(rng.integers(1, 30)))
            xs, ys = take_rows(x, y, index)
            assert xs.dtype == torch.float32 and tuple(xs.shape) == (len(index), 1, 28, 28)
            np.testing.assert_array_equal(xs.numpy(), expected[index])
            assert torch.equal(ys, y[torch.from_numpy(index)])
        np.testing.assert_array_equal(full_tensor(x).numpy(), expected)
        xs, _ = take_rows(x, y, np.array([3, 0, 3]))             # after the set was made whole: the same rows
        np.testing.assert_array_equal(xs.numpy(), expected[[3, 0, 3]])


def test_a_float64_model_gets_the_float32_values_widened(tmp_path):
    write_mnist_like(tmp_path, compress=False, seed=6)
    data = load_mnist(tmp_path)
    x64 = data.x_train.to(torch.float64)
    rows = x64[np.array([1, 2])]
    assert rows.dtype == torch.float64
    assert torch.equal(rows, full_tensor(data.x_train)[[1, 2]].double())


def test_describe_names_every_byte(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    labels = np.arange(4)

    def source(p):
        return ByteImages({TRAIN: p, TEST: p[:2]}, {TRAIN: labels, TEST: labels[:2]}, idx.MNIST_PIXEL_VALUES, "m")

    changed = pixels.copy()
    changed[3, 27, 27] ^= 1
    assert source(pixels).describe() == source(pixels.copy()).describe()
    assert source(pixels).describe() != source(changed).describe()
    with pytest.raises(ValueError, match="256"):
        ByteImages({TRAIN: pixels, TEST: pixels}, {TRAIN: labels, TEST: labels}, np.zeros(255), "m")


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="real MNIST not available")
def test_real_mnist_bytes_match_the_gzip_module():
    path = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    expected = np.frombuffer(gzip.decompress(path.read_bytes())[16:], dtype=np.uint8).reshape(-1, 28, 28)
    np.testing.assert_array_equal(idx.read_idx(path), expected)


def test_concatenated_gzip_members_read_as_one_file(tmp_path):
    array = np.arange(600, dtype=np.uint8).reshape(6, 10, 10)
    payload = idx_bytes(array)
    path = tmp_path / "members.gz"
    path.write_bytes(gzip.compress(payload[:5]) + gzip.compress(payload[5:300]) + gzip.compress(payload[300:]))
    np.testing.assert_array_equal(idx.read_idx(path), array)
    path.write_bytes(gzip.compress(payload) + b"not gzip")
    with pytest.raises(DataError, match="members.gz: corrupt gzip stream"):
        idx.read_idx(path)


def test_reading_idx_files_imports_no_torch():
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import sys, fedsim.learn.idx; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
