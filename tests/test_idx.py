"""MNIST read without torch (fedsim.learn.idx): in the background while torch is imported, as in place."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.errors import DataError
from fedsim.learn import idx
from fedsim.learn.data import load_mnist
from conftest import REPO
from test_data import NAMES, idx_bytes, write_mnist_like


def test_mnist_read_in_the_background_is_the_mnist_read_in_place(tmp_path):
    write_mnist_like(tmp_path / "gz", compress=True, seed=3)
    in_place = load_mnist(tmp_path / "gz")
    idx.prefetch_mnist(tmp_path / "gz")
    idx.prefetch_mnist(tmp_path / "gz")             # asked twice: the newer read is the one kept
    assert len(idx._pending) == 1
    ahead = load_mnist(tmp_path / "gz" / ".." / "gz")       # the same directory, named otherwise
    assert not idx._pending                             # taken once
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(ahead, field), getattr(in_place, field))
    # files changed after the background read: the loader reads them anew
    idx.prefetch_mnist(tmp_path / "gz")
    idx._pending[(tmp_path / "gz").resolve()].result()
    write_mnist_like(tmp_path / "gz", compress=True, seed=4, n_train=5)
    assert load_mnist(tmp_path / "gz").x_train.shape[0] == 5
    # a bad file: the background read's error is the loader's, word for word
    (tmp_path / "gz" / f"{NAMES[1]}.gz").write_bytes(gzip.compress(idx_bytes(np.arange(4))))
    with pytest.raises(DataError) as in_place_error:
        load_mnist(tmp_path / "gz")
    idx.prefetch_mnist(tmp_path / "gz")
    with pytest.raises(DataError) as ahead_error:
        load_mnist(tmp_path / "gz")
    assert str(ahead_error.value) == str(in_place_error.value) and "4 labels but" in str(ahead_error.value)


def test_commands_start_reading_mnist_before_importing_torch(tmp_path):
    """`fedsim validate` (and `fedsim run`, through the same `_prefetch`) starts the data set's read before torch
    is imported, so that the two overlap."""
    write_mnist_like(tmp_path / "mnist", compress=True)
    probe = ("import sys, threading; from fedsim.cli.main import main; import fedsim.learn.idx as idx; "
             "original = idx.prefetch_mnist\n"
             "def spy(d):\n    print('torch imported at prefetch:', 'torch' in sys.modules); original(d)\n"
             "idx.prefetch_mnist = spy\n"
             "sys.exit(main(['validate', 'scenarios/paper_mnist_mlp.toml', "
             f"'--set', 'data.dir=\"{tmp_path / 'mnist'}\"',"
             " '--set', 'fleet.participants=2', '--set', 'fleet.classes[0].count=4']))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=False)
    assert "torch imported at prefetch: False" in out.stdout, out.stderr[-2000:]


def test_one_background_read_is_kept_at_a_time(tmp_path):
    write_mnist_like(tmp_path / "a", compress=True, seed=1)
    write_mnist_like(tmp_path / "b", compress=True, seed=2)
    idx.prefetch_mnist(tmp_path / "a")
    idx.prefetch_mnist(tmp_path / "b")                  # replaces the read of a
    assert list(idx._pending) == [(tmp_path / "b").resolve()]
    load_mnist(tmp_path / "a")                          # any load drops what was read ahead
    assert not idx._pending


def test_a_data_set_plugin_whose_prefetch_fails_is_an_error_on_data_name(tmp_path, capsys):
    from fedsim.cli.main import main

    plugin = tmp_path / "failing_data.py"
    plugin.write_text("from dataclasses import dataclass\nfrom fedsim.learn.datasets import Synthetic\n\n"
                      "@dataclass(frozen=True)\nclass Failing(Synthetic):\n"
                      "    def prefetch(self):\n        raise OSError('disk gone')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["validate", str(REPO / "scenarios" / "quickstart.toml"),
                     "--set", 'data.name="failing_data:Failing"'])
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 2
    err = capsys.readouterr().err
    assert "data.name" in err and "disk gone" in err and "Traceback" not in err
