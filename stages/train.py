"""DVC stage `train@<model>`: train one registry model on the prepared data."""

import argparse
from pathlib import Path

from pipeline.stage import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model name from params.yaml's models section")
    parser.add_argument("--data", type=Path, required=True, help="folder of the prepared arrays")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.keras, history.csv, meta.json")
    parser.add_argument("--resume", type=Path, required=True, help="folder for per-epoch checkpoints (not a DVC output)")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard run folder")
    args = parser.parse_args(argv)
    run_stage(
        "train", "train_flow", model=args.model,
        data=args.data, out=args.out, resume=args.resume, tensorboard=args.tensorboard,
    )


if __name__ == "__main__":
    main()
