"""MNIST files on disk: the IDX format, checksums, atomic writes and the prepared arrays."""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import DataError

# The four files of MNIST and the sha256 of their decompressed bytes. Mirrors compress
# them differently, so the decompressed content is what identifies them.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
PREPARED_FILE = "mnist.npz"
SPLITS = ("train", "val", "test")

_IDX_UBYTE = 0x08


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it into place, else delete it.

    A reader never sees a half-written `final`: it either does not exist or is complete.
    The temporary name starts with '.tmp-' so that a crash leaves nothing that looks final.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(final: Path, data: bytes) -> None:
    """Write `data` to `final` through a temporary file and a rename."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files that an interrupted write left in `folder`."""
    for leftover in folder.glob(".tmp-*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def parse_idx(data: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes in `ndim` dimensions; raise DataError if malformed."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise DataError(
            f"{name} is not an IDX file of {ndim}-dimensional unsigned bytes: its magic number is "
            f"{data[:4].hex() or 'missing'}, expected 000008{ndim:02x}. Delete it and run the fetch stage again."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated inside its header ({len(data)} bytes). Fetch it again.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{name} is {what}: its header declares shape {shape}, i.e. {expected} bytes, "
            f"but the file has {len(data)}. Delete it and run the fetch stage again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (the inverse of parse_idx)."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX here holds uint8, not {array.dtype}")
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def read_images(path: Path) -> np.ndarray:
    """Read an IDX image file as uint8 [n, 28, 28]."""
    images = parse_idx(_read(path), path.name, ndim=3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path.name} holds images of {images.shape[1]}x{images.shape[2]} pixels; MNIST's are 28x28. "
            "Check that the mirror serves MNIST."
        )
    return images


def read_labels(path: Path) -> np.ndarray:
    """Read an IDX label file as uint8 [n]."""
    return parse_idx(_read(path), path.name, ndim=1)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the fetch stage first (dvc repro fetch).") from None


@dataclass(frozen=True)
class Split:
    """One split of the prepared data: raw uint8 pixels and their labels."""

    x: np.ndarray  # uint8 [n, 28, 28]
    y: np.ndarray  # uint8 [n]


def save_prepared(folder: Path, splits: dict[str, Split]) -> None:
    """Write the splits as one uncompressed .npz (no pickled objects), atomically."""
    arrays = {}
    for name, split in splits.items():
        arrays[f"x_{name}"], arrays[f"y_{name}"] = split.x, split.y
    with atomic_path(folder / PREPARED_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_prepared(folder: Path) -> dict[str, Split]:
    """Read the splits written by save_prepared; pickled content is refused."""
    path = Path(folder) / PREPARED_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: Split(npz[f"x_{name}"], npz[f"y_{name}"]) for name in SPLITS}
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the preprocess stage first (dvc repro preprocess).") from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a valid prepared file ({exc}); run the preprocess stage again (dvc repro preprocess).") from None

