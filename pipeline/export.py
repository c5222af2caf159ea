"""Export a blessed model as a SavedModel in TF Serving's layout, and prove it in a fresh process.

`<out>/<version>/` is a SavedModel whose `serving_default` signature takes raw images,
uint8 [batch, 28, 28], normalises them inside the graph (the Keras model's Rescaling
layer) and returns `probabilities` (float32 [batch, 10]) and `class` (int64 [batch]).
The version folder appears only after the SavedModel was written and verified in a fresh
process, by a rename: a server watching `<out>` never sees half a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.data import atomic_write, load_prepared
from pipeline.errors import ExportError

EXPORT_FILE = "export.json"
SIGNATURE = "serving_default"


class ServingModule(tf.Module):
    """A Keras classifier behind a raw-pixel serving signature."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="images")])
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model(tf.cast(images, tf.float32), training=False)
        return {"probabilities": tf.nn.softmax(logits), "class": tf.argmax(logits, axis=1)}


def next_version(out: Path) -> int:
    """An integer version: seconds since the epoch, as TFX's pusher does, and above any existing one."""
    existing = [int(p.name) for p in out.glob("*") if p.name.isdigit()]
    return max([int(time.time())] + [v + 1 for v in existing])


def save_servable(model, folder: Path) -> None:
    """Write the SavedModel with its raw-pixel signature into `folder`."""
    module = ServingModule(model)
    tf.saved_model.save(module, str(folder), signatures={SIGNATURE: module.serve})


def verify_in_fresh_process(folder: Path, data: Path, predictions: Path, repeats: int) -> dict:
    """Reload the SavedModel in a new Python process and compare its test predictions with evaluate's.

    Returns what that process measured (agreement, latency); raises ExportError on a mismatch.
    """
    cmd = [sys.executable, "-m", "pipeline.export", str(folder), str(data), str(predictions), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"the exported model at {folder} failed its check in a fresh process:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_images(images: np.ndarray) -> np.ndarray:
    """Raise ExportError unless `images` is uint8 [batch, 28, 28] (or one [28, 28] image)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.dtype != np.uint8:
        raise ExportError(f"the model takes raw uint8 pixels (0..255), not {images.dtype}; convert with .astype('uint8').")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ExportError(f"the model takes images of shape [batch, 28, 28], not {list(images.shape)}; resize to 28x28 first.")
    return images


def predict(loaded, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a loaded SavedModel's serving signature on raw images, after checking them."""
    out = loaded.signatures[SIGNATURE](images=tf.constant(check_images(images)))
    return {k: v.numpy() for k, v in out.items()}


def latency_ms(loaded, images: np.ndarray, repeats: int) -> float:
    """Median milliseconds per call of the serving signature on `images`."""
    predict(loaded, images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(loaded, images)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _verify_main(folder: str, data: str, predictions: str, repeats: str) -> None:
    """Entry point of the fresh process: predict the test set from raw pixels, compare, measure."""
    from pipeline.evaluate import read_predictions

    loaded = tf.saved_model.load(folder)
    test = load_prepared(Path(data))["test"]
    expected = read_predictions(Path(predictions))
    got = np.concatenate([predict(loaded, test.x[i : i + 1000])["class"] for i in range(0, len(test.y), 1000)])
    mismatches = int((got != expected).sum())
    if mismatches:
        print(f"{mismatches} of {len(expected)} test predictions differ from evaluate's", file=sys.stderr)
        sys.exit(1)
    result = {
        "test_images": int(len(expected)),
        "accuracy": float((got == test.y).mean()),
        "latency_ms_batch_1": round(latency_ms(loaded, test.x[:1], int(repeats)), 3),
        "latency_ms_batch_256": round(latency_ms(loaded, test.x[:256], int(repeats)), 3),
    }
    print(json.dumps(result))


def describe_signature(folder: Path) -> str:
    """The serving signature's inputs and outputs, as text."""
    loaded = tf.saved_model.load(str(folder))
    fn = loaded.signatures[SIGNATURE]
    inputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_input_signature[1].items()}
    outputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_outputs.items()}
    return f"signature `{SIGNATURE}`\n\ninputs: {inputs}\n\noutputs: {outputs}"


def write_record(out: Path, record: dict) -> None:
    atomic_write(out / EXPORT_FILE, (json.dumps(record, indent=2) + "\n").encode())


if __name__ == "__main__":
    _verify_main(*sys.argv[1:5])
