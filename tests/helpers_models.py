"""Shared helpers for the evaluate, export, report and CLI tests (not a conftest: import it).

Synthetic MNIST-shaped data that a linear model can partly learn, tiny trained models
saved as the train stage saves them, and the Prefect settings under which the tests run
flows in-process (see prefect_settings).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from helpers_data import PARAMS_YAML, REPO, random_images
from pipeline.data import Split

VENV_BIN = REPO / ".venv" / "bin"


def synthetic_split(rng: np.random.Generator, n: int, templates: np.ndarray) -> Split:
    """`n` non-blank uint8 images with labels 0..9 (every digit present): noise plus a faint class template."""
    y = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(y)
    noise = random_images(rng, n).astype(np.int32) // 2  # 0..127
    x = np.clip(noise + templates[y], 0, 255).astype(np.uint8)
    return Split(x, y)


def synthetic_splits(seed: int = 0, n_train: int = 300, n_val: int = 60, n_test: int = 200) -> dict[str, Split]:
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


def load_test_params():
    from pipeline.config import load_params

    return load_params(PARAMS_YAML)


TINY = {
    "logreg": {"epochs": 3, "batch_size": 64, "learning_rate": 0.01},
    "cnn": {"epochs": 1, "batch_size": 64, "filters": [4, 8], "dense_units": 16},
}


def train_tiny(name: str, splits: dict[str, Split], out: Path, seed: int = 1) -> Path:
    """Train registry model `name` briefly (TINY overrides) and save it with train.save_outputs into `out`."""
    import keras

    from pipeline import train

    params = load_test_params()
    p = params.model(name).model_copy(update=TINY[name])
    keras.utils.set_random_seed(seed)
    tr, val = splits["train"], splits["val"]
    steps = -(-len(tr.y) // p.batch_size)
    model = train.compile_model(name, p, steps)
    start = time.perf_counter()
    history = model.fit(
        tr.x.astype(np.float32), tr.y.astype(np.int32), batch_size=p.batch_size, epochs=p.epochs,
        validation_data=(val.x.astype(np.float32), val.y.astype(np.int32)), verbose=0, shuffle=True,
    )
    seconds = time.perf_counter() - start
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    hist["seconds"] = [seconds / p.epochs] * p.epochs
    train.save_outputs(train.TrainResult(model, hist, 0, seconds), name, p, params, out)
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


@contextlib.contextmanager
def prefect_settings() -> Iterator[str]:
    """Run flows in-process against a Prefect server; yield its API URL (for stage subprocesses too).

    The server is TEST_PREFECT_API_URL's when set, else PREFECT_API_URL's (conftest.py's session
    server, or a developer's), else Prefect's temporary server, started once per test process
    with its own PREFECT_HOME.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

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
