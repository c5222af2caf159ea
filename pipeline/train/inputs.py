"""The input pipeline: training batches in an order keyed by (seed, epoch), evaluation batches in file order."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.data import Split

# tf.data's autotuner is off: its optimisation thread, by then waking only every 60 s, made the
# iterator's teardown at the end of `fit` wait up to a minute.
# Gathering a batch is one cheap op, so a fixed parallelism of 2 and 2 prefetched batches suffice.
FIXED_PIPELINE = tf.data.Options()
FIXED_PIPELINE.autotune.enabled = False


def training_batches(split: Split, batch_size: int, seed: int, first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Batches of (float32 pixels, int32 labels) for epochs first_epoch..epochs-1.

    Each epoch is one pass over a permutation keyed by (seed, epoch), so resuming at
    epoch k yields exactly the batches an uninterrupted run sees from epoch k on.
    """
    x = tf.constant(split.x)
    y = tf.constant(split.y.astype(np.int32))
    n = len(split.y)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    return (
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(one_epoch)
        .map(lambda idx: (tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)), num_parallel_calls=2)
        .prefetch(2)
        .with_options(FIXED_PIPELINE)
    )


def eval_batches(split: Split, batch_size: int) -> tf.data.Dataset:
    """Batches of a split in file order, for validation and evaluation."""
    ds = tf.data.Dataset.from_tensor_slices((split.x, split.y.astype(np.int32))).batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).cache().prefetch(2).with_options(FIXED_PIPELINE)
