"""Shared helpers for the data, fetch, config and preprocess tests (not a conftest: import it)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import write_idx

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
PARAMS_YAML = REPO / "params.yaml"
# The real local MNIST mirror: the four files gzip-compressed, beside the checkout.
SHARED_MIRROR = (REPO / ".." / "shared" / "datasets" / "mnist").resolve()
LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` distinct-by-chance 28x28 uint8 images, none of them blank."""
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 14, 14] = rng.integers(1, 256, size=n, dtype=np.uint8)  # never all zero
    return images


def write_raw(folder: Path, train_x, train_y, test_x, test_y) -> Path:
    """Write the four IDX files, as the fetch stage leaves them, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(write_idx(np.asarray(x, dtype=np.uint8)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(write_idx(np.asarray(y, dtype=np.uint8)))
    return folder


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` (relative) with its size and mtime in ns: a snapshot to compare."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without the per-request log lines on stderr."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a free port) in a thread; yield its URL prefix."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    with serve_handler(handler) as url:
        yield url


@contextlib.contextmanager
def serve_handler(handler) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port) in a thread; yield the URL prefix; shut down after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yield its URL prefix."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)  # hold it open, read nothing, answer nothing

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        sock.close()


def closed_port_url() -> str:
    """The URL of a port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
