"""The project's benchmarks: `python -m benchmarks` (or `make bench`) runs them all.

One module per benchmark, each with `run(ctx) -> list[Row]`:

    throughput        training samples/s: the project's train code vs a plain Keras `fit`
    time_to_accuracy  wall time until each model's validation accuracy reaches its gate
    orchestration     what DVC and Prefect cost: no-op `dvc repro`, per-stage overhead, full run
    inference         SavedModel vs in-memory Keras model, batch 1 and 256
    memory            peak RSS of each stage's process
    flops             the CNN's FLOPs per training step, achieved FLOP/s, fraction of the CPU's peak
    breakdown         a full run's wall time by stage: training, evaluation, export, summaries, start-up, DVC

Shared helpers are in `benchmarks.common`. Importing this package imports no TensorFlow,
so the small helper processes (`benchmarks.peak_rss`, `benchmarks.plain_fetch`) start fast.
"""

NAMES = ("throughput", "flops", "time_to_accuracy", "inference", "orchestration", "memory", "breakdown")
