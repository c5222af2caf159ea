"""Shared helpers for the model and training tests (not a conftest: import it).

Also a worker script: `python tests/helpers_train.py job.json` trains one model with
pipeline.train.train_model in a process of its own (seed_everything switches on TF op
determinism for the whole process, and a resume test has to SIGKILL the trainer), then
writes the final weights, the optimizer state and the history where the job says.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from helpers_data import PARAMS_YAML, PYTHON, REPO, random_images
from pipeline.config import Params
from pipeline.data import Split, save_prepared

WORKER = Path(__file__).resolve()
N_TRAIN, N_VAL, N_TEST = 300, 100, 50


def synthetic_splits(seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL, n_test: int = N_TEST) -> dict[str, Split]:
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
    splits = synthetic_splits(seed)
    save_prepared(folder, splits)
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
    """The real params.yaml with models.<model> (and train) keys overridden."""
    params = Params.model_validate(edited_raw(model, train, **model_overrides))
    if model is not None:
        params.model(model)  # validate the edited block now, not in the middle of a test
    return params


# A small cnn: every kind of layer the real one has (conv, pool, dropout, dense), fast on a CPU.
SMALL_CNN = {
    "filters": [4, 8, 8],
    "dense_units": 16,
    "batch_size": 32,
    "epochs": 3,
}


# --- training in a subprocess --------------------------------------------------------------


def start_worker(job: dict[str, Any], job_file: Path) -> subprocess.Popen:
    """Start `python helpers_train.py job_file` with `job`; stdout and stderr go to files beside it."""
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

    from pipeline.data import load_prepared
    from pipeline.train import save_outputs, train_model

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    job = json.loads(Path(job_file).read_text())
    name = job["model"]
    params = params_with(name, job.get("train"), **job.get("overrides", {}))
    data = Path(job["data"])

    class KillAfterEpoch(keras.callbacks.Callback):
        """SIGKILL this process at the end of an epoch: after pipeline.train's Checkpoint has run."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == job["kill_after_epoch"]:
                os.kill(os.getpid(), signal.SIGKILL)

    extra = [KillAfterEpoch()] if job.get("kill_after_epoch") is not None else []
    result = train_model(name, params, load_prepared(data), data, Path(job["resume"]), Path(job["tensorboard"]), callbacks=extra)
    _save_arrays(Path(job["weights"]), [np.asarray(w) for w in result.model.get_weights()])
    _save_arrays(Path(job["optimizer"]), [np.asarray(v) for v in result.model.optimizer.variables])
    if job.get("out"):
        save_outputs(result, name, params.model(name), params, Path(job["out"]))
    Path(job["result"]).write_text(json.dumps({"history": result.history, "epochs_resumed": result.epochs_resumed}))


if __name__ == "__main__":
    _worker(sys.argv[1])
