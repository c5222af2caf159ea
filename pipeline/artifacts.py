"""The one owner of the files the stages write under data/: their names, and how each is written and read.

dvc.yaml gives every stage its folders (and lists the files in them as outputs and
dependencies); inside a folder, the file names and formats are fixed here, and stages
read each other's outputs only through these functions. Every write is atomic: a reader
sees the previous file or the complete new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import keras
import numpy as np

from pipeline.data import Split, atomic_path, atomic_write
from pipeline.errors import DataError

# data/prepared/: the preprocess stage's arrays
PREPARED_FILE = "mnist.npz"
SPLITS = ("train", "val", "test")

# data/models/<model>/: a train stage's output
MODEL_FILE = "model.keras"  # the model with its optimizer state
HISTORY_FILE = "history.csv"  # one row per epoch
META_FILE = "meta.json"  # what was trained, with which params, how long
HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")

# data/resume/<model>/epoch-NNNN/: a train stage's checkpoints (not a DVC output)
CHECKPOINT_PREFIX = "epoch-"
CHECKPOINT_STATE = "state.json"

# data/evaluate/<model>/: an evaluate stage's output
METRICS_FILE = "metrics.json"  # DVC metrics
PREDICTIONS_FILE = "predictions.csv"  # DVC plot: confusion matrix
PER_CLASS_FILE = "per_class.csv"  # DVC plot: per-class accuracy
CONFUSION_FILE = "confusion.png"
CURVES_FILE = "curves.png"

# data/export/<model>/: an export stage's output, <version>/ folders beside the record
EXPORT_RECORD = "export.json"


# --- generic ------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, atomically."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path, made_by: str) -> Any:
    """A JSON file written by stage `made_by`; a missing or unreadable one is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the {made_by} stage first (dvc repro).") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); run the {made_by} stage again (dvc repro --force).") from None


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue().encode()


# --- data/prepared ------------------------------------------------------------------------


def save_prepared(folder: Path, splits: dict[str, Split]) -> None:
    """Write the splits as one uncompressed .npz (no pickled objects), atomically."""
    arrays = {}
    for name, split in splits.items():
        arrays[f"x_{name}"], arrays[f"y_{name}"] = split.x, split.y
    with atomic_path(Path(folder) / PREPARED_FILE) as tmp:
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


def write_data_report(path: Path, report: dict) -> None:
    write_json(path, report)


def read_data_report(path: Path) -> dict:
    return read_json(path, "preprocess")


# --- data/models/<model> ------------------------------------------------------------------


def history_rows(history: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    """history.csv's header and rows: one row per epoch, numbered from 1."""
    keys = [k for k in HISTORY_COLUMNS if k in history]
    epochs = len(history.get("loss", []))
    return ["epoch", *keys], [[str(i + 1), *(f"{history[k][i]:.6g}" for k in keys)] for i in range(epochs)]


def write_model_folder(out: Path, model: keras.Model, history: dict[str, list[float]], meta: dict) -> None:
    """model.keras, history.csv and meta.json, published together as one folder."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save(tmp / MODEL_FILE)
        (tmp / HISTORY_FILE).write_bytes(_csv_bytes(*history_rows(history)))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)


def read_model(folder: Path) -> keras.Model:
    """The Keras model saved in a model or checkpoint folder (its custom layers must be registered:
    import pipeline.models.registry)."""
    return keras.models.load_model(Path(folder) / MODEL_FILE)


def read_meta(folder: Path) -> dict:
    return read_json(Path(folder) / META_FILE, "train")


def read_history(folder: Path) -> np.ndarray:
    """history.csv as a structured array with one field per column (epoch, loss, ...)."""
    return np.atleast_1d(np.genfromtxt(Path(folder) / HISTORY_FILE, delimiter=",", names=True))


# --- data/resume/<model> ------------------------------------------------------------------


def write_checkpoint(folder: Path, epochs_done: int, model: keras.Model, state: dict) -> Path:
    """Save the model and `state` as checkpoint `epoch-NNNN` atomically; delete the older ones."""
    target = Path(folder) / f"{CHECKPOINT_PREFIX}{epochs_done:04d}"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        model.save(tmp / MODEL_FILE)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
    for old in Path(folder).glob(f"{CHECKPOINT_PREFIX}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(folder: Path) -> list[tuple[Path, dict | None]]:
    """Each checkpoint folder, newest first, with its state (None if unreadable or without its model)."""
    found = []
    for ckpt in sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        try:
            state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        except (OSError, ValueError):
            state = None
        found.append((ckpt, state if (ckpt / MODEL_FILE).is_file() else None))
    return found


# --- data/evaluate/<model> ----------------------------------------------------------------


def write_evaluation(out: Path, metrics: dict, actual: np.ndarray, predicted: np.ndarray, per_class: dict[str, np.ndarray]) -> None:
    """metrics.json (DVC metrics), predictions.csv and per_class.csv (DVC plots)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, metrics)
    atomic_write(out / PREDICTIONS_FILE, _csv_bytes(["actual", "predicted"], zip(actual.tolist(), predicted.tolist())))
    columns = ("precision", "recall", "f1", "accuracy")
    rows = [[d, *(f"{per_class[k][d]:.6f}" for k in columns)] for d in range(len(per_class["accuracy"]))]
    atomic_write(out / PER_CLASS_FILE, _csv_bytes(["digit", *columns], rows))


def write_evaluation_pictures(out: Path, confusion_png: bytes, curves_png: bytes) -> None:
    """confusion.png and curves.png, which data/report.md shows."""
    atomic_write(out / CONFUSION_FILE, confusion_png)
    atomic_write(out / CURVES_FILE, curves_png)


def read_metrics(folder: Path) -> dict:
    return read_json(Path(folder) / METRICS_FILE, "evaluate")


def read_predictions(folder: Path) -> np.ndarray:
    """The predicted classes from predictions.csv, in test-set order."""
    return np.loadtxt(Path(folder) / PREDICTIONS_FILE, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)[:, 1]


# --- data/export/<model> ------------------------------------------------------------------


def versions(folder: Path) -> list[int]:
    """The integer version folders in an export folder, lowest first."""
    return sorted(int(p.name) for p in Path(folder).glob("*") if p.name.isdigit() and p.is_dir())


def write_export_record(out: Path, record: dict) -> None:
    write_json(Path(out) / EXPORT_RECORD, record)


def read_export_record(out: Path) -> dict:
    return read_json(Path(out) / EXPORT_RECORD, "export")


# --- data/leaderboard.json, data/report.md -----------------------------------------------


def write_leaderboard(path: Path, leaderboard: dict) -> None:
    write_json(path, leaderboard)


def write_report(path: Path, markdown: str) -> None:
    atomic_write(path, markdown.encode())
