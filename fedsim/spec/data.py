"""The `[data]` table: fedsim reads the partition fields, the data set named by `data.name` reads its own.

`data.name` is a built-in data set ("mnist", "synthetic"), a name an installed package registers in the
entry-point group `fedsim.datasets`, or an import path "package.module:Name" (fedsim.spec.plugins). It names
a subclass of `fedsim.learn.datasets.DataSource` (the interface is described there), imported when named:
the spec layer knows where a data set lives, not what it is.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.errors import ScenarioError
from fedsim.spec.fields import Fields
from fedsim.spec.plugins import call_plugin, load_plugin

__all__ = ["DATASET_GROUP", "DATASET_PATHS", "DataSpec", "MAX_DATA_BYTES", "check_data_memory", "read_data"]

DATASET_GROUP = "fedsim.datasets"
DATASET_PATHS: dict[str, str] = {
    "mnist": "fedsim.learn.datasets:Mnist",
    "synthetic": "fedsim.learn.datasets:Synthetic",
}
_INTERFACE = "fedsim.learn.datasets:DataSource"

MAX_DATA_BYTES = 8 * 2**30


@dataclass(frozen=True)
class DataSpec:
    name: str                        # as written: a built-in name, a registered name or an import path
    loader: Any                      # the data set with its own fields: a fedsim.learn.datasets.DataSource
    partition: str                   # "iid" or "dirichlet" (unless the data set partitions itself)
    dirichlet_alpha: float
    samples_per_device: int
    ignored: tuple[str, ...] = ()    # [data] fields given that this data set does not read (see Scenario.notices)


def _imported(path: str) -> Any:
    """The object at "package.module:Name" (a built-in of this module, imported when first needed)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _is_data_source(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, _imported(_INTERFACE))


def read_data(f: Fields, base_dir: Path | None) -> DataSpec:
    name = f.string("name")
    source_class = load_plugin(name, group=DATASET_GROUP, builtins=DATASET_PATHS, source=f.source,
                               field=f.field("name"), kind="data set", check=_is_data_source,
                               expected=f"a subclass of {_INTERFACE.replace(':', '.')}")
    reads = getattr(source_class, "reads", frozenset())
    self_partitioned = _partitions_itself(source_class)
    partition = f.choice("partition", ["iid", "dirichlet"], "iid")
    dirichlet_alpha = f.number("dirichlet_alpha", 0.5, low=0.0, low_open=True)
    samples_per_device = f.integer("samples_per_device", low=1, high=10_000_000)
    loader = call_plugin(source_class.read, f, base_dir, source=f.source, field=f.field("name"),
                         label=f"data set {name!r}, reading its fields,")
    if not isinstance(loader, source_class):
        raise f.error("name", f"data set {name!r}: {source_class.__qualname__}.read must return a "
                              f"{source_class.__qualname__}, got {type(loader).__name__}")
    ignored = f.ignored_or_unknown(
        reads | set(_OWN_FIELDS), lambda: frozenset().union(_OWN_FIELDS, *(_builtin_reads(n) for n in DATASET_PATHS)),
        f"data set {name!r}")
    if self_partitioned:     # validated all the same, but a data set that partitions itself has no use for them
        ignored = tuple(sorted(ignored + tuple(f.field(k) for k in ("partition", "dirichlet_alpha") if f.has(k))))
    return DataSpec(name, loader, partition, dirichlet_alpha, samples_per_device, ignored)


_OWN_FIELDS = ("name", "partition", "dirichlet_alpha", "samples_per_device")


def _builtin_reads(name: str) -> frozenset[str]:
    return _imported(DATASET_PATHS[name]).reads


def _partitions_itself(source_class: type) -> bool:
    return source_class.partition is not _imported(_INTERFACE).partition


def check_data_memory(source: str, data: DataSpec, n_devices: int) -> None:
    """Refuse sizes that could only end in an out-of-memory crash, before anything is allocated."""
    need = call_plugin(data.loader.memory_bytes, n_devices, data.samples_per_device, source=source,
                       field="data.name", label=f"data set {data.name!r}, estimating its memory,")
    if isinstance(need, bool) or not isinstance(need, numbers.Real):
        raise ScenarioError(source, "data.name", f"data set {data.name!r}: memory_bytes must return a number of "
                                                 f"bytes, got {type(need).__name__}")
    if need > MAX_DATA_BYTES:
        raise ScenarioError(source, "data.samples_per_device",
                            f"{n_devices} devices x {data.samples_per_device} samples would need "
                            f"{need / 2**30:.0f} GiB (limit {MAX_DATA_BYTES // 2**30} GiB)")
