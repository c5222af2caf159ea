"""DVC stage `fetch`: download the four MNIST files, verified, into --out."""

import argparse
from pathlib import Path

from pipeline.stage import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the decompressed IDX files")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard run folder")
    args = parser.parse_args(argv)
    run_stage("fetch", "fetch_flow", out=args.out, tensorboard=args.tensorboard)


if __name__ == "__main__":
    main()
