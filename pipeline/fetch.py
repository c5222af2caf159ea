"""Fetch MNIST from a list of mirrors, verify every file, write it atomically.

A mirror is an http(s):// URL prefix, a file:// URL or a local directory holding the
files gzip-compressed (`<name>.gz`) or plain. The output is the decompressed IDX bytes,
verified by sha256, so it is the same whichever mirror served it.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import urllib3

from pipeline import summaries, tables
from pipeline.config import FetchParams, check_mirror
from pipeline.data import atomic_write, sha256
from pipeline.errors import ConfigError, FetchError, redact_url
from pipeline.mnist import FILES

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
# What one mirror may hand over for one file before its sha256 is known. MNIST's largest file,
# train-images-idx3-ubyte, is 47,040,016 bytes decompressed and 9.9 MB gzipped; a mirror may also
# serve it plain. 64 MiB each leaves room for every MNIST file and bounds the memory that a wrong or
# hostile mirror (an endless body, a gzip bomb) can take.
MAX_DOWNLOAD_BYTES = 64 << 20  # the bytes read from a mirror for one file (gzipped or plain)
MAX_FILE_BYTES = 64 << 20  # the bytes one file may decompress to


@dataclass(frozen=True)
class Fetched:
    """What one file's fetch did: where it came from (redact_url), how big, how long."""

    name: str
    mirror: str
    bytes: int
    seconds: float


class MirrorFailed(Exception):
    """This mirror could not deliver a verified copy; the reason is the message."""


def mirrors_to_try(params: FetchParams, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The mirrors in order: $MNIST_MIRROR first when set, then params.yaml's list."""
    override = environ.get(MIRROR_ENV, "").strip()
    if not override:
        return list(params.mirrors)
    try:
        check_mirror(override)
    except ValueError as exc:
        raise ConfigError(f"{MIRROR_ENV}={redact_url(override)!r} is not usable: {exc}.") from None
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
        return _decompress(_download(target, pool), redact_url(target))
    folder = Path(url.path if url.scheme == "file" else mirror)
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            with open(candidate, "rb") as f:
                data = f.read(MAX_DOWNLOAD_BYTES + 1)
            if len(data) > MAX_DOWNLOAD_BYTES:
                raise MirrorFailed(_too_big(str(candidate), "is larger than", MAX_DOWNLOAD_BYTES, "MAX_DOWNLOAD_BYTES"))
            return _decompress(data, str(candidate))
    raise MirrorFailed(f"neither {folder / name}.gz nor {folder / name} exists")


def _download(target: str, pool: urllib3.PoolManager) -> bytes:
    """The body of `target`, at most MAX_DOWNLOAD_BYTES (raise MirrorFailed beyond, or on any HTTP failure).
    Its messages show the URL without credentials or query values (redact_url)."""
    shown = redact_url(target)
    try:
        response = pool.request("GET", target, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise MirrorFailed(_http_failure(shown, exc)) from None
    try:
        if response.status != 200:
            raise MirrorFailed(f"{shown}: HTTP {response.status}")
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
            raise MirrorFailed(
                _too_big(shown, f"announces {int(length):,} bytes, more than", MAX_DOWNLOAD_BYTES, "MAX_DOWNLOAD_BYTES")
            )
        data = response.read(MAX_DOWNLOAD_BYTES + 1)  # urllib3 bounds a Content-Encoding's output by the same amount
        if len(data) > MAX_DOWNLOAD_BYTES:
            raise MirrorFailed(_too_big(shown, "sends more than", MAX_DOWNLOAD_BYTES, "MAX_DOWNLOAD_BYTES"))
        return data
    except urllib3.exceptions.HTTPError as exc:
        raise MirrorFailed(_http_failure(shown, exc)) from None
    finally:
        response.close()  # a body left unread must not go back to the pool


def _http_failure(shown: str, exc: urllib3.exceptions.HTTPError) -> str:
    """What went wrong, without the request's path and query that urllib3's MaxRetryError repeats."""
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason else exc
    return f"{shown}: {type(reason).__name__}: {reason}"


def _decompress(data: bytes, source: str) -> bytes:
    """`data` itself, or if gzipped its content, at most MAX_FILE_BYTES (raise MirrorFailed beyond, or if it is no valid gzip)."""
    if data[:2] != b"\x1f\x8b":
        return data
    parts: list[bytes] = []
    size = 0
    try:
        while data[:2] == b"\x1f\x8b":  # one gzip member after another, as gzip.decompress reads them
            member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            while not member.eof:  # 1 MiB at a time: never much more in memory than the cap
                parts.append(member.decompress(data, 1 << 20))
                data = member.unconsumed_tail
                if not parts[-1] and not data:
                    raise MirrorFailed(f"{source}: not a valid gzip file (it ends before its end-of-stream marker)")
                size += len(parts[-1])
                if size > MAX_FILE_BYTES:
                    raise MirrorFailed(_too_big(source, "decompresses to more than", MAX_FILE_BYTES, "MAX_FILE_BYTES"))
            data = member.unused_data
    except zlib.error as exc:
        raise MirrorFailed(f"{source}: not a valid gzip file ({exc})") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_big(source: str, what: str, cap: int, constant: str) -> str:
    return (
        f"{source} {what} {cap:,} bytes ({cap >> 20} MiB, pipeline/fetch.py {constant}): no MNIST file is "
        "that large, so this is not the file asked for; not read further"
    )


def fetch_file(name: str, mirrors: list[str], out_dir: Path, pool: urllib3.PoolManager) -> Fetched:
    """Fetch one MNIST file from the first mirror that delivers a verified copy.

    A mirror that fails or serves bytes with the wrong sha256 is skipped for the next one.
    Nothing unverified is written; the file appears in `out_dir` only once verified.
    """
    expected = FILES[name]
    failures = []
    for mirror in mirrors:
        shown = redact_url(mirror)  # what logs, messages and the TensorBoard summary show of it
        start = time.perf_counter()
        try:
            data = read_from_mirror(mirror, name, pool)
            digest = sha256(data)
            if digest != expected:
                raise MirrorFailed(f"{name} failed verification: sha256 {digest[:16]}..., expected {expected[:16]}...")
        except (MirrorFailed, OSError) as exc:
            log.warning("mirror %s could not give %s: %s", shown, name, exc)
            failures.append(f"{shown}: {exc}")
            continue
        atomic_write(out_dir / name, data)
        seconds = time.perf_counter() - start
        log.info("%s: %d bytes from %s in %.2f s, sha256 verified", name, len(data), shown, seconds)
        return Fetched(name, shown, len(data), seconds)
    raise FetchError(
        f"No mirror delivered a verified copy of {name}:\n  - "
        + "\n  - ".join(failures)
        + f"\nIf you have MNIST elsewhere, point {MIRROR_ENV} at it: a folder holding the four "
        f"files (as <name>.gz or plain) or a URL prefix, e.g. {MIRROR_ENV}=/data/mnist dvc repro. "
        "It is tried before the mirrors in params.yaml (fetch.mirrors) and changes no tracked value."
    )


def write_summaries(fetched: list[Fetched], logdir: Path) -> None:
    """TensorBoard: bytes and seconds per file, and which mirror served it."""
    with summaries.EventWriter(logdir) as events:
        for f in fetched:
            events.scalar(f"bytes/{f.name}", f.bytes)
            events.scalar(f"seconds/{f.name}", f.seconds)
        rows = [[f.name, f.mirror, f"{f.bytes:,}", f"{f.seconds:.2f}"] for f in fetched]
        events.text("fetch/files", tables.markdown(["file", "mirror", "bytes", "seconds"], rows))
