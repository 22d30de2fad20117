"""The synthetic(alpha, beta) data of FedProx (Li et al., MLSys 2020), every device from its own stream.

Device k draws u_k ~ N(0, alpha), B_k ~ N(0, beta), W_k ~ N(u_k, 1) of shape (num_classes, dim),
b_k ~ N(u_k, 1), v_k ~ N(B_k, 1) per entry, then x ~ N(v_k, diag(j^-1.2)) and y = argmax(W_k x + b_k).
N's second argument is the variance, as in the paper (the reference code passes alpha and beta as standard
deviations; the two agree at 1). beta sets how far apart the devices' inputs lie. alpha, faithfully to the
paper and its code, changes nothing: u_k shifts every class's logit by the same u_k * (sum(x) + 1), which
argmax ignores, so for a given seed the data are identical for every alpha. The devices' labelling functions
still differ, through the N(0, 1) parts of W_k and b_k.

Streams. The run's data stream gives one 128-bit key; device k's numbers come from Philox (a counter-based
generator) under that key: from counter (0, 0, k, 0) its labelling function and input mean (u_k, B_k, b_k,
v_k, W_k: 2 + C + D + C * D standard normals, in that order), then its training inputs; from counter
(0, 0, k, 1) its test inputs (inputs: samples x dim standard normals, scaled by j^-0.6 and shifted by v_k).
One stream holds the function and the training inputs because training rows are what a round makes. A device's data
therefore depend on the seed and k only, not on the fleet's size or on which other devices were made, so any
device's rows can be made on demand: a fleet too large to hold its data (`make_synthetic(..., lazy=True)`)
makes the rows a round gathers, and its test set when it is first evaluated. Streams never overlap: a device
draws far fewer than 2^64 blocks of four numbers from its counter.

Rows: device k owns training rows k * samples_per_device .. (k + 1) * samples_per_device - 1 (the Partition);
the test set concatenates every device's test samples in device order.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import torch

from fedsim.errors import DataError
from fedsim.learn.data import Dataset, Partition
from fedsim.learn.rows import TEST, TRAIN, LazyRows

__all__ = ["SyntheticDevices", "make_synthetic", "EAGER_BYTES"]

# Data of at most this many bytes are made whole when the run is built; larger ones on demand.
EAGER_BYTES = 1 << 28
# Bounds the float64 temporaries of one batch of devices to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 22
# Draws of at most this many devices reuse one set of temporaries (about 10 MB with 10 samples of 60 inputs)
_SCRATCH_ROWS = 512


def _check(alpha: float, beta: float, n_devices: int, samples_per_device: int, test_samples_per_device: int,
           dim: int, num_classes: int) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value >= 0
        if not ok:
            raise DataError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value, low in (("n_devices", n_devices, 1), ("samples_per_device", samples_per_device, 1),
                             ("test_samples_per_device", test_samples_per_device, 0), ("dim", dim, 1),
                             ("num_classes", num_classes, 2)):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low):
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")


class SyntheticDevices:
    """The synthetic data of a fleet: any devices' rows, made from their own streams (a `RowSource`)."""

    def __init__(self, alpha: float, beta: float, n_devices: int, samples_per_device: int,
                 test_samples_per_device: int, key: np.ndarray, dim: int = 60, num_classes: int = 10):
        _check(alpha, beta, n_devices, samples_per_device, test_samples_per_device, dim, num_classes)
        self.alpha, self.beta = float(alpha), float(beta)
        self.n_devices, self.dim, self.num_classes = int(n_devices), int(dim), int(num_classes)
        self.per_device = {TRAIN: int(samples_per_device), TEST: int(test_samples_per_device)}
        self.key = np.asarray(key, dtype=np.uint64).copy()
        self.input_shape = (self.dim,)
        self._x_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6    # sqrt of the variance j^-1.2
        self._bits = np.random.Philox(key=self.key)
        self._gen = np.random.Generator(self._bits)
        # The generator's state with Python ints in lists, not numpy arrays: the state setter reads it element by
        # element, and numpy scalars make a seek several times slower
        state = self._bits.state
        self._state = {**state, "state": {name: [int(v) for v in value] for name, value in state["state"].items()},
                       "buffer": [int(v) for v in state["buffer"]]}
        self._counter = self._state["state"]["counter"]
        self._lock = threading.Lock()     # one generator, sought per device: one device at a time (Dask threads)
        self._whole: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch = threading.local()        # each thread's buffers for the draws' temporaries

    def _scratch_for(self, rows: int, drawn: int, weights: int, inputs: int) -> threading.local | SimpleNamespace:
        """This thread's buffers for `rows` devices' draws (float64: `drawn`, `weights`, `inputs` per device); kept
        for the next call up to _SCRATCH_ROWS devices (a round's participants), fresh beyond (a whole test set)."""
        scratch = self._scratch if rows <= _SCRATCH_ROWS else SimpleNamespace()
        if getattr(scratch, "rows", -1) < rows or scratch.drawn.shape[1] != drawn:
            scratch.rows = rows
            scratch.drawn = np.empty((rows, drawn))
            scratch.weights, scratch.inputs = np.empty((rows, weights)), np.empty((rows, inputs))
        return scratch

    def _seek(self, device: int, part: int) -> None:
        """Put the generator at the start of stream `part` of `device`."""
        state = self._state
        self._counter[:] = 0, 0, device, part
        state["buffer_pos"], state["has_uint32"] = 4, 0
        self._bits.state = state

    def draw(self, devices: np.ndarray, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (float32, (n, m, dim)) and labels (int64, (n, m)) of part `part` of `devices`, m its samples
        per device."""
        devices = np.asarray(devices, dtype=np.int64)
        m, C, D = self.per_device[part], self.num_classes, self.dim
        xs_out = np.empty((len(devices), m, D), dtype=np.float32)
        ys_out = np.empty((len(devices), m), dtype=np.int64)
        width = 2 + C + D + C * D
        step = max(1, _CHUNK_ELEMENTS // (width + m * D))
        seek, normal = self._seek, self._gen.standard_normal
        scratch = self._scratch_for(min(step, len(devices)), width + m * D, C * D, m * D)
        for lo in range(0, len(devices), step):
            chunk = devices[lo:lo + step].tolist()
            n = len(chunk)
            # the temporaries live in buffers kept from call to call: fresh ones of this size would cost a page
            # fault per 4 kB each time, more than the arithmetic
            drawn = scratch.drawn[:n]
            with self._lock:
                for i, d in enumerate(chunk):
                    seek(d, 0)
                    if part == TRAIN:
                        normal(out=drawn[i])                  # the function, then the training inputs
                    else:
                        normal(out=drawn[i, :width])
                        seek(d, 1)
                        normal(out=drawn[i, width:])
            f, z = drawn[:, :width], drawn[:, width:].reshape(n, m, D)
            u, shift = math.sqrt(self.alpha) * f[:, 0], math.sqrt(self.beta) * f[:, 1]
            biases = f[:, 2:2 + C] + u[:, None]
            means = f[:, 2 + C:2 + C + D] + shift[:, None]
            weights = np.add(f[:, 2 + C + D:].reshape(-1, C, D), u[:, None, None],
                             out=scratch.weights[:n].reshape(n, C, D))
            xs = np.multiply(z, self._x_std, out=scratch.inputs[:n].reshape(n, m, D))
            xs += means[:, None, :]                     # means + z * std (IEEE addition commutes)
            with np.errstate(over="ignore", invalid="ignore"):   # checked next, with a message naming beta
                ys = (xs @ weights.transpose(0, 2, 1) + biases[:, None, :]).argmax(axis=-1)
                xs_out[lo:lo + n] = xs                  # to float32, as astype rounds
            if not np.isfinite(xs_out[lo:lo + n]).all():
                raise DataError(f"beta = {self.beta!r} makes synthetic inputs too large for float32 (non-finite "
                                "values); use a smaller beta")
            ys_out[lo:lo + n] = ys
        return xs_out, ys_out

    # -- RowSource ---------------------------------------------------------------------------------------
    def n_rows(self, part: str) -> int:
        return self.n_devices * self.per_device[part]

    def take(self, part: str, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` of `part` (row r is sample r % m of device r // m): each device made once per call."""
        if part in self._whole:
            x, y = self._whole[part]
            at = torch.from_numpy(np.asarray(index, dtype=np.int64))
            return x[at], y[at]
        m = self.per_device[part]
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_rows(part)):
            raise DataError(f"synthetic {part} rows: index out of range 0..{self.n_rows(part) - 1}")
        owner = index // m
        devices = np.unique(owner)
        xs, ys = self.draw(devices, part)
        # each row's place among the drawn rows (its device's position in `devices` times m, plus its sample),
        # then one gather of whole rows: cheaper than np.unique's inverse and a two-index gather
        drawn_row = np.searchsorted(devices, owner) * m + (index - owner * m)
        return (torch.from_numpy(np.take(xs.reshape(-1, self.dim), drawn_row, axis=0)),
                torch.from_numpy(np.take(ys.reshape(-1), drawn_row)))

    def whole(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of `part`, made once and kept."""
        if part not in self._whole:
            xs, ys = self.draw(np.arange(self.n_devices), part)
            self._whole[part] = (torch.from_numpy(xs.reshape(-1, self.dim)), torch.from_numpy(ys.reshape(-1)))
        return self._whole[part]

    def describe(self) -> str:
        return (f"synthetic(alpha={self.alpha!r}, beta={self.beta!r}, devices={self.n_devices}, "
                f"per_device={self.per_device}, dim={self.dim}, classes={self.num_classes}, "
                f"key={self.key.tolist()})")

    def dataset(self, lazy: bool) -> Dataset:
        """The data set: tensors made whole now, or `LazyRows` made on demand."""
        if lazy:
            columns = [LazyRows(self, part, column) for part in (TRAIN, TEST) for column in ("x", "y")]
        else:
            columns = [*self.whole(TRAIN), *self.whole(TEST)]
        return Dataset(*columns, input_shape=self.input_shape, num_classes=self.num_classes)


def make_synthetic(alpha: float, beta: float, n_devices: int, samples_per_device: int,
                   test_samples_per_device: int, rng: np.random.Generator, dim: int = 60, num_classes: int = 10,
                   lazy: bool | None = None) -> tuple[Dataset, Partition]:
    """FedProx synthetic data of `n_devices` devices under a key drawn from `rng` (see the module docstring),
    and its partition: device k owns its own `samples_per_device` rows. `lazy`: rows made on demand (default:
    when the data would take more than EAGER_BYTES)."""
    _check(alpha, beta, n_devices, samples_per_device, test_samples_per_device, dim, num_classes)
    key = rng.integers(0, 2**64, size=2, dtype=np.uint64)
    devices = SyntheticDevices(alpha, beta, n_devices, samples_per_device, test_samples_per_device, key, dim,
                               num_classes)
    if lazy is None:
        lazy = n_devices * (samples_per_device + test_samples_per_device) * (dim * 4 + 8) > EAGER_BYTES
    return devices.dataset(lazy), Partition.blocks(n_devices, samples_per_device)
