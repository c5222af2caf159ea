"""DVC stage `report`: the leaderboard of all models (metrics file, data/report.md, TensorBoard HParams)."""

import argparse
from pathlib import Path

from pipeline.stage import run_stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluations", type=Path, required=True, help="folder holding one evaluate folder per model")
    parser.add_argument("--data-report", type=Path, required=True, help="the preprocess stage's data report")
    parser.add_argument("--leaderboard", type=Path, required=True, help="the leaderboard metrics file (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="the markdown report")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard folder for the HParams view")
    args = parser.parse_args(argv)
    run_stage(
        "report", "report_flow", evaluations=args.evaluations, data_report=args.data_report,
        leaderboard=args.leaderboard, out=args.out, tensorboard=args.tensorboard,
    )


if __name__ == "__main__":
    main()
