"""The course's tutorials 1 and 2 on MNIST: linear regression and softmax (logistic) regression, 784 -> 10."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from pipeline.mnist import NUM_CLASSES
from pipeline.models.layers import logits, pixels_in
from pipeline.models.params import LinearParams, LogregParams


@keras.saving.register_keras_serializable(package="pipeline")  # type: ignore[untyped-decorator]  # keras is untyped
def onehot_mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Mean squared error between the outputs and one-hot targets: least-squares classification."""
    target = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), NUM_CLASSES)
    return tf.reduce_mean(tf.square(target - y_pred), axis=-1)


def build_linear(p: LinearParams) -> keras.Model:
    return keras.Sequential([*pixels_in(), layers.Flatten(name="flatten"), logits(p)], name="linear")


def build_logreg(p: LogregParams) -> keras.Model:
    return keras.Sequential([*pixels_in(), layers.Flatten(name="flatten"), logits(p)], name="logreg")
