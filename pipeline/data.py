"""Files on disk: atomic writes, checksums, the IDX format, and a split of images with labels."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, DiskFull
from pipeline.mnist import IMAGE_SHAPE

_IDX_UBYTE = 0x08


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def atomic_path(final: Path, needed: int = 0, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it into place, else delete it.

    A reader never sees a half-written `final`: it either does not exist or is complete, and
    durably so: what was written is on disk (fsync) before the rename, and the rename is on disk
    (the folder's fsync) before this returns, so a power cut cannot leave `final` with empty files.
    The temporary name starts with '.tmp-' so that a crash leaves nothing that looks final.
    A full disk becomes DiskFull naming `final` and the space it needs: at least `needed`
    bytes (the caller's estimate) and more than was written before the disk filled.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, final)
        fsync_tree(final.parent, files=False)
    except Exception as exc:
        written = disk_bytes(tmp)
        _remove(tmp)
        if is_disk_full(exc):
            raise disk_full(final, max(needed, written + 1)) from exc
        raise
    finally:
        _remove(tmp)


def fsync_tree(path: Path, files: bool = True) -> None:
    """Flush `path` to disk: a file; or a folder, its subfolders and (with `files`) every file in them."""
    if path.is_dir():
        for folder, _, names in os.walk(path):
            for name in names if files else ():
                _fsync(Path(folder) / name, os.O_RDONLY)
            _fsync(Path(folder), os.O_RDONLY | os.O_DIRECTORY)
    elif files and path.exists():
        _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_bytes(path: Path) -> int:
    """The bytes of a file, or of all files under a folder (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, says the disk is full (ENOSPC).

    Python raises OSError with errno 28; TensorFlow and shutil.copytree only say it in their message.
    """
    while exc is not None:
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full(final: Path, needed: int) -> DiskFull:
    """The error for a write of `final` that found its disk full."""
    mount = final.parent.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    free = shutil.disk_usage(mount).free
    return DiskFull(
        f"the disk is full: writing {final} needs at least {megabytes(needed)}, and the file system "
        f"mounted at {mount} has {megabytes(free)} free. Nothing partial was kept. Free some space there "
        "(see `df -h`), then run again: finished stages and the last training checkpoint are kept."
    )


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def atomic_write(final: Path, data: bytes) -> None:
    """Write `data` to `final` through a temporary file and a rename."""
    with atomic_path(final) as tmp:  # which flushes it to disk before the rename
        tmp.write_bytes(data)


def remove_leftovers(folder: Path, name: str = "") -> None:
    """Delete the temporary files that interrupted writes left in `folder` (only those of `final` name `name`, if given)."""
    for leftover in folder.glob(f".tmp-{name}-*" if name else ".tmp-*"):
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
    """Read an IDX image file as uint8 [n, height, width] with MNIST's image shape."""
    images = parse_idx(_read(path), path.name, ndim=3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path.name} holds images of {images.shape[1]}x{images.shape[2]} pixels; MNIST's are "
            f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}. "
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

    x: np.ndarray  # uint8 [n, height, width]: raw pixels
    y: np.ndarray  # uint8 [n]
