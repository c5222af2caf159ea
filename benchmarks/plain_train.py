"""The train stage's work as plain function calls, without Prefect: a baseline of the orchestration benchmark.

    python -m benchmarks.plain_train linear --data data/prepared --out m --live l --resume r --tensorboard tb

It does what the train stage's flow `train_flow` in stages/train.py does (read params with
the registry's model types, load the arrays, pipeline.train.loop.train_model with its own
callbacks, save_trained: write the model folder and drop the resume state) without the flow,
its tasks, the per-epoch progress artifact (PrefectProgress) and the summary artifacts.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from pipeline import artifacts
from pipeline.config import load_params
from pipeline.models.registry import PARAM_TYPES
from pipeline.train.loop import save_trained, train_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for flag in ("--data", "--out", "--live", "--resume", "--tensorboard"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params(model_types=PARAM_TYPES)
    p = params.model(args.model)
    splits = artifacts.load_prepared(args.data)
    result = train_model(args.model, p, params.seed, params.train, splits, args.data, args.resume, args.live)
    save_trained(result, args.model, p, params.seed, args.out, args.resume, args.tensorboard)  # also deletes the resume folder
    gc.freeze()  # as pipeline.stage.run_stage does, so the comparison measures orchestration alone


if __name__ == "__main__":
    main()
