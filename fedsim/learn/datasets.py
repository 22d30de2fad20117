"""Data sets: the interface behind `data.name`, and the two built-in data sets (MNIST, FedProx synthetic).

A data set is a subclass of `DataSource`. A scenario names it by a built-in name ("mnist", "synthetic"), by
a name an installed package registers in the entry-point group `fedsim.datasets`, or by its import path
"package.module:Name" (see fedsim.spec.plugins). A new data set is one module and no edit inside fedsim:

    @dataclass(frozen=True)
    class Blobs(DataSource):
        classes: int

        @classmethod
        def read(cls, fields, base_dir):
            return cls(fields.integer("classes", 3, low=2))

        def load(self, request):
            n = request.n_devices * request.samples_per_device
            y = request.rng.integers(0, self.classes, 2 * n)
            x = request.rng.normal(y[:, None], 1.0, (2 * n, 2)).astype("float32")
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            return Dataset(x[:n], y[:n], x[n:], y[n:], input_shape=(2,), num_classes=self.classes)

and in the scenario `[data] name = "mypackage.blobs:Blobs"`, `classes = 4`, `samples_per_device = 50`.

The contract:

* `read(fields, base_dir)`, a classmethod, runs when the scenario is read. It reads the data set's own
  fields of the `[data]` table through `fields` (a `fedsim.spec.fields.Fields` view: typed readers whose
  errors name the field and the value; a key nobody reads is refused as unknown), `base_dir` being the
  scenario file's folder (for `fields.existing_path`), and returns an instance: a frozen, picklable
  config (a Dask worker gets a copy; the `Path` fields of a dataclass are made absolute for it). fedsim
  reads `name`, `partition`, `dirichlet_alpha` and `samples_per_device` itself. A key that another built-in
  data set reads (`dir`, `synthetic_alpha`, ...; each declares them in `reads`) is named in a notice
  ("synthetic ignores data.dir"), so `--set data.name=...` switches data sets.
* `load(request)` runs when a run is built and returns the `fedsim.learn.data.Dataset`: floating-point
  inputs of shape (N, *input_shape), int64 labels in 0..num_classes-1, non-empty training and test sets
  (tensors, or `fedsim.learn.rows.LazyRows` for a set made on demand, whose labels are then not checked).
  `request` (a `DataRequest`) gives the number of devices, the samples per device, the run's data stream
  `request.rng` (the only randomness a data set may use: the same seed gives the same data) and
  `request.error(key, message)`, the ScenarioError for field `data.<key>`. Anything else `load` raises
  becomes a ScenarioError on `data.name`: exit 2, before any output exists.
* `partition(dataset, request, rng)`, optional: the data set's own `Partition` of the training samples
  across the devices. The default, None, has fedsim partition them by `data.partition` (iid, or Dirichlet
  label skew) from the partition stream `rng`.
* `memory_bytes(n_devices, samples_per_device)`, optional: the memory the data will take, checked
  against the 8 GiB limit when the scenario is read (the default counts the partition's indices).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar
from pathlib import Path

import numpy as np

from fedsim.errors import DataError, ScenarioError, ScenarioFileError
from fedsim.spec.fields import Fields, printable, show_key

if TYPE_CHECKING:       # torch and the data module are imported when data are loaded, not when a scenario is read
    from fedsim.learn.data import Dataset, Partition

__all__ = ["DataRequest", "DataSource", "Mnist", "Synthetic", "check_dataset", "check_partition",
           "MAX_SYNTHETIC_VARIANCE"]

# fedsim.learn.synthetic.EAGER_BYTES, here without importing torch (the memory check runs when a scenario is
# read); tests/test_scale.py checks that the two agree
EAGER_BYTES = 1 << 28

MAX_SYNTHETIC_VARIANCE = 1e6   # data.synthetic_alpha and _beta: beyond, the generated inputs are not usable numbers


@dataclass(frozen=True)
class DataRequest:
    """What fedsim asks of a data set when a run is built."""
    source: str                  # the scenario file, for messages
    n_devices: int
    samples_per_device: int
    rng: np.random.Generator     # the run's data stream (fedsim.seeds: "data")

    def error(self, key: str, message: str) -> ScenarioError:
        """The error to raise for field `data.<key>` of the scenario."""
        return ScenarioError(self.source, f"data.{show_key(key)}", message)


class DataSource(ABC):
    """Base class of every data set (see the module docstring for the contract)."""

    reads: ClassVar[frozenset[str]] = frozenset()     # the [data] fields `read` may read
    @classmethod
    @abstractmethod
    def read(cls, fields: Fields, base_dir: Path | None) -> "DataSource":
        """The data set's config, from its own fields of the `[data]` table."""

    @abstractmethod
    def load(self, request: DataRequest) -> Dataset:
        """The training and test sets."""

    def partition(self, dataset: Dataset, request: DataRequest, rng: np.random.Generator) -> Partition | None:
        """The data set's own partition across devices; None: fedsim partitions by `data.partition`."""
        return None

    def memory_bytes(self, n_devices: int, samples_per_device: int) -> int:
        """Memory the data will need: by default, the partition's int64 sample indices."""
        return n_devices * samples_per_device * 8


@dataclass(frozen=True)
class Mnist(DataSource):
    """MNIST from the four standard IDX files (raw or .gz) in `data.dir`."""
    reads: ClassVar[frozenset[str]] = frozenset({"dir"})
    dir: Path

    @classmethod
    def read(cls, fields: Fields, base_dir: Path | None) -> "Mnist":
        return cls(fields.existing_path("dir", base_dir, kind="dir", what="dataset directory"))

    def load(self, request: DataRequest) -> Dataset:
        from fedsim.learn.data import load_mnist

        try:
            return load_mnist(self.dir)
        except DataError as exc:
            raise ScenarioFileError(request.source, "data.dir", printable(str(exc))) from None


@dataclass(frozen=True)
class Synthetic(DataSource):
    """FedProx synthetic(alpha, beta), every device from its own stream of the run's data stream; device k owns its
    own samples. Held whole when it takes at most EAGER_BYTES, else made on demand (`fedsim.learn.synthetic`)."""
    alpha: float = 1.0
    beta: float = 1.0
    test_samples_per_device: int = 20
    reads: ClassVar[frozenset[str]] = frozenset({"synthetic_alpha", "synthetic_beta", "test_samples_per_device"})

    @classmethod
    def read(cls, fields: Fields, base_dir: Path | None) -> "Synthetic":
        return cls(fields.number("synthetic_alpha", 1.0, low=0.0, high=MAX_SYNTHETIC_VARIANCE),
                   fields.number("synthetic_beta", 1.0, low=0.0, high=MAX_SYNTHETIC_VARIANCE),
                   fields.integer("test_samples_per_device", 20, low=1, high=1_000_000))

    def load(self, request: DataRequest) -> Dataset:
        from fedsim.learn.synthetic import make_synthetic

        try:
            dataset, _ = make_synthetic(self.alpha, self.beta, request.n_devices, request.samples_per_device,
                                        self.test_samples_per_device, request.rng)
        except DataError as exc:
            raise request.error("synthetic_beta" if "beta" in str(exc) else "name", str(exc)) from None
        return dataset

    def partition(self, dataset: Dataset, request: DataRequest, rng: np.random.Generator) -> Partition:
        from fedsim.learn.data import Partition

        return Partition.blocks(request.n_devices, request.samples_per_device)

    def memory_bytes(self, n_devices: int, samples_per_device: int) -> int:
        """Both sets held whole, or, when that is more than EAGER_BYTES, the test set (training rows are made
        on demand then); and the partition's indices."""
        row_bytes = 60 * 4 + 8
        whole = n_devices * (samples_per_device + self.test_samples_per_device) * row_bytes
        held = whole if whole <= EAGER_BYTES else n_devices * self.test_samples_per_device * row_bytes
        return held + super().memory_bytes(n_devices, samples_per_device)


def check_dataset(dataset: object) -> str | None:
    """What is wrong with what a data set's `load` returned, or None."""
    import torch

    from fedsim.learn.data import Dataset
    from fedsim.learn.rows import LazyRows

    if not isinstance(dataset, Dataset):
        return f"must return a fedsim.learn.data.Dataset, got {type(dataset).__name__}"
    shape = dataset.input_shape
    if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) and d >= 1 for d in shape)):
        return f"returned input_shape {shape!r}; expected a tuple of positive ints"
    classes = dataset.num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        return f"returned num_classes {classes!r}; expected a positive int"
    for part in ("train", "test"):
        x, y = getattr(dataset, f"x_{part}"), getattr(dataset, f"y_{part}")
        lazy = isinstance(x, LazyRows) and isinstance(y, LazyRows)     # made on demand: the labels are not read
        if not lazy and (not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor)):
            return f"returned x_{part} and y_{part} of types {type(x).__name__}, {type(y).__name__}; expected tensors"
        if not x.is_floating_point():
            return f"returned x_{part} of dtype {x.dtype}; expected floating-point inputs"
        if tuple(x.shape[1:]) != shape:
            return f"returned x_{part} of shape {list(x.shape)}; expected (N, {', '.join(map(str, shape))})"
        if y.dtype != torch.int64 or y.dim() != 1:
            return (f"returned y_{part} of dtype {y.dtype} and shape {list(y.shape)}; expected int64 labels of "
                    "shape (N,)")
        if len(x) != len(y):
            return f"returned {len(x)} {part} inputs but {len(y)} labels"
        if len(y) == 0:
            return f"returned an empty {'training' if part == 'train' else 'test'} set"
        if lazy:
            continue
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            return f"returned {part} labels in {low}..{high}; expected 0..{classes - 1} ({classes} classes)"
    return None


def check_partition(partition: object, n_devices: int, n_samples: int) -> str | None:
    """What is wrong with a data set's own partition, or None."""
    from fedsim.learn.data import Partition

    if not isinstance(partition, Partition):
        return f"must return a fedsim.learn.data.Partition or None, got {type(partition).__name__}"
    if partition.n_devices != n_devices:
        return f"returned a partition of {partition.n_devices} devices; the fleet has {n_devices}"
    if partition.indices.size and int(partition.indices.max()) >= n_samples:
        return (f"returned a partition naming sample {int(partition.indices.max())}; the training set has "
                f"{n_samples} samples")
    if np.any(partition.sizes() == 0):
        return f"returned a partition in which device {int(np.flatnonzero(partition.sizes() == 0)[0])} owns no sample"
    return None
