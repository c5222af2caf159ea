"""DVC stage `preprocess`: check the raw IDX files, split off validation, write arrays and a data report."""

import argparse
from pathlib import Path

from pipeline.stage import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="folder of the fetched IDX files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared arrays")
    parser.add_argument("--report", type=Path, required=True, help="the data report (JSON)")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard run folder")
    args = parser.parse_args(argv)
    run_stage("preprocess", "preprocess_flow", out=args.out, raw=args.raw, report=args.report, tensorboard=args.tensorboard)


if __name__ == "__main__":
    main()
