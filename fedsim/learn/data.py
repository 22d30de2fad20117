"""Datasets (MNIST from IDX files: `fedsim.learn.idx`; FedProx synthetic: `fedsim.learn.synthetic`) and their
partition across devices.

Every bad file or argument raises `DataError` naming the file or parameter, so the CLI can report it in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.errors import DataError
from fedsim.learn.idx import mnist_arrays, read_idx

__all__ = ["Dataset", "Partition", "read_idx", "load_mnist", "partition_iid", "partition_dirichlet"]

# Bounds the temporaries of the vectorised partition draws to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 22


# eq=False: the generated __eq__ would compare tensors elementwise and fail on truth-testing.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Training and test sets; a set too large to hold may be `fedsim.learn.rows.LazyRows`, made on demand."""
    x_train: torch.Tensor  # float32, shape (N, *input_shape)
    y_train: torch.Tensor  # int64, shape (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int


class Partition:
    """Which training samples each device owns, stored CSR-style so 100,000 devices cost only two int arrays.

    Device k owns `indices[offsets[k]:offsets[k+1]]`; the order within a device carries no meaning.
    Both arrays are read-only so the views `device_indices` hands out cannot corrupt the partition.
    """

    __slots__ = ("offsets", "indices")

    def __init__(self, offsets: np.ndarray, indices: np.ndarray):
        offsets, indices = _readonly_int64(offsets, "offsets"), _readonly_int64(indices, "indices")
        if (offsets.size == 0 or offsets[0] != 0 or offsets[-1] != indices.size
                or np.any(np.diff(offsets) < 0)):
            raise DataError(f"Partition: offsets must rise from 0 to len(indices) = {indices.size}, "
                            f"got {offsets[:3].tolist()}...{offsets[-2:].tolist()}")
        if indices.size and indices.min() < 0:
            raise DataError(f"Partition: indices must be >= 0, got {int(indices.min())}")
        self.offsets, self.indices = offsets, indices

    @property
    def n_devices(self) -> int:
        return self.offsets.size - 1

    def device_indices(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n_devices:
            raise DataError(f"Partition: device {k} out of range 0..{self.n_devices - 1}")
        return self.indices[self.offsets[k] : self.offsets[k + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample_batch(self, device: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Dataset indices of `batch_size` distinct samples of `device` (without replacement).

        A device owning fewer than `batch_size` samples returns all of them in a random order.
        """
        _require_ints(batch_size=(batch_size, 1))
        own = self.device_indices(device)
        if own.size <= batch_size:
            return own[rng.permutation(own.size)]
        return own[rng.choice(own.size, size=batch_size, replace=False)]

    def sample_batches(self, devices: np.ndarray, batch_size: int, steps: int,
                       rng: np.random.Generator) -> list[list[np.ndarray]]:
        """`steps` batches of each of `devices`: the draws of `sample_batch` called `steps` times per device, in
        that order, from `rng`, with one check for all instead of one per call.

        Consecutive devices that hold the same number of samples, at most `batch_size`, are shuffled by one
        `rng.permuted` call over their rows: it shuffles row after row with the same routine (and the same
        draws) as one `rng.permutation` per row (tests/test_scale.py checks the two against each other)."""
        _require_ints(batch_size=(batch_size, 1), steps=(steps, 0))
        devices = np.asarray(devices, dtype=np.int64)
        for bad in devices[(devices < 0) | (devices >= self.n_devices)][:1]:
            raise DataError(f"Partition: device {int(bad)} out of range 0..{self.n_devices - 1}")
        lo_all, hi_all = self.offsets[devices], self.offsets[devices + 1]
        sizes = hi_all - lo_all
        whole = sizes <= batch_size                 # every sample, in a random order
        # runs of consecutive devices drawn alike: [start, end) with one size, all `whole`, or one device
        change = np.flatnonzero((sizes[1:] != sizes[:-1]) | ~whole[1:] | ~whole[:-1]) + 1
        bounds = np.concatenate([[0], change, [len(devices)]]).tolist()
        out: list[list[np.ndarray]] = []
        choice = rng.choice
        for start, end in zip(bounds[:-1], bounds[1:]):
            if start == end:
                continue
            size, lo = int(sizes[start]), lo_all[start:end]
            if whole[start]:
                order = rng.permuted(np.broadcast_to(np.arange(size, dtype=np.int64), ((end - start) * steps, size)),
                                     axis=1)
                rows = self.indices[lo.repeat(steps)[:, None] + order]
                out.extend([[r] for r in rows] if steps == 1 else map(list, rows.reshape(end - start, steps, size)))
            else:
                own = self.indices[int(lo[0]):int(lo[0]) + size]
                out.append([own[choice(size, size=batch_size, replace=False)] for _ in range(steps)])
        return out

    @classmethod
    def blocks(cls, n_devices: int, size: int) -> Partition:
        """Device k owns samples k*size .. (k+1)*size - 1."""
        _require_ints(n_devices=(n_devices, 1), size=(size, 0))
        offsets = np.arange(n_devices + 1, dtype=np.int64) * size
        return cls(offsets, np.arange(n_devices * size, dtype=np.int64))

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> Partition:
        arrays = [_readonly_int64(a, f"device {k}") for k, a in enumerate(lists)]
        offsets = np.concatenate(([0], np.cumsum([a.size for a in arrays], dtype=np.int64)))
        return cls(offsets, np.concatenate(arrays) if arrays else np.zeros(0, np.int64))

    def __repr__(self) -> str:
        return f"Partition(n_devices={self.n_devices}, n_indices={self.indices.size})"


def _readonly_int64(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"Partition: {name} must be a 1-d integer array, got dtype {a.dtype} "
                        f"shape {a.shape}")
    view = np.ascontiguousarray(a, dtype=np.int64).view()
    view.flags.writeable = False
    return view


def _require_ints(**values: tuple[object, int]) -> None:
    for name, (value, low) in values.items():
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low):
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")


def _require_number(name: str, value: object, low: float, strict: bool) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if not (ok and (value > low if strict else value >= low)):
        raise DataError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def load_mnist(directory: str | Path) -> Dataset:
    """Load MNIST from the four standard IDX files in `directory`, each raw or `.gz` (read by `fedsim.learn.idx`).

    Pixels are normalised with the usual MNIST mean 0.1307 and std 0.3081.
    """
    x_train, y_train, x_test, y_test = mnist_arrays(directory)
    return Dataset(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                   torch.from_numpy(y_test), input_shape=(1, 28, 28), num_classes=10)


def partition_iid(n_samples: int, n_devices: int, samples_per_device: int,
                  rng: np.random.Generator) -> Partition:
    """Give each device `samples_per_device` uniformly random training samples.

    If n_devices * samples_per_device <= n_samples, the devices get disjoint slices of one random
    permutation. Otherwise there are not enough samples to go round: each device independently
    draws `samples_per_device` distinct indices, so different devices may share samples.
    """
    _require_ints(n_samples=(n_samples, 1), n_devices=(n_devices, 1),
                  samples_per_device=(samples_per_device, 1))
    if samples_per_device > n_samples:
        raise DataError(f"samples_per_device must be at most the {n_samples} training samples of the dataset "
                        f"(an iid partition gives each device distinct samples), got {samples_per_device}")
    offsets = np.arange(n_devices + 1, dtype=np.int64) * samples_per_device
    if n_devices * samples_per_device <= n_samples:
        return Partition(offsets, rng.permutation(n_samples)[: offsets[-1]])
    sizes = np.full(n_devices, samples_per_device, dtype=np.int64)
    return Partition(offsets, _distinct_draws(sizes, n_samples, rng))


def partition_dirichlet(labels: np.ndarray, n_devices: int, samples_per_device: int, alpha: float,
                        num_classes: int, rng: np.random.Generator) -> Partition:
    """Label-skewed partition: device k's class mix is p_k ~ Dirichlet(alpha * ones).

    Each device draws per-class counts ~ Multinomial(samples_per_device, p_k), then that many
    distinct samples of each class. Devices draw independently, so they may share samples. A device
    needing more samples of a class than the dataset holds draws that class with replacement.
    Classes absent from `labels` get no mass (the Dirichlet is over the present classes).
    Small alpha (0.01) gives nearly one class per device, large alpha (1000) a near-uniform mix.
    """
    _require_ints(n_devices=(n_devices, 1), samples_per_device=(samples_per_device, 1),
                  num_classes=(num_classes, 1))
    _require_number("alpha", alpha, 0, strict=True)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a non-empty 1-d integer array, got dtype {labels.dtype} "
                        f"shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in 0..{num_classes - 1}, "
                        f"got {int(labels.min())}..{int(labels.max())}")

    by_class = np.argsort(labels, kind="stable")
    class_sizes = np.bincount(labels, minlength=num_classes)
    class_starts = np.cumsum(class_sizes) - class_sizes
    present = np.flatnonzero(class_sizes)
    p = rng.dirichlet(np.full(present.size, float(alpha)), size=n_devices)
    counts = np.zeros((n_devices, num_classes), dtype=np.int64)
    counts[:, present] = rng.multinomial(samples_per_device, p / p.sum(axis=1, keepdims=True))

    offsets = np.arange(n_devices + 1, dtype=np.int64) * samples_per_device
    # Device k's class-c samples go right after its samples of the classes below c.
    slot_starts = offsets[:-1, None] + np.cumsum(counts, axis=1) - counts
    indices = np.empty(offsets[-1], dtype=np.int64)
    for c in present:
        need, n_c = counts[:, c], int(class_sizes[c])
        short = need > n_c
        local = np.empty(int(need.sum()), dtype=np.int64)
        elem_short = np.repeat(short, need)
        local[~elem_short] = _distinct_draws(need[~short], n_c, rng)
        local[elem_short] = rng.integers(0, n_c, size=int(elem_short.sum()))
        rank_in_group = np.arange(local.size) - np.repeat(np.cumsum(need) - need, need)
        indices[np.repeat(slot_starts[:, c], need) + rank_in_group] = by_class[class_starts[c] + local]
    return Partition(offsets, indices)


def _distinct_draws(sizes: np.ndarray, population: int, rng: np.random.Generator) -> np.ndarray:
    """For each group g, sizes[g] distinct integers in [0, population), concatenated by group.

    Requires sizes <= population. Groups wanting over a quarter of the population rank random keys
    (cost ~ population <= 4 * size per group); the rest draw with replacement and redraw
    collisions, which takes a few O(n) passes since each draw collides with probability < 1/4.
    """
    heavy = sizes * 4 > population
    light_sizes = sizes[~heavy]
    keys = rng.integers(0, population, size=int(light_sizes.sum()))
    # Offsetting group g by g * population lets one sort put every collision next to its twin.
    keys += np.repeat(np.arange(light_sizes.size, dtype=np.int64) * population, light_sizes)
    keys.sort()
    while keys.size:
        dup = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if dup.size == 0:
            break
        new = np.sort(keys[dup] // population * population
                      + rng.integers(0, population, size=dup.size))
        keys = np.delete(keys, dup)
        keys = np.insert(keys, np.searchsorted(keys, new), new)
    keys %= population
    if not heavy.any():
        return keys

    chunks, step = [], max(1, _CHUNK_ELEMENTS // population)
    heavy_sizes = sizes[heavy]
    for lo in range(0, heavy_sizes.size, step):
        rows = heavy_sizes[lo : lo + step]
        ranks = np.argsort(rng.random((rows.size, population)), axis=1)
        chunks.append(ranks[np.arange(population) < rows[:, None]])
    out = np.empty(int(sizes.sum()), dtype=np.int64)
    elem_heavy = np.repeat(heavy, sizes)
    out[~elem_heavy], out[elem_heavy] = keys, np.concatenate(chunks)
    return out
