"""TensorBoard views of a model's test results: confusion matrix, mistakes, per-class scores, PR curves,
first-layer filters and feature maps, and an embedding for the projector."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector
from tensorboard.plugins.pr_curve import summary as pr_summary

from pipeline import summaries, tables
from pipeline.data import Split
from pipeline.evaluate.pictures import Pictures
from pipeline.evaluate.scores import Evaluation
from pipeline.mnist import IMAGE_SHAPE, NUM_CLASSES


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


def write_summaries(
    model: keras.Model, ev: Evaluation, test: Split, pictures: Pictures, name: str, logdir: Path, sample: int
) -> None:
    """TensorBoard: confusion matrix, misclassified digits, per-class accuracy, PR curves, filters, embeddings.

    `pictures` are the ones drawn for the report; `sample` test images go to the projector. The run
    folder `logdir` is written afresh: an earlier run of the stage is removed first.
    """
    shutil.rmtree(logdir, ignore_errors=True)
    with summaries.writer(logdir).as_default():
        tf.summary.scalar("test/accuracy", ev.metrics["accuracy"], step=0)
        tf.summary.scalar("test/loss", ev.metrics["loss"], step=0)
        tf.summary.image("confusion_matrix", summaries.png_to_tensor(pictures.confusion), step=0)
        tf.summary.image("misclassified", summaries.png_to_tensor(pictures.misclassified), step=0)
        rows = []
        for d in range(NUM_CLASSES):
            tf.summary.scalar(f"per_class_accuracy/{d}", ev.per_class["accuracy"][d], step=0)
            rows.append([d] + [f"{ev.per_class[k][d]:.4f}" for k in ("precision", "recall", "f1")])
            # The PR-curve plugin has no TF2 summary op; its raw-data protobuf is written as is.
            c = pr_curve_counts(ev.probabilities[:, d], test.y == d)
            pb = pr_summary.raw_data_pb(
                f"pr_curve/digit_{d}",
                true_positive_counts=c["tp"],
                false_positive_counts=c["fp"],
                true_negative_counts=c["tn"],
                false_negative_counts=c["fn"],
                precision=c["precision"],
                recall=c["recall"],
                num_thresholds=len(c["tp"]),
            )
            pb.value[0].tag = f"pr_curve/digit_{d}"  # raw_data_pb appends "/pr_curves" to the tag
            tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
        tf.summary.text("per_class", tables.markdown(["digit", "precision", "recall", "f1"], rows), step=0)
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
    tf.summary.image(f"filters/{first.name}", summaries.digit_grid((filters * 255).astype(np.uint8), columns=8), step=0)
    probe = keras.Model(model.inputs[0], first.output)
    maps = probe(test.x[:4].astype(np.float32)).numpy()  # [4, H, W, K]
    for i, fmap in enumerate(maps):
        m = np.moveaxis(fmap, -1, 0)
        m = (255 * (m - m.min()) / max(float(m.max() - m.min()), 1e-12)).astype(np.uint8)
        tf.summary.image(
            f"feature_maps/{first.name}/test_image_{i}_digit_{test.y[i]}", summaries.digit_grid(m, columns=8), step=0
        )


def embedding_layer(model: keras.Model) -> keras.layers.Layer:
    """The last hidden layer (the input of the output layer); the logits for models without one."""
    candidates = [layer for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Activation))]
    return candidates[-2] if len(candidates) >= 2 else candidates[-1]


def write_embedding(model: keras.Model, test: Split, logdir: Path, sample: int) -> None:
    """Embeddings of `sample` test images for TensorBoard's projector, with labels and a sprite."""
    n = min(sample, len(test.y))
    layer = embedding_layer(model)
    vectors = keras.Model(model.inputs[0], layer.output)(test.x[:n].astype(np.float32)).numpy().reshape(n, -1)
    logdir.mkdir(parents=True, exist_ok=True)
    np.savetxt(logdir / "embedding.tsv", vectors, delimiter="\t", fmt="%.5g")
    (logdir / "labels.tsv").write_text("\n".join(str(int(v)) for v in test.y[:n]) + "\n")
    side = int(np.ceil(np.sqrt(n)))
    height, width = IMAGE_SHAPE
    sprite = summaries.digit_grid(255 - test.x[:n], columns=side, pad=0)[0, :, :, 0]
    sprite = np.pad(sprite, ((0, side * height - sprite.shape[0]), (0, side * width - sprite.shape[1])), constant_values=255)
    (logdir / "sprite.png").write_bytes(tf.io.encode_png(sprite[:, :, None]).numpy())
    config = projector.ProjectorConfig()
    emb = config.embeddings.add()
    emb.tensor_name = f"{layer.name}_test_images"
    emb.tensor_path = "embedding.tsv"
    emb.metadata_path = "labels.tsv"
    emb.sprite.image_path = "sprite.png"
    emb.sprite.single_image_dim.extend(IMAGE_SHAPE)
    projector.visualize_embeddings(str(logdir), config)
