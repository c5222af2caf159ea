"""DVC stage `evaluate@<model>`: test metrics, plot files, TensorBoard views and the quality gate."""

import argparse
from pathlib import Path

from pipeline.stage import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model name from params.yaml's models section")
    parser.add_argument("--model-dir", type=Path, required=True, help="the train stage's output folder")
    parser.add_argument("--data", type=Path, required=True, help="folder of the prepared arrays")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, predictions.csv, ...")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard run folder")
    args = parser.parse_args(argv)
    run_stage(
        "evaluate", "evaluate_flow", model=args.model,
        model_dir=args.model_dir, data=args.data, out=args.out, tensorboard=args.tensorboard,
    )


if __name__ == "__main__":
    main()
