"""The train stage's work as plain function calls, without Prefect: a baseline of the orchestration benchmark.

    python -m benchmarks.plain_train linear --data data/prepared --out m --resume r --tensorboard tb

It does what pipeline.flows.train_flow does (load the arrays, train with the stage's
callbacks, write the model folder, drop the resume state) without the flow, its tasks,
the per-epoch progress artifact and the summary artifacts.
"""

from __future__ import annotations

import argparse
import gc
import shutil
from pathlib import Path

from pipeline import train
from pipeline.config import load_params
from pipeline.data import load_prepared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for flag in ("--data", "--out", "--resume", "--tensorboard"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    p = params.model(args.model)
    splits = load_prepared(args.data)
    result = train.train_model(args.model, params, splits, args.data, args.resume, args.tensorboard)
    train.save_outputs(result, args.model, p, params, args.out)
    shutil.rmtree(args.resume, ignore_errors=True)
    gc.freeze()  # as pipeline.stage.run_stage does, so the comparison measures orchestration alone


if __name__ == "__main__":
    main()
