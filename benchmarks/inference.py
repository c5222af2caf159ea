"""Benchmark 4: inference throughput of an exported SavedModel vs the in-memory Keras model.

Models are built with params.yaml's defaults and left untrained (speed does not depend on
the weights), exported with pipeline.export.save_servable to a scratch folder and loaded
with tf.saved_model.load. Three ways are timed, interleaved call by call:

    savedmodel       pipeline.export.predict(loaded, uint8 images): the check, the serving signature, .numpy()
    keras call       model(float32 images, training=False).numpy()
    predict_on_batch model.predict_on_batch(float32 images)

Figure: images/s = batch / median seconds per call, at batch 1 and 256.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import REPO, Context, Row, median

MODELS = ("logreg", "cnn")
BATCHES = (1, 256)
CALLS = {False: 200, True: 20}  # timed calls per way and batch (full, quick); fewer if they take long
BUDGET_S = {False: 6.0, True: 1.0}  # at most this long per model and batch


def test_images(ctx: Context, n: int) -> np.ndarray:
    """n uint8 test images: MNIST's if data/prepared exists, else random pixels."""
    from pipeline.artifacts import PREPARED_FILE, load_prepared

    folder = REPO / "data" / "prepared"
    if (folder / PREPARED_FILE).exists():
        return load_prepared(folder)["test"].x[:n]
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def timed_calls(ways: dict, calls: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each way, interleaved (A, B, C, A, B, C ...), after one warm-up call each."""
    for fn in ways.values():
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    deadline = time.perf_counter() + budget_s
    for _ in range(calls):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(seconds[name]) >= 5:
            break
    return seconds


def run(ctx: Context) -> list[Row]:
    import tensorflow as tf

    from pipeline import export
    from pipeline.config import load_params
    from pipeline.models import registry

    params = load_params(REPO / "params.yaml", model_types=registry.PARAM_TYPES)
    images = test_images(ctx, max(BATCHES))
    rows, details = [], {}
    for name in [m for m in MODELS if m in params.models]:
        model = registry.build(name, params.model(name))
        folder = ctx.tmp / "savedmodel" / name
        export.save_servable(model, folder)
        loaded = tf.saved_model.load(str(folder))
        details[name] = {}
        for batch in BATCHES:
            x_uint8 = images[:batch]
            x_float = x_uint8.astype(np.float32)
            ways = {
                "savedmodel": lambda: export.predict(loaded, x_uint8),  # noqa: B023 - called in this iteration only
                "keras call": lambda: model(x_float, training=False).numpy(),  # noqa: B023 - called in this iteration only
                "predict_on_batch": lambda: model.predict_on_batch(x_float),  # noqa: B023 - called in this iteration only
            }
            seconds = timed_calls(ways, CALLS[ctx.quick], BUDGET_S[ctx.quick])
            rate = {k: batch / median(v) for k, v in seconds.items()}
            details[name][f"batch_{batch}"] = {
                k: {"images_per_s": rate[k], "median_ms": 1000 * median(v), "calls": len(v)} for k, v in seconds.items()
            }
            n = len(seconds["savedmodel"])
            for way in ways:
                ms = 1000 * median(seconds[way])
                note = f"{ms:.3f} ms per call, median of {n}"
                if way != "savedmodel":
                    note += f"; savedmodel / this = {rate['savedmodel'] / rate[way]:.2f}"
                rows.append(Row("inference", f"{name} batch {batch}: {way}", rate[way], "images/s", note))
    ctx.details["inference"] = details
    return rows
