"""MNIST read without torch (fedsim.learn.idx): the arrays `load_mnist` wraps as tensors."""

from __future__ import annotations

import sys

import numpy as np
import torch

from fedsim.learn import idx
from fedsim.learn.data import load_mnist
from test_data import write_mnist_like


def test_mnist_arrays_are_the_tensors_of_load_mnist(tmp_path):
    write_mnist_like(tmp_path / "gz", compress=True, seed=3)
    arrays = idx.mnist_arrays(tmp_path / "gz")
    data = load_mnist(tmp_path / "gz")
    for array, tensor in zip(arrays, (data.x_train, data.y_train, data.x_test, data.y_test)):
        assert isinstance(array, np.ndarray) and torch.equal(torch.from_numpy(array), tensor)
    assert arrays[0].dtype == np.float32 and arrays[0].shape == (7, 1, 28, 28) and arrays[1].dtype == np.int64


def test_reading_idx_files_imports_no_torch():
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import sys, fedsim.learn.idx; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pixels_are_normalised_as_each_byte_alone_in_float64():
    """Two pixels per table look-up, in chunks: every pair of bytes, odd lengths and chunk edges give what one
    pixel at a time gives, (b / 255 - 0.1307) / 0.3081 in float64 rounded once to float32."""
    naive = np.array([np.float32((b / 255.0 - 0.1307) / 0.3081) for b in range(256)], dtype=np.float32)
    every_pair = np.arange(65536, dtype=np.uint16).view(np.uint8)
    for pixels in (every_pair, every_pair[1:], every_pair[:7], np.zeros(0, np.uint8),
                   np.random.default_rng(2).integers(0, 256, (5, 28, 28)).astype(np.uint8)):
        got = idx._normalised(pixels)
        assert got.dtype == np.float32 and got.shape == pixels.shape
        np.testing.assert_array_equal(got, naive[pixels])


def test_normalising_in_chunks_equals_one_chunk(monkeypatch):
    pixels = np.random.default_rng(3).integers(0, 256, 1001).astype(np.uint8)
    whole = idx._normalised(pixels)
    monkeypatch.setattr(idx, "_NORMALISE_CHUNK", 7)
    np.testing.assert_array_equal(idx._normalised(pixels), whole)
