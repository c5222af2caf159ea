"""Helpers shared by the tests (not a conftest: import it), and a worker script.

- Data: small IDX files, HTTP mirrors and silent servers on 127.0.0.1, synthetic splits.
- Models: tiny trained models saved as the train stage saves them; the real params.yaml, edited.
- Prefect: the settings under which tests run flows in-process (see prefect_settings).
- `python tests/helpers.py job.json` trains one model with pipeline.train.loop.train_model in a
  process of its own (seed_everything switches on TF op determinism for the whole process, and
  a resume test has to SIGKILL the trainer), then writes the final weights, the optimizer state
  and the history where the job says.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import yaml

from pipeline import artifacts
from pipeline.config import Params, load_params
from pipeline.data import Split, write_idx
from pipeline.models.params import PARAM_TYPES

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
VENV_BIN = REPO / ".venv" / "bin"
PARAMS_YAML = REPO / "params.yaml"
# The real local MNIST mirror: the four files gzip-compressed, beside the checkout.
MIRROR = (REPO / ".." / "shared" / "datasets" / "mnist").resolve()
LABEL_FILES = ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")
WORKER = Path(__file__).resolve()


# --- data ---------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` KiB mounted on `folder` (created if needed) while the block runs.

    Mounting needs root: the test is skipped without it (CI runs as root). resize_disk gives
    it more room, as a user who frees space would.
    """
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def resize_disk(folder: Path, size_kb: int) -> None:
    """Give the tmpfs mounted on `folder` a new size, keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(folder)], check=True)


def flip_a_bit(path: Path, offset: int) -> None:
    """Damage `path` in place as a failing disk would: one bit, with its size, mode and times kept."""
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.chmod(st.st_mode & 0o777)


def cache_object_of(project: Path, path: str) -> Path:
    """The DVC cache object of workspace file `path`: a file output of dvc.lock, or a file in a folder output."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    cache = project / ".dvc" / "cache" / "files" / "md5"
    if path in outs:
        md5 = outs[path]
    else:
        folder = next(f for f in outs if path.startswith(f + "/"))
        listing = json.loads((cache / outs[folder][:2] / outs[folder][2:]).read_text())
        md5 = next(e["md5"] for e in listing if e["relpath"] == path[len(folder) + 1 :])
    return cache / md5[:2] / md5[2:]


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
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


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


# --- models -------------------------------------------------------------------------------


def load_stage(name: str) -> ModuleType:
    """stages/<name>.py as a module (stages/ is not a package), to call its flow in-process."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_split(rng: np.random.Generator, n: int, templates: np.ndarray) -> Split:
    """`n` non-blank uint8 images with labels 0..9 (every digit present): noise plus a faint class template."""
    y = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(y)
    noise = random_images(rng, n).astype(np.int32) // 2  # 0..127
    x = np.clip(noise + templates[y], 0, 255).astype(np.uint8)
    return Split(x, y)


def learnable_splits(seed: int = 0, n_train: int = 300, n_val: int = 60, n_test: int = 200) -> dict[str, Split]:
    """train/val/test splits; the class signal is strong enough to learn in a few epochs, not perfectly."""
    rng = np.random.default_rng(seed)
    templates = np.zeros((10, 28, 28), dtype=np.int32)
    for d in range(10):
        mask = rng.random((28, 28)) < 0.12
        templates[d][mask] = 40  # a sparse faint pattern per digit, buried in noise: ~90% learnable
    return {
        "train": synthetic_split(rng, n_train, templates),
        "val": synthetic_split(rng, n_val, templates),
        "test": synthetic_split(rng, n_test, templates),
    }


def load_test_params() -> Params:
    """The real params.yaml, every model block typed."""
    return load_params(PARAMS_YAML, PARAM_TYPES)


TINY = {
    "logreg": {"epochs": 3, "batch_size": 64, "learning_rate": 0.01},
    "cnn": {"epochs": 1, "batch_size": 64, "filters": [4, 8], "dense_units": 16},
}


def tiny_live(model_dir: Path) -> Path:
    """train_tiny's DVCLive folder for the model folder `model_dir`."""
    return model_dir.with_name(f"{model_dir.name}-live")


def train_tiny(name: str, splits: dict[str, Split], out: Path, seed: int = 1) -> Path:
    """Train registry model `name` briefly (TINY overrides) and save it as the train stage does into `out`,
    its DVCLive folder in tiny_live(out)."""
    import keras

    from pipeline.train import loop
    from pipeline.train.callbacks import LiveMetrics

    params = load_test_params()
    p = params.model(name).model_copy(update=TINY[name])
    keras.utils.set_random_seed(seed)
    tr, val = splits["train"], splits["val"]
    steps = -(-len(tr.y) // p.batch_size)
    model = loop.compile_model(name, p, steps)
    start = time.perf_counter()
    history = model.fit(
        tr.x.astype(np.float32),
        tr.y.astype(np.int32),
        batch_size=p.batch_size,
        epochs=p.epochs,
        validation_data=(val.x.astype(np.float32), val.y.astype(np.int32)),
        verbose=0,
        shuffle=True,
        callbacks=[LiveMetrics(tiny_live(out), {})],
    )
    seconds = time.perf_counter() - start
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    hist["seconds"] = [seconds / p.epochs] * p.epochs
    loop.save_trained(
        loop.TrainResult(model, hist, 0, seconds),
        name,
        p,
        params.seed,
        out,
        out.parent / f".resume-{name}",
        out.parent / f"tensorboard-{name}",
    )
    return out


# --- Prefect --------------------------------------------------------------------------

_PREFECT_HOME: Path | None = None


def prefect_home() -> Path:
    """One PREFECT_HOME for this test process, so no test touches the user's ~/.prefect database."""
    global _PREFECT_HOME
    if _PREFECT_HOME is None:
        _PREFECT_HOME = Path(tempfile.mkdtemp(prefix="mnist-tests-prefect-"))
        atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
    return _PREFECT_HOME


NO_SERVER_ENV = "MNIST_TESTS_NO_SERVER"  # set by conftest.py when the selected tests exclude the services tier


@contextlib.contextmanager
def prefect_settings() -> Iterator[str]:
    """Run flows in-process against a Prefect server; yield its API URL (for stage subprocesses too).

    The server is TEST_PREFECT_API_URL's when set, else PREFECT_API_URL's (conftest.py's session
    server, or a developer's), else Prefect's temporary server, started once per test process
    with its own PREFECT_HOME.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    if os.environ.get(NO_SERVER_ENV):
        import pytest

        pytest.fail("this test runs a flow, so it needs a Prefect server: mark it `services` (tests/tiers.py)")
    api = os.environ.get("TEST_PREFECT_API_URL") or os.environ.get("PREFECT_API_URL")
    updates = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if api:
        updates[PREFECT_API_URL] = api
    else:
        updates[PREFECT_HOME] = str(prefect_home())
    with temporary_settings(updates=updates):
        url = api or temporary_server_url()
        try:
            yield url
        finally:
            drain_prefect_workers()


def temporary_server_url() -> str:
    """Start (once per process) the temporary server Prefect would start itself, with a patient timeout.

    Prefect's own start gives up after 20 s of sleeps, too soon on a busy 2-core machine.
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses when no API URL is set
    if not server.running:
        server.start(timeout=300)
        atexit.register(_stop_quietly, server)  # runs before the stop Prefect registered (atexit is LIFO)
    return server.api_url


def _stop_quietly(server) -> None:
    """Stop the temporary server without its log line: at exit, pytest has closed the stream it would go to."""
    import logging

    logging.getLogger("prefect").disabled = True
    server.stop()


def stage_env(tmp_path: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for a stage subprocess: no inherited PREFECT_* settings, its own PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def drain_prefect_workers() -> None:
    """Send the flow runs' queued logs and events now, while the server still runs.

    Left queued, they are sent at interpreter exit, after the temporary server stopped,
    and the interpreter then hangs for minutes retrying (as prefect_test_harness notes).
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


# --- training ------------------------------------------------------------------------------

N_TRAIN, N_VAL, N_TEST = 300, 100, 50


def striped_splits(seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL, n_test: int = N_TEST) -> dict[str, Split]:
    """Random uint8 28x28 digits, labels 0..9; each label also lights two rows, so there is something to learn."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        x = random_images(rng, n) // 2
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        for i, label in enumerate(y):
            x[i, 2 * label + 4 : 2 * label + 6, 4:24] = 255
        splits[name] = Split(x, y)
    return splits


def write_data(folder: Path, seed: int = 0) -> dict[str, Split]:
    """Write synthetic prepared data (folder/mnist.npz, as the preprocess stage does); return the splits."""
    splits = striped_splits(seed)
    artifacts.save_prepared(folder, splits)
    return splits


def raw_params() -> dict[str, Any]:
    """The real params.yaml, as a plain dict to edit."""
    return yaml.safe_load(PARAMS_YAML.read_text())


def edited_raw(model: str | None = None, train: dict | None = None, **model_overrides: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw_params())
    if model is not None:
        raw["models"][model].update(model_overrides)
    raw["train"].update(train or {})
    return raw


def params_with(model: str | None = None, train: dict | None = None, **model_overrides: Any) -> Params:
    """The real params.yaml with models.<model> (and train) keys overridden, every block typed."""
    path = Path(tempfile.mkdtemp(prefix="params-")) / "params.yaml"
    path.write_text(yaml.safe_dump(edited_raw(model, train, **model_overrides), sort_keys=False))
    try:
        return load_params(path, PARAM_TYPES)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


# A small cnn: every kind of layer the real one has (conv, pool, dropout, dense), fast on a CPU.
SMALL_CNN = {
    "filters": [4, 8, 8],
    "dense_units": 16,
    "batch_size": 32,
    "epochs": 3,
}


# --- training in a subprocess --------------------------------------------------------------


def start_worker(job: dict[str, Any], job_file: Path) -> subprocess.Popen:
    """Start `python tests/helpers.py job_file` with `job`; stdout and stderr go to files beside it."""
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    out = open(job_file.with_suffix(".out"), "w")
    err = open(job_file.with_suffix(".err"), "w")
    try:
        return subprocess.Popen([str(PYTHON), str(WORKER), str(job_file)], cwd=REPO, env=env, stdout=out, stderr=err)
    finally:
        out.close()
        err.close()


def finish_worker(proc: subprocess.Popen, job_file: Path, timeout: float = 240) -> tuple[int, str]:
    """Wait for a worker; return its exit status and its stderr."""
    rc = proc.wait(timeout=timeout)
    return rc, job_file.with_suffix(".err").read_text()


def run_worker(job: dict[str, Any], job_file: Path, timeout: float = 240) -> tuple[int, str]:
    return finish_worker(start_worker(job, job_file), job_file, timeout)


def load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as npz:
        return [npz[k] for k in sorted(npz.files)]


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    np.savez(path, **{f"a{i:04d}": np.asarray(a) for i, a in enumerate(arrays)})


def _worker(job_file: str) -> None:
    import logging

    import keras

    from pipeline.train.loop import save_trained, train_model

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    job = json.loads(Path(job_file).read_text())
    name = job["model"]
    params = params_with(name, job.get("train"), **job.get("overrides", {}))
    data = Path(job["data"])

    class KillAfterEpoch(keras.callbacks.Callback):
        """SIGKILL this process at the end of an epoch: after the Checkpoint callback has run."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == job["kill_after_epoch"]:
                os.kill(os.getpid(), signal.SIGKILL)

    extra = [KillAfterEpoch()] if job.get("kill_after_epoch") is not None else []
    p = params.model(name)
    resume = Path(job["resume"])
    live = Path(job["live"]) if job.get("live") else None
    result = train_model(name, p, params.seed, params.train, artifacts.load_prepared(data), data, resume, live, callbacks=extra)
    _save_arrays(Path(job["weights"]), [np.asarray(w) for w in result.model.get_weights()])
    _save_arrays(Path(job["optimizer"]), [np.asarray(v) for v in result.model.optimizer.variables])
    if job.get("out"):
        save_trained(result, name, p, params.seed, Path(job["out"]), resume, Path(job["tensorboard"]))
    Path(job["result"]).write_text(json.dumps({"history": result.history, "epochs_resumed": result.epochs_resumed}))


if __name__ == "__main__":
    _worker(sys.argv[1])
