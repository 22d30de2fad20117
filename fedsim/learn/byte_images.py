"""Images held as their bytes and turned into model inputs when rows are gathered (a `RowSource`).

MNIST's 70,000 images take 55 MB as bytes and 220 MB as normalised float32. `ByteImages` holds the bytes and the
labels; the rows a round gathers are looked up in a 256-entry table of float32 values, the same numbers a
whole-set conversion gives (each value is the table entry, not a recomputation), so traces do not change. A
test set is converted once, at its first evaluation, and kept.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fedsim.learn.rows import TEST, TRAIN

__all__ = ["ByteImages"]


class ByteImages:
    """uint8 images (n, *shape) and int64 labels per part ("train", "test"); inputs are `values[byte]` (float32),
    of shape (n, 1, *shape)."""

    def __init__(self, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], values: np.ndarray,
                 name: str):
        self._images = {part: np.ascontiguousarray(images[part], dtype=np.uint8) for part in (TRAIN, TEST)}
        self._labels = {part: torch.from_numpy(np.asarray(labels[part], dtype=np.int64)) for part in (TRAIN, TEST)}
        self._values = np.asarray(values, dtype=np.float32)
        if self._values.shape != (256,):
            raise ValueError(f"ByteImages: values must hold one float32 per byte value (256), got shape "
                             f"{self._values.shape}")
        self.input_shape = (1, *self._images[TRAIN].shape[1:])
        self.name = name
        self._whole: dict[str, torch.Tensor] = {}
        self._digest: str | None = None

    def labels(self, part: str) -> torch.Tensor:
        """Every label of `part` (held: labels are small)."""
        return self._labels[part]

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._values[images].reshape(len(images), *self.input_shape))

    # -- RowSource ---------------------------------------------------------------------------------
    def n_rows(self, part: str) -> int:
        return len(self._images[part])

    def take(self, part: str, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if part in self._whole:
            at = torch.from_numpy(np.asarray(index, dtype=np.int64))
            return self._whole[part][at], self._labels[part][at]
        index = np.asarray(index, dtype=np.int64)
        return self._inputs(self._images[part][index]), self._labels[part][torch.from_numpy(index)]

    def whole(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of `part`, converted once and kept."""
        if part not in self._whole:
            self._whole[part] = self._inputs(self._images[part])
        return self._whole[part], self._labels[part]

    def describe(self) -> str:
        """The data's name, shapes and a digest of every byte and label (a Dask worker checks it rebuilt the
        same data)."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for part in (TRAIN, TEST):
                h.update(self._images[part].reshape(-1).view(np.uint8))
                h.update(self._labels[part].numpy().view(np.uint8))
            h.update(self._values.view(np.uint8))
            self._digest = h.hexdigest()
        shapes = {part: self._images[part].shape for part in (TRAIN, TEST)}
        return f"{self.name} bytes {shapes} {self._digest}"
