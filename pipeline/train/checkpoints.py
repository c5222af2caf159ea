"""Checkpoint and resume: the model with its optimizer state after every epoch, resumed only if it matches.

The resume folder (`data/resume/<model>/`) is not a DVC output: DVC records a train stage
only when it exits successfully, after the final outputs are written, and the stage then
deletes the resume folder. A checkpoint whose params, data or TensorFlow version differ
from the current ones is discarded, never resumed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from pipeline import artifacts
from pipeline.config import ModelParams, TrainParams, params_hash
from pipeline.train.precision import training_policy

log = logging.getLogger(__name__)


def fingerprint(name: str, p: ModelParams, seed: int, train: TrainParams, data_file: Path) -> str:
    """What a checkpoint must match to be resumed: model, its params, seed, data, TF version, the precision
    it trains in (precision `auto` differs between CPUs)."""
    stat = data_file.stat()
    parts = [
        name,
        params_hash(p),
        params_hash(train),
        str(seed),
        f"{stat.st_size}:{stat.st_mtime_ns}",
        tf.__version__,
        training_policy(p.precision),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def latest_checkpoint(folder: Path, expected: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint in `folder` made with the same fingerprint, if any."""
    for ckpt, state in artifacts.checkpoints(folder):
        if state is not None and state.get("fingerprint") == expected:
            return ckpt, state
        log.info("discarding checkpoint %s: it is incomplete, or was made with other params, data or TensorFlow", ckpt)
    return None


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped: its classes are Any
    """After every epoch, save the model, its optimizer state and the history so far, atomically."""

    def __init__(self, folder: Path, fingerprint: str, history: dict[str, list[float]]) -> None:
        super().__init__()
        self.folder, self.fingerprint, self.history = folder, fingerprint, history

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        state = {"epochs_done": epoch + 1, "fingerprint": self.fingerprint, "history": self.history}
        artifacts.write_checkpoint(self.folder, epoch + 1, self.model, state)
