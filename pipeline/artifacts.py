"""The one owner of the files the stages write under data/: their names, and how each is written and read.

dvc.yaml gives every stage its folders (and lists the files in them as outputs and
dependencies); inside a folder, the file names and formats are fixed here, and stages
read each other's outputs only through these functions. Every write is atomic: a reader
sees the previous file or the complete new one, never half of one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pipeline.data import Split, atomic_path, atomic_write, remove_leftovers
from pipeline.errors import DataError

if TYPE_CHECKING:  # Keras loads only where a model is read: the publish stage and the CLI do without it
    import keras

# data/prepared/: the preprocess stage's arrays
PREPARED_FILE = "mnist.npz"
SPLITS = ("train", "val", "test")

# Every stage output is the same bytes for the same inputs, except the timings files
# (seconds and throughputs, never DVC metrics) and TensorBoard event files (wall times).
TIMINGS_FILE = "timings.json"

# data/models/<model>/: a train stage's output
MODEL_FILE = "model.keras"  # the model with its optimizer state
META_FILE = "meta.json"  # what was trained, with which params and versions
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date, for every entry of model.keras

# data/live/<model>/: DVCLive's record of a train stage (pipeline.train.callbacks.LiveMetrics)
LIVE_METRICS = "plots/metrics"  # train/<metric>.tsv and eval/<metric>.tsv: one row per epoch, step from 0
HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")  # Keras's names

# data/resume/<model>/: a train stage's checkpoints epoch-NNNN/ and the TensorBoard events of the
# run in progress (not DVC outputs: they survive a killed run and are moved or deleted at the end)
CHECKPOINT_PREFIX = "epoch-"
CHECKPOINT_STATE = "state.json"
LIVE_TENSORBOARD = "tensorboard"

# data/evaluate/<model>/: an evaluate stage's output
METRICS_FILE = "metrics.json"  # DVC metrics, under the model's name: {"cnn": {"accuracy": ...}}
PREDICTIONS_FILE = "predictions.csv"  # DVC plot: confusion matrix
PER_CLASS_FILE = "per_class.csv"  # DVC plot: per-class accuracy
CONFUSION_FILE = "confusion.png"
CURVES_FILE = "curves.png"

# data/export/<model>/: an export stage's output: the SavedModel of a blessed model, and the record
SAVED_MODEL = "saved_model"
EXPORT_RECORD = "export.json"
CARD_FILE = "card.md"  # the model card of an exported model (pipeline/card.py)

# <serving base>/<model>/<version>/: published SavedModels (TF Serving's layout; not a DVC output)


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


def write_timings(folder: Path, timings: dict[str, Any]) -> None:
    """timings.json: how long a stage's work took (differs between identical runs; not a DVC metric)."""
    write_json(Path(folder) / TIMINGS_FILE, timings)


def read_timings(folder: Path, made_by: str) -> dict[str, Any]:
    return cast("dict[str, Any]", read_json(Path(folder) / TIMINGS_FILE, made_by))


def tree_digest(folder: Path) -> str:
    """SHA-256 over a folder's relative file names and contents: equal digests, equal folders."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    needed = sum(a.nbytes for a in arrays.values())
    with atomic_path(Path(folder) / PREPARED_FILE, needed) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: ** might fill allow_pickle; the keys are x_ and y_<split>


def load_prepared(folder: Path) -> dict[str, Split]:
    """Read the splits written by save_prepared; pickled content is refused."""
    path = Path(folder) / PREPARED_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: Split(npz[f"x_{name}"], npz[f"y_{name}"]) for name in SPLITS}
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the preprocess stage first (dvc repro preprocess).") from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path} is not a valid prepared file ({exc}); run the preprocess stage again (dvc repro preprocess)."
        ) from None


def split_sizes(folder: Path) -> dict[str, int]:
    """Images per split of the prepared file (its labels alone are read)."""
    path = Path(folder) / PREPARED_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: len(npz[f"y_{name}"]) for name in SPLITS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} cannot be read ({exc}); run the preprocess stage again (dvc repro preprocess).") from None


def write_data_report(path: Path, report: dict[str, Any]) -> None:
    write_json(path, report)


def read_data_report(path: Path) -> dict[str, Any]:
    return cast("dict[str, Any]", read_json(path, "preprocess"))


# --- data/models/<model> ------------------------------------------------------------------


def model_bytes(model: keras.Model) -> int:
    """The bytes of a model's variables and its optimizer's: about what saving it writes."""
    variables = list(model.weights) + (list(model.optimizer.variables) if model.optimizer else [])
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def save_keras(model: keras.Model, path: Path) -> None:
    """model.save(path), then rewrite the archive without what differs between two saves of the same
    weights: Keras stamps the save date into metadata.json and the time into the zip entries, and
    writes Python object ids (memory addresses) as `shared_object_id` in config.json. Same weights,
    same bytes, whether the model was trained in one go or resumed from a checkpoint."""
    model.save(path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as dst:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(_stable_config(json.loads(data), {})).encode()
            dst.writestr(zipfile.ZipInfo(info.filename, FIXED_ZIP_TIME), data, compress_type=info.compress_type)


def _stable_config(node: Any, numbers: dict[int, int]) -> Any:
    """A Keras config with its `shared_object_id`s (memory addresses) replaced: none on a dtype policy
    (a value: sharing one changes nothing, and a reloaded model does not share it), and 1, 2, ...
    in order of appearance elsewhere, which keeps every sharing the loader restores."""
    if isinstance(node, list):
        return [_stable_config(item, numbers) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _stable_config(value, numbers) for key, value in node.items()}
    if "shared_object_id" in node:
        if node.get("class_name") == "DTypePolicy":
            del node["shared_object_id"]
        else:
            node["shared_object_id"] = numbers.setdefault(node["shared_object_id"], len(numbers) + 1)
    return node


def write_model_folder(out: Path, model: keras.Model, meta: dict[str, Any], timings: dict[str, Any]) -> None:
    """model.keras, meta.json and timings.json, published together as one folder."""
    remove_leftovers(out.parent, out.name)  # from an earlier write that was killed
    with atomic_path(out, model_bytes(model)) as tmp:
        tmp.mkdir(parents=True)
        save_keras(model, tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_timings(tmp, timings)
        if out.exists():
            shutil.rmtree(out)


def read_model(folder: Path) -> keras.Model:
    """The Keras model saved in a model or checkpoint folder (its custom layers must be registered:
    import pipeline.models.registry)."""
    import keras

    return keras.models.load_model(Path(folder) / MODEL_FILE)


def read_meta(folder: Path) -> dict[str, Any]:
    return cast("dict[str, Any]", read_json(Path(folder) / META_FILE, "train"))


def read_history(live: Path) -> np.ndarray:
    """The per-epoch metrics DVCLive wrote in `live` (data/live/<model>), as a structured array: one row
    per epoch, the fields `epoch` (from 1) and each of HISTORY_COLUMNS that was logged."""
    from dvclive.utils import standardize_metric_name

    columns: dict[str, np.ndarray] = {}
    steps = np.zeros(0)
    for key in HISTORY_COLUMNS:
        tsv = Path(live) / LIVE_METRICS / f"{standardize_metric_name(key, 'dvclive.keras')}.tsv"
        if tsv.exists():
            table = np.atleast_1d(np.genfromtxt(tsv, delimiter="\t", names=True))
            steps, columns[key] = table["step"], table[table.dtype.names[1]]  # type: ignore[index]  # names=True: a structured array
    if not columns:
        raise DataError(
            f"no per-epoch metrics in {Path(live) / LIVE_METRICS}: run the model's train stage first (dvc repro train@<model>)"
        )
    history = np.zeros(len(steps), dtype=[("epoch", float), *((key, float) for key in columns)])
    history["epoch"] = steps + 1
    for key, values in columns.items():
        history[key] = values
    return history


# --- data/resume/<model> ------------------------------------------------------------------


def live_tensorboard(resume_dir: Path) -> Path:
    """Where a training run writes its TensorBoard events until it completes."""
    return Path(resume_dir) / LIVE_TENSORBOARD


def write_checkpoint(folder: Path, epochs_done: int, model: keras.Model, state: dict[str, Any]) -> Path:
    """Save the model and `state` as checkpoint `epoch-NNNN` atomically; delete the older ones.

    The state records the model file's SHA-256, so that a checkpoint damaged later is never resumed."""
    target = Path(folder) / f"{CHECKPOINT_PREFIX}{epochs_done:04d}"
    with atomic_path(target, model_bytes(model)) as tmp:
        tmp.mkdir()
        model.save(tmp / MODEL_FILE)
        state = {**state, "model_sha256": file_sha256(tmp / MODEL_FILE)}
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
    for old in Path(folder).glob(f"{CHECKPOINT_PREFIX}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(folder: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Each checkpoint folder, newest first, with its state: None if the state is unreadable, or the
    model file is missing or not the one the state recorded (truncated or damaged since)."""
    found = []
    for ckpt in sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        try:
            state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
            intact = isinstance(state, dict) and state.get("model_sha256") == file_sha256(ckpt / MODEL_FILE)
        except (OSError, ValueError):
            intact = False
        found.append((ckpt, state if intact else None))
    return found


# --- data/evaluate/<model> ----------------------------------------------------------------


def write_evaluation(
    out: Path,
    model: str,
    metrics: dict[str, Any],
    timings: dict[str, Any],
    actual: np.ndarray,
    predicted: np.ndarray,
    per_class: dict[str, np.ndarray],
) -> None:
    """metrics.json (DVC metrics), timings.json, predictions.csv and per_class.csv (DVC plots).

    The metrics sit under the model's name, so that DVC names them `cnn.accuracy` rather than
    `data/evaluate/cnn/metrics.json:accuracy` in `dvc exp show` and `dvc metrics diff`.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # from an earlier write that was killed
    write_json(out / METRICS_FILE, {model: metrics})
    write_timings(out, timings)
    atomic_write(out / PREDICTIONS_FILE, _csv_bytes(["actual", "predicted"], zip(actual.tolist(), predicted.tolist())))
    columns = ("precision", "recall", "f1", "accuracy")
    rows = [[d, *(f"{per_class[k][d]:.6f}" for k in columns)] for d in range(len(per_class["accuracy"]))]
    atomic_write(out / PER_CLASS_FILE, _csv_bytes(["digit", *columns], rows))


def write_evaluation_pictures(out: Path, confusion_png: bytes, curves_png: bytes) -> None:
    """confusion.png and curves.png, which data/report.md shows."""
    atomic_write(out / CONFUSION_FILE, confusion_png)
    atomic_write(out / CURVES_FILE, curves_png)


def read_metrics(folder: Path) -> dict[str, Any]:
    """A model's test metrics (the one entry of its metrics.json)."""
    path = Path(folder) / METRICS_FILE
    data = read_json(path, "evaluate")
    if not isinstance(data, dict) or len(data) != 1:
        raise DataError(
            f"{path} should hold one model's metrics under its name; run the evaluate stage again (dvc repro --force)."
        )
    return next(iter(data.values()))


def read_per_class(folder: Path) -> dict[str, np.ndarray]:
    """per_class.csv as one array per column (digit, precision, recall, f1, accuracy)."""
    table = np.atleast_1d(np.genfromtxt(Path(folder) / PER_CLASS_FILE, delimiter=",", names=True))
    return {name: table[name] for name in table.dtype.names}  # type: ignore[union-attr]  # names=True: a structured array


def read_predictions(folder: Path) -> np.ndarray:
    """The predicted classes from predictions.csv, in test-set order."""
    return read_labels_and_predictions(folder)[1]


def read_labels_and_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """predictions.csv's two columns, the true digit and the predicted one, in test-set order."""
    table = np.loadtxt(Path(folder) / PREDICTIONS_FILE, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 0], table[:, 1]


# --- data/export/<model>, <serving base>/<model> -------------------------------------------


def versions(folder: Path) -> list[int]:
    """The integer version folders in a serving folder, lowest first."""
    return sorted(int(p.name) for p in Path(folder).glob("*") if p.name.isdigit() and p.is_dir())


def write_export_record(out: Path, record: dict[str, Any]) -> None:
    write_json(Path(out) / EXPORT_RECORD, record)


def write_card(out: Path, markdown: str) -> None:
    atomic_write(Path(out) / CARD_FILE, markdown.encode())


def read_export_record(out: Path) -> dict[str, Any]:
    return cast("dict[str, Any]", read_json(Path(out) / EXPORT_RECORD, "export"))


# --- data/leaderboard.json, data/report.md -----------------------------------------------


def write_leaderboard(path: Path, leaderboard: dict[str, Any]) -> None:
    write_json(path, leaderboard)


def write_report(path: Path, markdown: str) -> None:
    atomic_write(path, markdown.encode())
