"""Rows made on demand: a column of a data set too large to hold, generated when rows are asked for.

A data set whose rows are a pure function of their index (the built-in synthetic data, every device from its
own stream) need not be held in memory: `LazyRows` stands where a tensor of inputs or labels would, and
produces rows `index` (an int64 array of row numbers) through its `RowSource`. The training code gathers rows
through `take_rows`, which indexes a tensor or asks the source, so both kinds of data set train alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

__all__ = ["LazyRows", "RowSource", "TRAIN", "TEST", "full_tensor", "take_rows"]

TRAIN, TEST = "train", "test"


class RowSource(Protocol):
    """What `LazyRows` asks: the number of rows of a part, rows `index` of it (float32 x, int64 y), and a
    text that identifies the data (a worker checks it rebuilt the same)."""

    input_shape: tuple[int, ...]

    def n_rows(self, part: str) -> int: ...
    def take(self, part: str, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...
    def whole(self, part: str) -> tuple[torch.Tensor, torch.Tensor]: ...
    def describe(self) -> str: ...


class LazyRows:
    """The inputs (`column` "x") or labels ("y") of one part ("train", "test") of a `RowSource`."""

    __slots__ = ("source", "part", "column", "dtype")

    def __init__(self, source: RowSource, part: str, column: str, dtype: torch.dtype | None = None):
        self.source, self.part, self.column = source, part, column
        self.dtype = dtype if dtype is not None else (torch.float32 if column == "x" else torch.int64)

    def __len__(self) -> int:
        return self.source.n_rows(self.part)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.input_shape) if self.column == "x" else (len(self),)

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype: torch.dtype) -> LazyRows:
        """The same rows, produced in `dtype` (inputs only; labels stay int64)."""
        return self if dtype == self.dtype or self.column == "y" else LazyRows(self.source, self.part, "x", dtype)

    def __getitem__(self, index) -> torch.Tensor:
        """Rows `index` (an index array or tensor, or a slice) as a tensor."""
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index.numpy() if isinstance(index, torch.Tensor) else index)
        if index.dtype == bool:                 # a mask, as a tensor takes it (not rows 0 and 1)
            if index.shape != (len(self),):
                raise IndexError(f"a boolean mask of shape {index.shape} for {len(self)} rows")
            index = np.flatnonzero(index)
        x, y = self.source.take(self.part, index.astype(np.int64, copy=False))
        return x.to(self.dtype) if self.column == "x" else y

    def tensor(self) -> torch.Tensor:
        """Every row, as one tensor (the source keeps what it made)."""
        x, y = self.source.whole(self.part)
        return x.to(self.dtype) if self.column == "x" else y

    def __repr__(self) -> str:
        return f"LazyRows({self.part}.{self.column}, {len(self)} rows, {self.dtype})"


def take_rows(x: torch.Tensor | LazyRows, y: torch.Tensor | LazyRows,
              index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of rows `index`: indexed from tensors, or made once by the source of lazy rows."""
    if isinstance(x, LazyRows):
        xs, ys = x.source.take(x.part, np.asarray(index, dtype=np.int64))
        return xs.to(x.dtype), ys
    index = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return x[index], y[index]


def full_tensor(t: torch.Tensor | LazyRows) -> torch.Tensor:
    """A tensor as it is; lazy rows made whole."""
    return t.tensor() if isinstance(t, LazyRows) else t
