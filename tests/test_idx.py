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
