"""Fetch MNIST from a list of mirrors, verify every file, write it atomically.

A mirror is an http(s):// URL prefix, a file:// URL or a local directory holding the
files gzip-compressed (`<name>.gz`) or plain. The output is the decompressed IDX bytes,
verified by sha256, so it is the same whichever mirror served it.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import tensorflow as tf
import urllib3

from pipeline import summaries, tables
from pipeline.config import FetchParams, check_mirror
from pipeline.data import atomic_write, sha256
from pipeline.errors import ConfigError, FetchError
from pipeline.mnist import FILES

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"


@dataclass(frozen=True)
class Fetched:
    """What one file's fetch did: where it came from, how big, how long."""

    name: str
    mirror: str
    bytes: int
    seconds: float


class MirrorFailed(Exception):
    """This mirror could not deliver a verified copy; the reason is the message."""


def mirrors_to_try(params: FetchParams, environ: dict[str, str] = os.environ) -> list[str]:
    """The mirrors in order: $MNIST_MIRROR first when set, then params.yaml's list."""
    override = environ.get(MIRROR_ENV, "").strip()
    if not override:
        return list(params.mirrors)
    try:
        check_mirror(override)
    except ValueError as exc:
        raise ConfigError(f"{MIRROR_ENV}={override!r} is not usable: {exc}.") from None
    return [override] + [m for m in params.mirrors if m != override]


def http_pool(params: FetchParams) -> urllib3.PoolManager:
    """A connection pool with timeouts and bounded retries (connection errors, 429/5xx) with exponential backoff."""
    retry = urllib3.Retry(
        total=params.retries,
        read=0,  # a mirror that stalls mid-download goes straight to the next mirror
        backoff_factor=params.backoff_s,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=("GET",),
        raise_on_status=False,
    )
    return urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=params.timeout_s, read=params.timeout_s))


def read_from_mirror(mirror: str, name: str, pool: urllib3.PoolManager) -> bytes:
    """The bytes of `name` as `mirror` serves them, decompressed; raise MirrorFailed otherwise."""
    url = urlparse(mirror)
    if url.scheme in ("http", "https"):
        target = mirror.rstrip("/") + f"/{name}.gz"
        try:
            response = pool.request("GET", target, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise MirrorFailed(f"{target}: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            raise MirrorFailed(f"{target}: HTTP {response.status}")
        return _decompress(response.data, target)
    folder = Path(url.path if url.scheme == "file" else mirror)
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return _decompress(candidate.read_bytes(), str(candidate))
    raise MirrorFailed(f"neither {folder / name}.gz nor {folder / name} exists")


def _decompress(data: bytes, source: str) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise MirrorFailed(f"{source}: not a valid gzip file ({exc})") from None


def fetch_file(name: str, mirrors: list[str], out_dir: Path, pool: urllib3.PoolManager) -> Fetched:
    """Fetch one MNIST file from the first mirror that delivers a verified copy.

    A mirror that fails or serves bytes with the wrong sha256 is skipped for the next one.
    Nothing unverified is written; the file appears in `out_dir` only once verified.
    """
    expected = FILES[name]
    failures = []
    for mirror in mirrors:
        start = time.perf_counter()
        try:
            data = read_from_mirror(mirror, name, pool)
            digest = sha256(data)
            if digest != expected:
                raise MirrorFailed(f"{name} failed verification: sha256 {digest[:16]}..., expected {expected[:16]}...")
        except (MirrorFailed, OSError) as exc:
            log.warning("mirror %s could not give %s: %s", mirror, name, exc)
            failures.append(f"{mirror}: {exc}")
            continue
        atomic_write(out_dir / name, data)
        seconds = time.perf_counter() - start
        log.info("%s: %d bytes from %s in %.2f s, sha256 verified", name, len(data), mirror, seconds)
        return Fetched(name, mirror, len(data), seconds)
    raise FetchError(
        f"No mirror delivered a verified copy of {name}:\n  - "
        + "\n  - ".join(failures)
        + f"\nIf you have MNIST elsewhere, point {MIRROR_ENV} at it: a folder holding the four "
        f"files (as <name>.gz or plain) or a URL prefix, e.g. {MIRROR_ENV}=/data/mnist dvc repro. "
        "It is tried before the mirrors in params.yaml (fetch.mirrors) and changes no tracked value."
    )


def write_summaries(fetched: list[Fetched], logdir: Path) -> None:
    """TensorBoard: bytes and seconds per file, and which mirror served it."""
    with summaries.writer(logdir).as_default():
        for f in fetched:
            tf.summary.scalar(f"bytes/{f.name}", f.bytes, step=0)
            tf.summary.scalar(f"seconds/{f.name}", f.seconds, step=0)
        rows = [[f.name, f.mirror, f"{f.bytes:,}", f"{f.seconds:.2f}"] for f in fetched]
        tf.summary.text("fetch/files", tables.markdown(["file", "mirror", "bytes", "seconds"], rows), step=0)
