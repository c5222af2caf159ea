"""Evaluate a trained model on the 10,000 test images: metrics, DVC plot files, the quality gate."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import train
from pipeline.data import NUM_CLASSES, Split, atomic_write

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
PER_CLASS_FILE = "per_class.csv"


@dataclass(frozen=True)
class Evaluation:
    """A model's test results."""

    metrics: dict
    probabilities: np.ndarray  # float32 [n, 10]
    predictions: np.ndarray  # int [n]
    confusion: np.ndarray  # int [10, 10], rows = true digit, columns = predicted
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


def evaluate_model(model: keras.Model, meta: dict, test: Split, gate: float, batch_size: int) -> Evaluation:
    """Predict the test set, score it, and decide the quality gate (blessing)."""
    x = test.x.astype(np.float32)
    model.predict(x[:batch_size], batch_size=batch_size, verbose=0)  # warm-up: tracing is not throughput
    start = time.perf_counter()
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    seconds = time.perf_counter() - start
    scores = model.evaluate(x, test.y.astype(np.int32), batch_size=batch_size, verbose=0, return_dict=True)
    probabilities = tf.nn.softmax(logits).numpy()
    predictions = logits.argmax(axis=1)
    confusion = confusion_matrix(test.y, predictions)
    per_class = per_class_scores(confusion)
    accuracy = float((predictions == test.y).mean())
    metrics = {
        "model": meta["model"],
        "accuracy": round(accuracy, 6),
        "loss": round(float(scores["loss"]), 6),
        "macro_precision": round(float(per_class["precision"].mean()), 6),
        "macro_recall": round(float(per_class["recall"].mean()), 6),
        "macro_f1": round(float(per_class["f1"].mean()), 6),
        "test_images": int(len(test.y)),
        "gate": gate,
        "blessed": accuracy >= gate,
        "parameters": meta["parameters"],
        "epochs": meta["epochs"],
        "val_accuracy": meta["val_accuracy"],
        "train_seconds": meta["train_seconds"],
        "eval_images_per_s": round(len(test.y) / seconds, 1),
    }
    return Evaluation(metrics, probabilities, predictions, confusion, per_class)


def write_outputs(ev: Evaluation, test: Split, out: Path) -> None:
    """metrics.json (DVC metrics), predictions.csv and per_class.csv (DVC plots)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / METRICS_FILE, (json.dumps(ev.metrics, indent=2) + "\n").encode())
    rows = ["actual,predicted"] + [f"{a},{p}" for a, p in zip(test.y, ev.predictions)]
    atomic_write(out / PREDICTIONS_FILE, ("\n".join(rows) + "\n").encode())
    lines = ["digit,precision,recall,f1,accuracy"]
    for d in range(NUM_CLASSES):
        lines.append(f"{d}," + ",".join(f"{ev.per_class[k][d]:.6f}" for k in ("precision", "recall", "f1", "accuracy")))
    atomic_write(out / PER_CLASS_FILE, ("\n".join(lines) + "\n").encode())


def read_predictions(path: Path) -> np.ndarray:
    """The predicted classes from a predictions.csv written by write_outputs."""
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)[:, 1]


# --- pictures: for data/report.md and TensorBoard ---------------------------------------


def confusion_figure(confusion: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(np.log1p(confusion), cmap="Blues")
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true digit", title=title)
    return fig


def curves_figure(history_csv: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.genfromtxt(history_csv, delimiter=",", names=True)
    h = np.atleast_1d(h)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        left.plot(h["epoch"], h[key], marker="o", label=label)
    for key, label in (("accuracy", "train"), ("val_accuracy", "validation")):
        right.plot(h["epoch"], h[key], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    right.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    left.legend(), right.legend()
    return fig


def misclassified_figure(test: Split, ev: Evaluation, count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(ev.predictions != test.y)[:count]
    cols = 10
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(test.x[i], cmap="gray_r")
        ax.set_title(f"true {test.y[i]} / pred {ev.predictions[i]}", fontsize=6)
    return fig


def write_pictures(ev: Evaluation, history_csv: Path, name: str, out: Path) -> None:
    """confusion.png and curves.png, shown by data/report.md."""
    from pipeline.summaries import figure_png

    atomic_write(out / "confusion.png", figure_png(confusion_figure(ev.confusion, f"{name}: confusion matrix")))
    atomic_write(out / "curves.png", figure_png(curves_figure(history_csv, name)))


def pr_curve_counts(scores: np.ndarray, positive: np.ndarray, thresholds: int = 101) -> dict[str, np.ndarray]:
    """True/false positive/negative counts and precision/recall at evenly spaced thresholds."""
    cuts = np.linspace(0, 1, thresholds)
    predicted = scores[None, :] >= cuts[:, None]
    tp = (predicted & positive).sum(axis=1).astype(float)
    fp = (predicted & ~positive).sum(axis=1).astype(float)
    fn = positive.sum() - tp
    tn = (~positive).sum() - fp
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    recall = tp / max(positive.sum(), 1)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall}


def write_summaries(model: keras.Model, ev: Evaluation, test: Split, name: str, logdir: Path, grid: int, sample: int) -> None:
    """TensorBoard: confusion matrix, misclassified digits, per-class accuracy, PR curves, filters, embeddings."""
    from tensorboard.plugins.pr_curve import summary as pr_summary

    from pipeline import summaries

    with summaries.writer(logdir).as_default():
        tf.summary.scalar("test/accuracy", ev.metrics["accuracy"], step=0)
        tf.summary.scalar("test/loss", ev.metrics["loss"], step=0)
        tf.summary.image("confusion_matrix", summaries.png_to_tensor(summaries.figure_png(confusion_figure(ev.confusion, name))), step=0)
        tf.summary.image("misclassified", summaries.png_to_tensor(summaries.figure_png(misclassified_figure(test, ev, grid))), step=0)
        rows = []
        for d in range(NUM_CLASSES):
            tf.summary.scalar(f"per_class_accuracy/{d}", ev.per_class["accuracy"][d], step=0)
            rows.append([d] + [f"{ev.per_class[k][d]:.4f}" for k in ("precision", "recall", "f1")])
            # The PR-curve plugin has no TF2 summary op; its raw-data protobuf is written as is.
            c = pr_curve_counts(ev.probabilities[:, d], test.y == d)
            pb = pr_summary.raw_data_pb(
                f"pr_curve/digit_{d}", true_positive_counts=c["tp"], false_positive_counts=c["fp"],
                true_negative_counts=c["tn"], false_negative_counts=c["fn"], precision=c["precision"],
                recall=c["recall"], num_thresholds=len(c["tp"]),
            )
            pb.value[0].tag = f"pr_curve/digit_{d}"  # raw_data_pb appends "/pr_curves" to the tag
            tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
        tf.summary.text("per_class", summaries.markdown_table(["digit", "precision", "recall", "f1"], rows), step=0)
        write_conv_views(model, test, name)
    write_embedding(model, test, logdir, sample)


def write_conv_views(model: keras.Model, test: Split, name: str) -> None:
    """For models with convolutions: the first layer's filters and its feature maps for a few digits."""
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        return
    first = convs[0]
    kernel = first.get_weights()[0]  # [F, F, in, K]
    k = kernel[:, :, 0, :]
    k = (k - k.min()) / max(float(k.max() - k.min()), 1e-12)
    filters = np.kron(np.moveaxis(k, -1, 0), np.ones((8, 8)))  # upscale each FxF filter
    from pipeline.summaries import digit_grid

    tf.summary.image(f"filters/{first.name}", digit_grid((filters * 255).astype(np.uint8), columns=8), step=0)
    probe = keras.Model(model.inputs[0], first.output)
    maps = probe(test.x[:4].astype(np.float32)).numpy()  # [4, H, W, K]
    for i, fmap in enumerate(maps):
        m = np.moveaxis(fmap, -1, 0)
        m = (255 * (m - m.min()) / max(float(m.max() - m.min()), 1e-12)).astype(np.uint8)
        tf.summary.image(f"feature_maps/{first.name}/test_image_{i}_digit_{test.y[i]}", digit_grid(m, columns=8), step=0)


def embedding_layer(model: keras.Model) -> keras.layers.Layer:
    """The last hidden layer (the input of the output layer); the logits for models without one."""
    candidates = [layer for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Activation))]
    return candidates[-2] if len(candidates) >= 2 else candidates[-1]


def write_embedding(model: keras.Model, test: Split, logdir: Path, sample: int) -> None:
    """Embeddings of `sample` test images for TensorBoard's projector, with labels and a sprite."""
    from tensorboard.plugins import projector

    from pipeline.summaries import digit_grid

    n = min(sample, len(test.y))
    layer = embedding_layer(model)
    vectors = keras.Model(model.inputs[0], layer.output)(test.x[:n].astype(np.float32)).numpy().reshape(n, -1)
    logdir.mkdir(parents=True, exist_ok=True)
    np.savetxt(logdir / "embedding.tsv", vectors, delimiter="\t", fmt="%.5g")
    (logdir / "labels.tsv").write_text("\n".join(str(int(v)) for v in test.y[:n]) + "\n")
    side = int(np.ceil(np.sqrt(n)))
    sprite = digit_grid(255 - test.x[:n], columns=side, pad=0)[0, :, :, 0]
    sprite = np.pad(sprite, ((0, side * 28 - sprite.shape[0]), (0, side * 28 - sprite.shape[1])), constant_values=255)
    (logdir / "sprite.png").write_bytes(tf.io.encode_png(sprite[:, :, None]).numpy())
    config = projector.ProjectorConfig()
    emb = config.embeddings.add()
    emb.tensor_name = f"{layer.name}_test_images"
    emb.tensor_path = "embedding.tsv"
    emb.metadata_path = "labels.tsv"
    emb.sprite.image_path = "sprite.png"
    emb.sprite.single_image_dim.extend([28, 28])
    projector.visualize_embeddings(str(logdir), config)


def load_for_evaluation(model_dir: Path) -> tuple[keras.Model, dict]:
    return train.load_trained(model_dir), train.load_meta(model_dir)
