"""A model's scores on the test set, and the quality gate that decides whether it is exported."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.data import Split
from pipeline.mnist import NUM_CLASSES


@dataclass(frozen=True)
class Evaluation:
    """A model's test results."""

    metrics: dict[str, Any]  # DVC metrics: quality figures only
    timings: dict[str, Any]  # inference throughput (differs between identical runs)
    probabilities: np.ndarray  # float32 [n, classes]
    predictions: np.ndarray  # int [n]
    confusion: np.ndarray  # int [classes, classes], rows = true digit, columns = predicted
    per_class: dict[str, np.ndarray]  # precision, recall, f1, accuracy per digit


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts of (true, predicted) pairs."""
    return np.bincount(y_true.astype(int) * NUM_CLASSES + y_pred.astype(int), minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall (= per-class accuracy) and F1 per digit; 0 where undefined."""
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": recall}


def passes_gate(accuracy: float, gate: float) -> bool:
    """The quality gate (TFX's "blessing"): a model is exported only if its test accuracy reaches its gate."""
    return accuracy >= gate


def inference_function(model: keras.Model, image_shape: tuple[int, ...]) -> tf.types.experimental.PolymorphicFunction:
    """`model(batch, training=False)` as one tf.function for float32 batches of any size.

    The logits are those of `model.predict`, bit for bit, without its per-call tf.data pipeline and
    its retrace for a new number of batches (docs/performance.md has the times).
    """
    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    return tf.function(lambda batch: model(batch, training=False), input_signature=[spec])


def evaluate_model(model: keras.Model, test: Split, gate: float, batch_size: int) -> Evaluation:
    """Predict the test set, score it, and decide the quality gate (blessing).

    The metrics are quality figures only, the same for the same model and data; the inference
    throughput, which is not, is in `timings`.
    """
    x = test.x.astype(np.float32)
    forward = inference_function(model, x.shape[1:])
    forward(x[:batch_size])  # warm-up: tracing is not throughput
    start = time.perf_counter()
    logits = np.concatenate([forward(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)])
    seconds = time.perf_counter() - start
    # The compiled loss plus any weight penalty, as model.evaluate reports it, without a second pass over the test set.
    loss = float(model.compute_loss(y=test.y.astype(np.int32), y_pred=logits, training=False))
    probabilities = tf.nn.softmax(logits).numpy()
    predictions = logits.argmax(axis=1)
    confusion = confusion_matrix(test.y, predictions)
    per_class = per_class_scores(confusion)
    accuracy = float((predictions == test.y).mean())
    metrics = {  # few and short: `dvc exp show --only-changed` fits a 120-column terminal (per_class.csv has the rest)
        "accuracy": round(accuracy, 6),
        "loss": round(loss, 6),
        "gate": gate,
        "blessed": passes_gate(accuracy, gate),
    }
    timings = {"eval_seconds": round(seconds, 3), "eval_images_per_s": round(len(test.y) / seconds, 1)}
    return Evaluation(metrics, timings, probabilities, predictions, confusion, per_class)
