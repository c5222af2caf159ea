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


def shifted(images: tf.Tensor, offsets: tf.Tensor, shift: int) -> tf.Tensor:
    """Each image of `images` [n, height, width] moved by its own (rows, columns) in `offsets` [n, 2],
    each in 0..2*shift (shift = no move); pixels moved in from outside are 0, the background."""
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift]])
    rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]  # [n, height]: the padded rows each image keeps
    cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def training_batches(split: Split, batch_size: int, seed: int, first_epoch: int, epochs: int, shift: int = 0) -> tf.data.Dataset:
    """Batches of (float32 pixels, int32 labels) for epochs first_epoch..epochs-1.

    Each epoch is one pass over a permutation keyed by (seed, epoch), so resuming at
    epoch k yields exactly the batches an uninterrupted run sees from epoch k on. With
    `shift` > 0, every image is moved by up to `shift` pixels along each axis, by amounts
    also keyed by (seed, epoch): a new random shift of each image in each epoch.
    """
    x = tf.constant(split.x)
    y = tf.constant(split.y.astype(np.int32))
    n = len(split.y)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=key)
        # A second stream for the shifts: the key with its epoch part negated (epochs count from 0).
        offsets = tf.random.stateless_uniform([n, 2], seed=key * [1, -1] - [0, 1], maxval=2 * shift + 1, dtype=tf.int32)
        return tf.data.Dataset.from_tensor_slices((order, offsets)).batch(batch_size)

    def batch(idx: tf.Tensor, offsets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images = tf.gather(x, idx)
        if shift:
            images = shifted(images, offsets, shift)
        return tf.cast(images, tf.float32), tf.gather(y, idx)

    return (
        tf.data.Dataset.range(first_epoch, epochs)
        .flat_map(one_epoch)
        .map(batch, num_parallel_calls=2)
        .prefetch(2)
        .with_options(FIXED_PIPELINE)
    )


def eval_batches(split: Split, batch_size: int) -> tf.data.Dataset:
    """Batches of a split in file order, for validation and evaluation."""
    ds = tf.data.Dataset.from_tensor_slices((split.x, split.y.astype(np.int32))).batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).cache().prefetch(2).with_options(FIXED_PIPELINE)
