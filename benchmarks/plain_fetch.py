"""The fetch stage's work as plain function calls, without Prefect: the baseline of the orchestration benchmark.

    python -m benchmarks.plain_fetch --out raw --tensorboard tb   (in a folder holding params.yaml)

It does what the fetch stage's flow `fetch_flow` in stages/fetch.py does (read params, fetch
and verify the four files, write the TensorBoard run) and nothing else: no flow, no tasks,
no API calls.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from pipeline import fetch
from pipeline.config import load_params
from pipeline.data import remove_leftovers
from pipeline.mnist import FILES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tensorboard", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    mirrors = fetch.mirrors_to_try(params.fetch)
    pool = fetch.http_pool(params.fetch)
    args.out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(args.out)
    fetched = [fetch.fetch_file(name, mirrors, args.out, pool) for name in FILES]
    fetch.write_summaries(fetched, args.tensorboard)
    gc.freeze()  # as pipeline.stage.run_stage does, so the comparison measures orchestration alone


if __name__ == "__main__":
    main()
