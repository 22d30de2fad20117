"""Data sets as plugins (fedsim.learn.datasets): a data set defined in a module outside fedsim, named by import
path or by an entry point, reads its own [data] fields, trains, and is partitioned by fedsim unless it brings
its own partition; every way it can be wrong ends in exit 2 naming the field and the value, before any output."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BASE_TOML, scenario, table
from fedsim.cli import main
from test_plugins import install

MODULE = "fedsim_test_blobs"

BLOBS = '''
    import sys
    from dataclasses import dataclass
    from pathlib import Path

    import numpy as np
    import torch

    from fedsim.errors import DataError
    from fedsim.learn.data import Dataset, Partition
    from fedsim.learn.datasets import DataSource


    @dataclass(frozen=True)
    class Blobs(DataSource):
        """Gaussian blobs in 6 dimensions, one centre per class."""
        classes: int = 3
        spread: float = 0.5

        @classmethod
        def read(cls, fields, base_dir):
            return cls(fields.integer("classes", 3, low=2, high=6),
                       fields.number("spread", 0.5, low=0.0, low_open=True))

        def load(self, request):
            n = request.n_devices * request.samples_per_device
            y = request.rng.integers(0, self.classes, 2 * n)
            x = 3.0 * np.eye(self.classes, 6)[y] + request.rng.normal(0.0, self.spread, (2 * n, 6))
            x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
            return Dataset(x[:n], y[:n], x[n:], y[n:], input_shape=(6,), num_classes=self.classes)


    @dataclass(frozen=True)
    class Striped(Blobs):
        """Blobs whose device k owns the samples k, k + n_devices, k + 2 n_devices, ..."""

        def partition(self, dataset, request, rng):
            n = len(dataset.y_train)
            return Partition.from_lists([np.arange(k, n, request.n_devices) for k in range(request.n_devices)])


    @dataclass(frozen=True)
    class Folder(Blobs):
        root: Path = Path(".")

        @classmethod
        def read(cls, fields, base_dir):
            return cls(root=fields.existing_path("root", base_dir, kind="dir", what="blobs folder"))


    class LoadRaises(Blobs):
        def load(self, request):
            raise RuntimeError("disk on fire")


    class LoadExits(Blobs):
        def load(self, request):
            sys.exit(7)


    class LoadDataError(Blobs):
        def load(self, request):
            raise DataError("/data/blobs.bin: truncated")


    class LoadNamesItsField(Blobs):
        def load(self, request):
            raise request.error("classes", f"{self.classes} classes need more memory than this machine has")


    class ReturnsInt(Blobs):
        def load(self, request):
            return 3


    class LabelsOutOfRange(Blobs):
        def load(self, request):
            d = super().load(request)
            return Dataset(d.x_train, d.y_train + 1, d.x_test, d.y_test, d.input_shape, d.num_classes)


    class IntInputs(Blobs):
        def load(self, request):
            d = super().load(request)
            return Dataset(d.x_train.long(), d.y_train, d.x_test, d.y_test, d.input_shape, d.num_classes)


    class WrongShape(Blobs):
        def load(self, request):
            d = super().load(request)
            return Dataset(d.x_train, d.y_train, d.x_test, d.y_test, (7,), d.num_classes)


    class EmptyTest(Blobs):
        def load(self, request):
            d = super().load(request)
            return Dataset(d.x_train, d.y_train, d.x_test[:0], d.y_test[:0], d.input_shape, d.num_classes)


    class FewDevices(Blobs):
        def partition(self, dataset, request, rng):
            return Partition.blocks(request.n_devices - 1, request.samples_per_device)


    class Huge(Blobs):
        def memory_bytes(self, n_devices, samples_per_device):
            return np.int64(n_devices) * 2**40


    class SaysNothing(Blobs):
        def memory_bytes(self, n_devices, samples_per_device):
            return "a lot"


    class ReadRaises(Blobs):
        @classmethod
        def read(cls, fields, base_dir):
            raise KeyError("colour")


    class ReadReturnsWrong(Blobs):
        @classmethod
        def read(cls, fields, base_dir):
            return 3


    class Incomplete(DataSource):
        @classmethod
        def read(cls, fields, base_dir):
            return cls()


    class NotADataSource:
        pass


    not_a_class = 42
'''


@pytest.fixture
def blobs(tmp_path, monkeypatch):
    """The module on sys.path, and a package registering two of its data sets as entry points."""
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{MODULE}.py").write_text(textwrap.dedent(BLOBS))
    (site / "fedsim_test_blobs_broken.py").write_text("import fedsim_no_such_dependency_xyz\n")
    install(site, "fedsim_test_blobs_dist", {"fedsim.datasets": {"blobs": f"{MODULE}:Blobs",
                                                                 "striped": f"{MODULE}:Striped"}})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith(MODULE):
            del sys.modules[name]


def _text(name: str, extra: str = "") -> str:
    return BASE_TOML.replace('name = "synthetic"\nsamples_per_device = 40\ntest_samples_per_device = 10',
                             f'name = "{name}"\nsamples_per_device = 40\n{extra}')


def test_a_dataset_plugin_trains(blobs):
    path = blobs / "s.toml"
    path.write_text(_text(f"{MODULE}:Blobs", "classes = 4\nspread = 0.3"))
    assert main(["run", str(path), "--out", str(blobs / "out"), "--quiet", "--set", "run.rounds=4"]) == 0
    rounds = table(blobs / "out", "rounds")
    assert rounds["round"] == [0, 1, 2, 3]
    accuracy = [a for a in rounds["test_accuracy"] if a is not None]
    assert len(accuracy) == 4 and accuracy[-1] > 0.5        # four well-separated blobs


def test_fedsim_partitions_a_plugin_dataset_from_the_partition_stream(blobs):
    from fedsim.learn.data import partition_dirichlet, partition_iid
    from fedsim.seeds import component_rng
    from fedsim.sim.build import build_components

    for partition in ("iid", "dirichlet"):
        scn = scenario(text=_text(f"{MODULE}:Blobs", f'partition = "{partition}"\ndirichlet_alpha = 0.3'))
        comp = build_components(scn)
        assert scn.data.loader.classes == 3 and comp.dataset.num_classes == 3
        labels = comp.dataset.y_train.numpy()
        rng = component_rng(3, "partition")
        want = (partition_iid(len(labels), 8, 40, rng) if partition == "iid"
                else partition_dirichlet(labels, 8, 40, 0.3, 3, rng))
        np.testing.assert_array_equal(comp.partition.indices, want.indices)
        again = build_components(scn)                         # the data come from the seed only
        assert torch.equal(again.dataset.x_train, comp.dataset.x_train)


def test_a_dataset_may_bring_its_own_partition(blobs):
    from fedsim.sim.build import build_components

    comp = build_components(scenario(text=_text(f"{MODULE}:Striped")))
    np.testing.assert_array_equal(comp.partition.device_indices(2), np.arange(2, 320, 8))


def test_registered_names(blobs, capsys):
    from fedsim.sim.build import build_components

    comp = build_components(scenario(text=_text("striped")))
    np.testing.assert_array_equal(comp.partition.device_indices(1), np.arange(1, 320, 8))
    path = blobs / "s.toml"
    path.write_text(_text("blobs", "classes = 5"))
    assert main(["validate", str(path)]) == 0
    assert "data      blobs, iid, 40 samples/device" in capsys.readouterr().out
    assert main(["validate", str(path), "--set", 'data.name="blob"']) == 2
    err = capsys.readouterr().err
    assert "did you mean 'blobs'?" in err and "'striped' (package 'fedsim_test_blobs_dist')" in err


def test_the_plugins_own_fields_are_checked_and_unknown_ones_refused(blobs, capsys):
    path = blobs / "s.toml"
    path.write_text(_text(f"{MODULE}:Blobs"))
    for override, words in [("data.classes=9", ["data.classes", "at most 6", "9"]),
                            ("data.spread=0", ["data.spread", "> 0"]),
                            ("data.colour=1", ["data.colour", "unknown field", "classes", "spread"]),
                            ("data.clases=1", ["data.clases", "unknown field; did you mean data.classes?"])]:
        assert main(["validate", str(path), "--set", override]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    # a field another data set reads (mnist's dir) is named in a notice, so --set data.name=... switches
    assert main(["validate", str(path), "--set", "data.dir='x'"]) == 0
    assert f"notice    {MODULE}:Blobs ignores data.dir" in capsys.readouterr().out


def test_path_fields_are_made_absolute_for_cluster_workers(blobs):
    from fedsim.cluster.worker import portable

    (blobs / "folder").mkdir()
    scn = scenario(text=_text(f"{MODULE}:Folder", 'root = "folder"'))
    assert scn.data.loader.root == Path("folder")
    moved = portable(scn)
    assert moved.data.loader.root == (blobs / "folder").resolve() and moved.data.loader.classes == 3
    synthetic = scenario()
    assert portable(synthetic).data.loader == synthetic.data.loader


M = MODULE
BAD = [
    # (data.name, words of the message besides the field and the value)
    ("fedsim_no_such_module_xyz:Blobs", ["cannot import module 'fedsim_no_such_module_xyz'"]),
    ("fedsim_test_blobs_broken:Blobs", ["importing module 'fedsim_test_blobs_broken'",
                                        "No module named 'fedsim_no_such_dependency_xyz'"]),
    (f"{M}:Missing", [f"module '{M}' has no attribute 'Missing'"]),
    (f"{M}:NotADataSource", ["is not a subclass of fedsim.learn.datasets.DataSource",
                             f"the class {M}.NotADataSource"]),
    (f"{M}:not_a_class", ["is not a subclass of fedsim.learn.datasets.DataSource", "got int"]),
    (f"{M}:a:b", ["import path must read 'package.module:Name'"]),
    ("cifar", ["unknown data set", "'mnist', 'synthetic' (built in)", "'blobs' (package"]),
    (f"{M}:ReadRaises", ["reading its fields", "raised KeyError: 'colour'"]),
    (f"{M}:ReadReturnsWrong", ["ReadReturnsWrong.read must return a ReadReturnsWrong, got int"]),
    (f"{M}:Incomplete", ["raised TypeError", "abstract"]),
    (f"{M}:LoadRaises", ["raised RuntimeError: disk on fire"]),
    (f"{M}:LoadExits", ["called sys.exit(7)"]),
    (f"{M}:LoadDataError", ["/data/blobs.bin: truncated"]),
    (f"{M}:ReturnsInt", ["load must return a fedsim.learn.data.Dataset, got int"]),
    (f"{M}:LabelsOutOfRange", ["train labels in 1..3; expected 0..2 (3 classes)"]),
    (f"{M}:IntInputs", ["x_train of dtype torch.int64", "floating-point"]),
    (f"{M}:WrongShape", ["x_train of shape [320, 6]; expected (N, 7)"]),
    (f"{M}:EmptyTest", ["an empty test set"]),
    (f"{M}:FewDevices", ["partition of 7 devices; the fleet has 8"]),
    (f"{M}:SaysNothing", ["memory_bytes must return a number of bytes, got str"]),
]


@pytest.mark.parametrize("name, words", BAD, ids=[b[0] for b in BAD])
def test_bad_dataset_plugins_exit_2_before_any_output(blobs, capsys, name, words):
    path = blobs / "s.toml"
    path.write_text(_text(name))
    out = blobs / "out"
    code = main(["run", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedsim: error: {path}: data.name: ") and repr(name) in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_a_plugins_memory_estimate_is_checked(blobs, capsys):
    path = blobs / "s.toml"
    path.write_text(_text(f"{M}:Huge"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.samples_per_device" in err and "8 devices x 40 samples would need 8192 GiB" in err, err


def test_a_plugin_may_name_its_own_field(blobs, capsys):
    path = blobs / "s.toml"
    path.write_text(_text(f"{M}:LoadNamesItsField", "classes = 5"))
    assert main(["run", str(path), "--out", str(blobs / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"fedsim: error: {path}: data.classes: 5 classes need more memory than this machine has\n"
    assert not (blobs / "out").exists()


def test_the_builtin_datasets_are_plugins_of_the_same_interface():
    from fedsim.learn.synthetic import make_synthetic
    from fedsim.learn.datasets import DataSource, Mnist, Synthetic
    from fedsim.seeds import component_rng
    from fedsim.sim.build import build_components

    assert issubclass(Mnist, DataSource) and issubclass(Synthetic, DataSource)
    scn = scenario("data.synthetic_beta=0.5")
    assert scn.data.loader == Synthetic(alpha=1.0, beta=0.5, test_samples_per_device=10)
    comp = build_components(scn)
    dataset, partition = make_synthetic(1.0, 0.5, 8, 40, 10, component_rng(3, "data"))
    assert torch.equal(comp.dataset.x_train, dataset.x_train) and torch.equal(comp.dataset.y_test, dataset.y_test)
    np.testing.assert_array_equal(comp.partition.indices, partition.indices)
    np.testing.assert_array_equal(comp.partition.offsets, partition.offsets)


def test_switching_between_the_builtin_datasets_keeps_the_others_fields(tmp_path):
    """--set data.name=... works on a scenario written for the other built-in data set."""
    (tmp_path / "mnist").mkdir()
    scn = scenario('data.name="mnist"', f'data.dir="{tmp_path / "mnist"}"')
    assert scn.data.loader.dir == tmp_path / "mnist"
    text = _text("mnist", f'dir = "{tmp_path / "mnist"}"')
    assert scenario('data.name="synthetic"', text=text).data.loader.test_samples_per_device == 20
