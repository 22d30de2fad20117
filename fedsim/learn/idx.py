"""IDX files (MNIST's format) read into numpy arrays, with no torch: raw or gzipped, every bad byte a `DataError`.

`mnist_arrays(directory)` is MNIST's four files as normalised float32 images and int64 labels; `load_mnist`
(`fedsim.learn.data`) wraps them as tensors. No exception type but `DataError` escapes `read_idx`, whatever bytes
it is fed.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from fedsim.errors import DataError

__all__ = ["read_idx", "mnist_arrays"]

# A gzip stream's decompressed size is unknown until it has been read, so without a cap a header
# lying about its dims would let a gzip bomb grow the bounded read without limit.
_MAX_GZIP_PAYLOAD_BYTES = 1 << 32
_GZIP_CHUNK_BYTES = 1 << 23
_IDX_OTHER_TYPES = {0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
                    0x0E: "float64"}
_MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081

MnistArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

def mnist_arrays(directory: str | Path) -> MnistArrays:
    """(train images (n, 1, 28, 28) float32, train labels int64, test images, test labels) of the four MNIST IDX
    files in `directory` (each raw or `.gz`); pixels normalised with MNIST's mean 0.1307 and std 0.3081."""
    return _read_mnist(directory)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, raw or gzipped (detected by content), as a uint8 array."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not is_gzip:
                return _read_idx_stream(raw, path, file_bytes=os.fstat(raw.fileno()).st_size)
            with gzip.GzipFile(fileobj=raw) as stream:
                return _read_idx_stream(stream, path, file_bytes=None)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: corrupt gzip stream: {err}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None


def _read_idx_stream(stream, path: Path, file_bytes: int | None) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: empty file, expected an IDX file" if not head
                        else f"{path}: truncated: {len(head)} bytes, too short for an IDX header")
    if head[:2] != b"\0\0" or head[2] != 0x08:
        known = _IDX_OTHER_TYPES.get(head[2]) if head[:2] == b"\0\0" else None
        detail = f"; data type code 0x{head[2]:02x} ({known}) is not supported" if known else ""
        raise DataError(f"{path}: bad magic number 0x{int.from_bytes(head, 'big'):08x}, expected an "
                        f"IDX file of unsigned bytes (0x00000801 or 0x00000803){detail}")
    ndim = head[3]
    dim_bytes = stream.read(4 * ndim)
    if ndim == 0 or len(dim_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated: IDX header declares {ndim} dimensions but holds "
                        f"{len(dim_bytes) // 4}")
    dims = tuple(int.from_bytes(dim_bytes[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    expected = math.prod(dims)

    def check(have: int, where: str) -> None:
        if have != expected:
            problem = "truncated" if have < expected else "trailing data"
            raise DataError(f"{path}: {problem}: header says {expected} data bytes "
                            f"({'x'.join(map(str, dims))}), {where} {have}")

    if file_bytes is not None:
        check(file_bytes - 4 - 4 * ndim, "file has")
        # The size was checked against the file first, so this allocates only what the file holds.
        data = np.empty(expected, dtype=np.uint8)
        check(stream.readinto(memoryview(data)) if expected else 0, "file has")
        return data.reshape(dims)
    if expected > _MAX_GZIP_PAYLOAD_BYTES:
        raise DataError(f"{path}: header says {expected} data bytes, more than the "
                        f"{_MAX_GZIP_PAYLOAD_BYTES} a gzipped IDX file may hold")
    # One byte past the expected size reveals trailing data; growing chunk by chunk keeps memory
    # proportional to what the stream really holds, never to what the header claims.
    buf = bytearray()
    while len(buf) <= expected:
        chunk = stream.read(min(_GZIP_CHUNK_BYTES, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    check(len(buf), "decompressed stream has" + (" at least" if len(buf) > expected else ""))
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _read_mnist(directory: str | Path) -> MnistArrays:
    directory = Path(directory)
    expected_names = ", ".join(f"{n}[.gz]" for n in _MNIST_NAMES)
    if not directory.is_dir():
        raise DataError(f"{directory}: MNIST directory not found, expected it to hold {expected_names}")
    # A raw copy is what a user deliberately extracted, and it reads several times faster.
    found = {n: [p for p in (directory / n, directory / f"{n}.gz") if p.is_file()] for n in _MNIST_NAMES}
    missing = [n for n, paths in found.items() if not paths]
    if missing:
        raise DataError(f"{directory}: missing MNIST file(s) {', '.join(missing)}; "
                        f"expected {expected_names}")

    arrays = []
    for img_path, lbl_path in ((found[_MNIST_NAMES[0]][0], found[_MNIST_NAMES[1]][0]),
                               (found[_MNIST_NAMES[2]][0], found[_MNIST_NAMES[3]][0])):
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{img_path}: expected images of shape (n, 28, 28), got {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: expected a 1-d label array, got shape {labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{lbl_path}: {labels.shape[0]} labels but {img_path.name} has "
                            f"{images.shape[0]} images")
        if labels.size and labels.max() > 9:
            raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
        arrays += [_normalised(images).reshape(-1, 1, 28, 28), labels.astype(np.int64)]
    return tuple(arrays)


# Each pixel byte's normalised float32 value: (b / 255 - mean) / std in float64, rounded once.
_PIXEL_VALUES = ((np.arange(256) / 255.0 - _MNIST_MEAN) / _MNIST_STD).astype(np.float32)
# The values of two adjacent bytes at once: entry p holds the float32 pair (value of p's first byte in memory,
# value of its second), stored as one uint64, so a table look-up converts two pixels.
_PAIR = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
_PAIR_VALUES = np.ascontiguousarray(_PIXEL_VALUES[_PAIR]).view(np.uint64).reshape(-1)
_NORMALISE_CHUNK = 1 << 18      # pixel pairs per look-up: the chunk's int64 index stays in the cache


def _normalised(images: np.ndarray) -> np.ndarray:
    """uint8 images as normalised float32 (the same shape): the float32 of `_PIXEL_VALUES[images]`, two pixels per
    look-up and in chunks (a single `_PIXEL_VALUES[images]` would first widen all 47 M indices to int64)."""
    flat = np.ascontiguousarray(images).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    pairs = flat.size // 2
    words, into = flat[:2 * pairs].view(np.uint16), out[:2 * pairs].view(np.uint64)
    for lo in range(0, pairs, _NORMALISE_CHUNK):
        np.take(_PAIR_VALUES, words[lo:lo + _NORMALISE_CHUNK], out=into[lo:lo + _NORMALISE_CHUNK])
    if flat.size % 2:
        out[-1] = _PIXEL_VALUES[flat[-1]]
    return out.reshape(images.shape)
