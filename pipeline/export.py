"""Export a blessed model as a SavedModel, and prove it in a fresh process.

`<out>/saved_model/` is a SavedModel whose `serving_default` signature takes raw images,
uint8 [batch, height, width], normalises them inside the graph (the Keras model's Rescaling
layer) and returns `probabilities` (float32 [batch, classes]) and `class` (int64 [batch]).
It appears only after it was written and verified in a fresh process, and the same weights
give the same bytes, so the export stage is a deterministic, run-cacheable DVC stage. The
publish stage (serving.py) copies it into TF Serving's versioned layout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import tensorflow as tf

from pipeline import artifacts, summaries
from pipeline.data import atomic_path, disk_bytes, remove_leftovers
from pipeline.errors import ExportError
from pipeline.mnist import IMAGE_SHAPE

if TYPE_CHECKING:
    import keras

SIGNATURE = "serving_default"


class ServingModule(tf.Module):  # type: ignore[misc]  # tensorflow is untyped: its classes are Any
    """A Keras classifier behind a raw-pixel serving signature."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name="images")])  # type: ignore[untyped-decorator]  # tensorflow is untyped
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model(tf.cast(images, tf.float32), training=False)
        return {"probabilities": tf.nn.softmax(logits), "class": tf.argmax(logits, axis=1)}


def prepare(out: Path, logdir: Path) -> None:
    """Make the export folder ready: create it, delete what an earlier or interrupted export left in it
    (DVC does this before it runs the stage; a run by hand does it here), clear the TensorBoard run."""
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    shutil.rmtree(out / artifacts.SAVED_MODEL, ignore_errors=True)
    for name in (artifacts.EXPORT_RECORD, artifacts.TIMINGS_FILE, artifacts.CARD_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(logdir, ignore_errors=True)


def refusal(model: str, metrics: dict[str, Any]) -> str | None:
    """Why model `model` is not exported (its test accuracy is under its gate), or None if it is blessed."""
    if metrics["blessed"]:
        return None
    return (
        f"model {model} is not exported: its test accuracy {metrics['accuracy']:.4f} is under its gate "
        f"{metrics['gate']:.4f} (params.yaml gates.{model})"
    )


def staging_folder(out: Path) -> Path:
    """Where the SavedModel is written and checked before it takes its final name (a name no reader takes for it)."""
    return out / f".tmp-{artifacts.SAVED_MODEL}"


@contextmanager
def staged(out: Path, model: keras.Model) -> Iterator[Path]:
    """Yield the staging folder; when the block ends without error it becomes `<out>/saved_model` by
    one rename, else it is deleted (a full disk is reported with the space the model's weights need)."""
    with atomic_path(out / artifacts.SAVED_MODEL, artifacts.model_bytes(model), tmp=staging_folder(out)) as staging:
        yield staging


def refused_record(model: str, metrics: dict[str, Any], reason: str) -> dict[str, Any]:
    """export.json of a model under its gate: not exported, and why."""
    return {"model": model, "blessed": False, "reason": reason, "accuracy": metrics["accuracy"], "gate": metrics["gate"]}


def exported_record(model: str, folder: Path, check: dict[str, Any]) -> dict[str, Any]:
    """export.json of an exported SavedModel: where it is, its size and digest, what the fresh-process check found."""
    return {
        "model": model,
        "blessed": True,
        "saved_model": folder.name,
        "bytes": disk_bytes(folder),
        "sha256": artifacts.tree_digest(folder),
        "test_images": check["test_images"],
        "accuracy": check["accuracy"],
    }


def save_servable(model: keras.Model, folder: Path) -> None:
    """Write the SavedModel with its raw-pixel signature into `folder`; the same weights give the same bytes."""
    module = ServingModule(model)
    tf.saved_model.save(module, str(folder), signatures={SIGNATURE: module.serve})
    content_uuid(folder)


def content_uuid(folder: Path) -> None:
    """Replace the random UUID that TensorFlow writes into fingerprint.pb at every save by one derived
    from the fingerprint's content hashes: the only bytes of a SavedModel that differ between two saves."""
    from tensorflow.core.protobuf import fingerprint_pb2

    path = folder / "fingerprint.pb"
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
    fingerprint.uuid = ""
    digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).digest()
    fingerprint.uuid = str(int.from_bytes(digest[:16], "big"))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def verify_in_fresh_process(folder: Path, data: Path, evaluation: Path, repeats: int) -> dict[str, Any]:
    """Reload the SavedModel in a new Python process and compare its test predictions with evaluate's.

    The process is `python -m pipeline.export ...`, forked from the warm server when the stage runs
    under one (it has imported TensorFlow, and never built or loaded a model), else started anew.
    `data` is the prepared-data folder, `evaluation` the evaluate stage's folder. Returns what that
    process measured (agreement, latency, the signature it served); raises ExportError on a mismatch.
    """
    cmd = [sys.executable, "-m", "pipeline.warm", "-m", __name__, str(folder), str(data), str(evaluation), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"the exported model at {folder} failed its check in a fresh process:\n{done.stderr.strip()[-2000:]}")
    return cast("dict[str, Any]", json.loads(done.stdout.strip().splitlines()[-1]))


def check_images(images: np.ndarray) -> np.ndarray:
    """Raise ExportError unless `images` is uint8 [batch, height, width] (or one [height, width] image)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    height, width = IMAGE_SHAPE
    if images.dtype != np.uint8:
        raise ExportError(f"the model takes raw uint8 pixels (0..255), not {images.dtype}; convert with .astype('uint8').")
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ExportError(
            f"the model takes images of shape [batch, {height}, {width}], not {list(images.shape)}; resize to {height}x{width} first."
        )
    return images


def predict(loaded: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a loaded SavedModel's serving signature on raw images, after checking them."""
    out = loaded.signatures[SIGNATURE](images=tf.constant(check_images(images)))
    return {k: v.numpy() for k, v in out.items()}


def latency_ms(loaded: Any, images: np.ndarray, repeats: int) -> float:
    """Median milliseconds per call of the serving signature on `images`."""
    predict(loaded, images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(loaded, images)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _verify_main(folder: str, data: str, evaluation: str, repeats: str) -> None:
    """Entry point of the fresh process: predict the test set from raw pixels, compare, measure."""
    loaded = tf.saved_model.load(folder)
    test = artifacts.load_prepared(Path(data))["test"]
    expected = artifacts.read_predictions(Path(evaluation))
    got = np.concatenate([predict(loaded, test.x[i : i + 1000])["class"] for i in range(0, len(test.y), 1000)])
    mismatches = int((got != expected).sum())
    if mismatches:
        print(f"{mismatches} of {len(expected)} test predictions differ from evaluate's", file=sys.stderr)
        sys.exit(1)
    result = {
        "test_images": len(expected),
        "accuracy": round(float((got == test.y).mean()), 6),
        "latency_ms_batch_1": round(latency_ms(loaded, test.x[:1], int(repeats)), 3),
        "latency_ms_batch_256": round(latency_ms(loaded, test.x[:256], int(repeats)), 3),
        "signature": describe_signature(loaded),
    }
    print(json.dumps(result))


def describe_signature(loaded: Any) -> str:
    """The serving signature's inputs and outputs of a loaded SavedModel, as text."""
    fn = loaded.signatures[SIGNATURE]
    inputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_input_signature[1].items()}
    outputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_outputs.items()}
    return f"signature `{SIGNATURE}`\n\ninputs: {inputs}\n\noutputs: {outputs}"


def latency_timings(check: dict[str, Any]) -> dict[str, Any]:
    """timings.json of an export: the latency figures of the fresh-process check."""
    return {k: v for k, v in check.items() if k.startswith("latency_ms")}


def write_summaries(logdir: Path, record: dict[str, Any], timings: dict[str, Any] | None, signature: str | None) -> None:
    """TensorBoard: why the model was not exported, or its signature, size and latency."""
    with summaries.writer(logdir).as_default():
        if not record["blessed"]:
            tf.summary.text("export/status", record["reason"], step=0)
            return
        tf.summary.text("export/signature", signature or "", step=0)
        tf.summary.scalar("export/size_bytes", record["bytes"], step=0)
        for key, value in (timings or {}).items():
            tf.summary.scalar(f"export/{key}", value, step=0)


if __name__ == "__main__":
    _verify_main(*sys.argv[1:5])
