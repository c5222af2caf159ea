"""pipeline.fetch against real files and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import gzip
import http.server
import logging
import shutil
import signal
import subprocess
import textwrap
import threading
import time

import pytest

from helpers import (
    LABEL_FILES,
    MIRROR,
    PYTHON,
    REPO,
    closed_port_url,
    serve_directory,
    serve_handler,
    silent_server,
)
from pipeline.config import FetchParams
from pipeline.data import remove_leftovers, sha256
from pipeline.errors import ConfigError, FetchError
from pipeline.fetch import MIRROR_ENV, fetch_file, http_pool, mirrors_to_try
from pipeline.mnist import FILES

needs_mirror = pytest.mark.skipif(
    not all((MIRROR / f"{name}.gz").is_file() for name in FILES),
    reason=f"the local MNIST mirror {MIRROR} is not here",
)


def params(*mirrors: str, timeout_s: float = 5.0) -> FetchParams:
    return FetchParams(mirrors=list(mirrors) or ["http://unused.invalid/"], timeout_s=timeout_s, retries=0, backoff_s=0)


@pytest.fixture
def good_mirror(tmp_path):
    """A copy of the real local mirror's four gzip files in tmp_path."""
    folder = tmp_path / "good"
    folder.mkdir()
    for name in FILES:
        shutil.copy(MIRROR / f"{name}.gz", folder / f"{name}.gz")
    return folder


@pytest.fixture
def corrupt_mirror(tmp_path):
    """The label files with ONE byte of their decompressed content changed, recompressed."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for name in LABEL_FILES:
        data = bytearray(gzip.decompress((MIRROR / f"{name}.gz").read_bytes()))
        data[100] = (data[100] + 1) % 10  # still a valid label file, but not MNIST's
        (folder / f"{name}.gz").write_bytes(gzip.compress(bytes(data)))
    return folder


def listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- checksum verification from a local folder -----------------------------------


@needs_mirror
def test_fetch_from_local_folder_writes_verified_decompressed_files(tmp_path, good_mirror):
    out = tmp_path / "raw"
    pool = http_pool(params(str(good_mirror)))
    for name, digest in FILES.items():
        fetched = fetch_file(name, [str(good_mirror)], out, pool)
        data = (out / name).read_bytes()
        assert data == gzip.decompress((good_mirror / f"{name}.gz").read_bytes())
        assert sha256(data) == digest
        assert fetched.name == name and fetched.mirror == str(good_mirror) and fetched.bytes == len(data)
    assert listing(out) == sorted(FILES)


@needs_mirror
def test_fetch_from_file_url_and_plain_files(tmp_path, good_mirror):
    plain = tmp_path / "plain"
    plain.mkdir()
    name = "t10k-labels-idx1-ubyte"
    (plain / name).write_bytes(gzip.decompress((good_mirror / f"{name}.gz").read_bytes()))
    out = tmp_path / "raw"
    fetched = fetch_file(name, [f"file://{plain}"], out, http_pool(params(str(plain))))
    assert sha256((out / name).read_bytes()) == FILES[name]
    assert fetched.mirror == f"file://{plain}"


@needs_mirror
def test_corrupt_local_copy_is_refused(tmp_path, corrupt_mirror):
    out = tmp_path / "raw"
    out.mkdir()
    name = "t10k-labels-idx1-ubyte"
    with pytest.raises(FetchError) as err:
        fetch_file(name, [str(corrupt_mirror)], out, http_pool(params(str(corrupt_mirror))))
    assert "failed verification" in str(err.value)
    assert listing(out) == []


# --- mirror fallback over HTTP -----------------------------------------------------


@needs_mirror
@pytest.mark.parametrize("name", LABEL_FILES)
def test_fetch_falls_back_from_corrupt_http_mirror(tmp_path, good_mirror, corrupt_mirror, caplog, name):
    out = tmp_path / "raw"
    with serve_directory(corrupt_mirror) as bad_url, serve_directory(good_mirror) as good_url:
        with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
            fetched = fetch_file(name, [bad_url, good_url], out, http_pool(params(bad_url, good_url)))
    assert fetched.mirror == good_url
    data = (out / name).read_bytes()
    assert sha256(data) == FILES[name]
    assert data == gzip.decompress((good_mirror / f"{name}.gz").read_bytes())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad_url in w and "failed verification" in w for w in warnings), warnings
    assert not any(good_url in w for w in warnings), warnings
    assert listing(out) == [name]


@needs_mirror
def test_every_mirror_failing_is_a_fetch_error_naming_each(tmp_path, corrupt_mirror):
    empty = tmp_path / "empty"  # served, but holds nothing: HTTP 404
    empty.mkdir()
    out = tmp_path / "raw"
    out.mkdir()
    name = "train-labels-idx1-ubyte"
    closed = closed_port_url()
    with serve_directory(corrupt_mirror) as bad_url, serve_directory(empty) as missing_url:
        mirrors = [bad_url, missing_url, closed]
        start = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetch_file(name, mirrors, out, http_pool(params(*mirrors)))
        assert time.monotonic() - start < 10
    message = str(err.value)
    lines = message.splitlines()
    assert name in lines[0]

    def line_of(mirror):
        found = [line for line in lines if line.startswith(f"  - {mirror}:")]
        assert len(found) == 1, f"{mirror} is not listed once in:\n{message}"
        return found[0]

    assert "failed verification" in line_of(bad_url)
    assert "HTTP 404" in line_of(missing_url)
    assert "Connection refused" in line_of(closed) or "NewConnectionError" in line_of(closed)
    assert MIRROR_ENV in message
    assert "Traceback" not in message
    assert listing(out) == []  # no final file, no .tmp-* file


# --- $MNIST_MIRROR -----------------------------------------------------------------


def test_mnist_mirror_env_is_tried_first():
    p = params("https://a.example/mnist/", "https://b.example/mnist/")
    assert mirrors_to_try(p, environ={}) == ["https://a.example/mnist/", "https://b.example/mnist/"]
    assert mirrors_to_try(p, environ={MIRROR_ENV: "  "}) == ["https://a.example/mnist/", "https://b.example/mnist/"]
    assert mirrors_to_try(p, environ={MIRROR_ENV: "/data/mnist"}) == [
        "/data/mnist",
        "https://a.example/mnist/",
        "https://b.example/mnist/",
    ]
    # A mirror already in the list is moved to the front, not tried twice.
    assert mirrors_to_try(p, environ={MIRROR_ENV: "https://b.example/mnist/"}) == [
        "https://b.example/mnist/",
        "https://a.example/mnist/",
    ]


@pytest.mark.parametrize("bad", ["htp://x", "ftp://host/mnist", "https://"])
def test_invalid_mnist_mirror_is_a_config_error(bad):
    with pytest.raises(ConfigError) as err:
        mirrors_to_try(params("https://a.example/mnist/"), environ={MIRROR_ENV: bad})
    assert MIRROR_ENV in str(err.value) and bad in str(err.value)


@needs_mirror
def test_mnist_mirror_env_serves_when_params_mirrors_fail(tmp_path, good_mirror):
    out = tmp_path / "raw"
    p = params(closed_port_url())
    mirrors = mirrors_to_try(p, environ={MIRROR_ENV: str(good_mirror)})
    fetched = fetch_file("t10k-labels-idx1-ubyte", mirrors, out, http_pool(p))
    assert fetched.mirror == str(good_mirror)
    assert sha256((out / "t10k-labels-idx1-ubyte").read_bytes()) == FILES["t10k-labels-idx1-ubyte"]


# --- atomicity under SIGKILL -------------------------------------------------------


def _run(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(PYTHON), "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


# The real atomic_write; os.fsync is the one point where it is held, with all the data
# written to the temporary file and the rename still to come.
ATOMIC_WRITE_HELD_AT_FSYNC = """
    import os, sys, time
    from pathlib import Path
    from pipeline import data

    def held_fsync(fd):
        print("written", flush=True)
        time.sleep(60)

    os.fsync = held_fsync
    data.atomic_write(Path(sys.argv[1]), b"n" * 1_000_000)
    print("finished", flush=True)
"""


@pytest.mark.parametrize("previous", [None, b"old and complete"])
def test_sigkill_during_atomic_write_leaves_no_partial_final_file(tmp_path, previous):
    out = tmp_path / "out"
    out.mkdir()
    final = out / "train-images-idx3-ubyte"
    if previous is not None:
        final.write_bytes(previous)
    proc = _run(ATOMIC_WRITE_HELD_AT_FSYNC, str(final))
    try:
        line = proc.stdout.readline()
        assert line == "written\n", proc.stderr.read() if not line else line
        tmp = [p for p in out.iterdir() if p.name.startswith(".tmp-")]
        assert len(tmp) == 1 and tmp[0].stat().st_size == 1_000_000  # killed mid-write indeed
    finally:
        _kill(proc)
    if previous is None:
        assert not final.exists()
    else:
        assert final.read_bytes() == previous
    remove_leftovers(out)
    assert listing(out) == ([] if previous is None else [final.name])


@needs_mirror
def test_sigkill_during_http_download_leaves_no_final_file(tmp_path):
    name = "train-labels-idx1-ubyte"
    body = (MIRROR / f"{name}.gz").read_bytes()
    half_sent, release = threading.Event(), threading.Event()

    class HalfThenStall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            half_sent.set()
            release.wait(30)

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            pass

    out = tmp_path / "raw"
    out.mkdir()
    (out / f".tmp-{name}-99999").write_bytes(b"left by an earlier killed run")
    script = """
        import sys
        from pathlib import Path
        from pipeline.config import FetchParams
        from pipeline.fetch import fetch_file, http_pool
        p = FetchParams(mirrors=[sys.argv[1]], timeout_s=60, retries=0, backoff_s=0)
        fetch_file(sys.argv[2], p.mirrors, Path(sys.argv[3]), http_pool(p))
        print("finished", flush=True)
    """
    with serve_handler(HalfThenStall) as url:
        proc = _run(script, url, name, str(out))
        try:
            assert half_sent.wait(30), proc.stderr.read() if proc.poll() is not None else "no request"
            assert proc.poll() is None  # still downloading
        finally:
            _kill(proc)
            release.set()
    assert not (out / name).exists()
    assert all(p.name.startswith(".tmp-") for p in out.iterdir())
    remove_leftovers(out)
    assert listing(out) == []


# --- timeouts ----------------------------------------------------------------------


def test_http_pool_times_out_on_a_silent_server(tmp_path):
    out = tmp_path / "raw"
    with silent_server() as url:
        p = FetchParams(timeout_s=0.5, retries=0, backoff_s=0, mirrors=[url])
        start = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetch_file("t10k-labels-idx1-ubyte", p.mirrors, out, http_pool(p))
        elapsed = time.monotonic() - start
    assert elapsed < 3, f"a 0.5 s timeout took {elapsed:.1f} s"
    assert url in str(err.value)
    assert "timed out" in str(err.value).lower() or "Timeout" in str(err.value)
    assert listing(out) == []


def test_http_pool_carries_timeout_and_retries():
    p = FetchParams(timeout_s=0.5, retries=3, backoff_s=0.25, mirrors=["https://a.example/"])
    pool = http_pool(p)
    timeout, retries = pool.connection_pool_kw["timeout"], pool.connection_pool_kw["retries"]
    assert timeout.connect_timeout == 0.5 and timeout.read_timeout == 0.5
    assert retries.total == 3 and retries.backoff_factor == 0.25
    assert 503 in retries.status_forcelist and 404 not in retries.status_forcelist


# --- bounded input: a mirror cannot make the fetch read or decompress without limit ------

CAP = 64 << 20  # pipeline/fetch.py's MAX_DOWNLOAD_BYTES and MAX_FILE_BYTES: MNIST's largest file is 47,040,016 bytes


def gzip_of_zeros(size: int) -> bytes:
    """A gzip file of `size` zero bytes, made in 1 MiB steps (a bomb: about 1/1000 of its content)."""
    import zlib

    packer, chunk, parts = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(1 << 20), []
    for _ in range(size >> 20):
        parts.append(packer.compress(chunk))
    parts.append(packer.flush())
    return b"".join(parts)


def test_a_gzip_bomb_in_a_mirror_folder_is_refused_before_it_is_decompressed(tmp_path):
    """256 MiB of zeros in a 256 KB file: refused after MAX_FILE_BYTES (64 MiB), naming the file and the mirror."""
    import tracemalloc

    folder = tmp_path / "bombs"
    folder.mkdir()
    name = "train-labels-idx1-ubyte"
    (folder / f"{name}.gz").write_bytes(gzip_of_zeros(256 << 20))
    out = tmp_path / "raw"
    tracemalloc.start()
    try:
        with pytest.raises(FetchError) as err:
            fetch_file(name, [str(folder)], out, http_pool(params(str(folder))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert f"  - {folder}: {folder / name}.gz decompresses to more than {CAP:,} bytes (64 MiB" in message, message
    assert peak < 2 * CAP, f"{peak:,} bytes allocated to refuse it"
    assert listing(out) == []


def test_a_mirror_file_larger_than_any_mnist_file_is_not_read(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    name = "t10k-labels-idx1-ubyte"
    with open(folder / name, "wb") as f:  # plain, sparse: nothing is written to the disk
        f.truncate(CAP + 1)
    with pytest.raises(FetchError) as err:
        fetch_file(name, [str(folder)], tmp_path / "raw", http_pool(params(str(folder))))
    assert f"  - {folder}: {folder / name} is larger than {CAP:,} bytes" in str(err.value), str(err.value)


@pytest.mark.parametrize("how", ["announced", "endless body", "content-encoding bomb"])
def test_an_http_mirror_sending_more_than_any_mnist_file_is_cut_off(tmp_path, how):
    """A Content-Length above MAX_DOWNLOAD_BYTES is refused before the body; a body without one is read up
    to MAX_DOWNLOAD_BYTES only, and so is one that urllib3 decodes (Content-Encoding: gzip)."""
    bomb = gzip_of_zeros(256 << 20) if how == "content-encoding bomb" else b""

    class TooMuch(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no Content-Length needed

        def do_GET(self):
            self.send_response(200)
            if how == "announced":
                self.send_header("Content-Length", str(10 << 30))
            if how == "content-encoding bomb":
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            try:
                if how == "content-encoding bomb":
                    self.wfile.write(bomb)
                elif how == "endless body":
                    chunk = b"x" * (1 << 20)
                    for _ in range((CAP >> 20) + 16):  # 16 MiB past the cap, then it ends
                        self.wfile.write(chunk)
                else:
                    self.wfile.write(b"x" * 1000)  # then nothing: the announced 10 GiB never come
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            pass

    name = "t10k-labels-idx1-ubyte"
    with serve_handler(TooMuch) as url:
        start = time.monotonic()
        with pytest.raises(FetchError) as err:
            fetch_file(name, [url], tmp_path / "raw", http_pool(params(url, timeout_s=10)))
        seconds = time.monotonic() - start
    expected = {"announced": f"announces {10 << 30:,} bytes, more than {CAP:,} bytes"}.get(how, f"sends more than {CAP:,} bytes")
    assert f"  - {url}: {url}{name}.gz {expected} (64 MiB, pipeline/fetch.py MAX_DOWNLOAD_BYTES)" in str(err.value), str(
        err.value
    )
    assert seconds < 9, f"{seconds:.1f} s: it waited for the body"
    assert listing(tmp_path / "raw") == []


# --- a mirror's credentials stay out of logs, messages and the TensorBoard summary ------

SECRETS = ("s3cret", "t0ken")


def with_secrets(url: str) -> str:
    """`url` (http://127.0.0.1:PORT/) with a user and password, as an internal mirror's URL may carry them."""
    return url.replace("http://", "http://mnist:s3cret@", 1)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:s3cret@mirror.example:8443/mnist/", "https://mirror.example:8443/mnist/"),
        ("https://t0ken@mirror.example/mnist/", "https://mirror.example/mnist/"),
        ("https://mirror.example/mnist/?token=t0ken&v=2#part", "https://mirror.example/mnist/?token=***&v=***"),
        ("https://mirror.example/mnist/?t0ken", "https://mirror.example/mnist/?***"),
        ("https://user:s3cret@[::1]:8080/m/", "https://[::1]:8080/m/"),
        ("https://user:s3cret@host:99999999/", "https://***"),
        ("https://mirror.example/mnist/", "https://mirror.example/mnist/"),
        ("file:///data/mnist", "file:///data/mnist"),
        ("/data/mnist", "/data/mnist"),
    ],
)
def test_redact_url_strips_user_password_and_query_values(url, shown):
    from pipeline.errors import redact_url

    assert redact_url(url) == shown


@needs_mirror
def test_a_mirrors_credentials_are_in_no_log_line_summary_or_message(tmp_path, good_mirror, caplog):
    """A mirror URL with a user and password (or a token in its query) serves as before; what is logged, raised
    and written into the fetch stage's TensorBoard text (a DVC output, pushed to remotes) shows it without them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import check_mirror
    from pipeline.fetch import write_summaries

    name = "t10k-labels-idx1-ubyte"
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve_directory(good_mirror) as good, serve_directory(empty) as missing:
        failing = [with_secrets(missing), with_secrets(closed_port_url()) + "?token=t0ken"]
        mirrors = [*failing, with_secrets(good)]
        with caplog.at_level(logging.INFO, logger="pipeline.fetch"):
            fetched = fetch_file(name, mirrors, tmp_path / "raw", http_pool(params(*mirrors)))
            with pytest.raises(FetchError) as err:
                fetch_file(name, failing, tmp_path / "raw2", http_pool(params(*failing)))
    assert sha256((tmp_path / "raw" / name).read_bytes()) == FILES[name]
    write_summaries([fetched], tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (table,) = events.Tensors("fetch/files")
    said = {
        "log": "\n".join(r.getMessage() for r in caplog.records),
        "error": str(err.value),
        "summary": table.tensor_proto.string_val[0].decode(),
        "events file": b"".join(p.read_bytes() for p in (tmp_path / "tb").rglob("*") if p.is_file()).decode("latin-1"),
    }
    for secret in SECRETS:
        for where, text in said.items():
            assert secret not in text, f"{secret} in the {where}:\n{text}"
    assert fetched.mirror == good  # the mirror that served, as logged and summarised
    assert f"  - {missing}: {missing}{name}.gz: HTTP 404" in said["error"], said["error"]
    assert f"{good} in" in said["log"] and good in said["summary"]
    with pytest.raises(ConfigError) as bad:
        mirrors_to_try(params(good), environ={MIRROR_ENV: "ftp://mnist:s3cret@host/mnist/"})
    assert "ftp://host/mnist/" in str(bad.value) and "s3cret" not in str(bad.value), str(bad.value)
    with pytest.raises(ValueError) as bad:
        check_mirror("https://mnist:s3cret@/mnist/")
    assert "s3cret" not in str(bad.value), str(bad.value)
