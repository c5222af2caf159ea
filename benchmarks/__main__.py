# fmt: off
# (the usage lines keep their indent: argparse prints this docstring as it is)
"""`python -m benchmarks [--quick] [--only NAME ...]`: run the benchmarks, print one table, write results JSON.

    python -m benchmarks                      all benchmarks (budget: 15 minutes on 2 cores), benchmarks/results.json
    python -m benchmarks --quick              tiny sizes, a smoke test, benchmarks/results-quick.json
    python -m benchmarks --only throughput    one benchmark (repeatable); its rows replace that benchmark's in the JSON
    python -m benchmarks --run-id run-...     orchestration (c) from that pipeline run in Prefect's database, not the latest
"""
# fmt: on

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere

import argparse
import importlib
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

from benchmarks import NAMES
from benchmarks.common import REPO, Context, Row, describe, format_table, machine, rows_json

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every benchmark")
    parser.add_argument(
        "--only", action="append", choices=NAMES, metavar="NAME", help=f"run only this benchmark: {', '.join(NAMES)}"
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default: benchmarks/results.json, or results-quick.json with --quick)"
    )
    parser.add_argument("--run-id", help="the pipeline run (run-YYYYmmdd-HHMMSS) in Prefect's database for orchestration (c)")
    return parser.parse_args(argv)


def run_one(name: str, ctx: Context) -> tuple[list[Row], float]:
    """One benchmark's rows and seconds; an error becomes a row instead of ending the run."""
    print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        rows = importlib.import_module(f"benchmarks.{name}").run(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
        traceback.print_exc()
        rows = [Row(name, "error", None, "", f"{type(exc).__name__}: {exc}"[:300])]
    seconds = time.perf_counter() - start
    print(f"[benchmarks] {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, seconds


def write_results(path: Path, selected: list[str], rows: list[Row], ctx: Context, runs: dict, info: dict) -> None:
    """Write the JSON; with --only, the other benchmarks' rows and details already in the file are kept."""
    old = json.loads(path.read_text()) if path.exists() and len(selected) < len(NAMES) else {}
    kept_rows = [r for r in old.get("rows", []) if r["benchmark"] not in selected]
    result = {
        "machine": info,
        "runs": {**old.get("runs", {}), **runs},
        "rows": sorted(kept_rows + rows_json(rows), key=lambda r: NAMES.index(r["benchmark"]) if r["benchmark"] in NAMES else 99),
        "details": {**{k: v for k, v in old.get("details", {}).items() if k not in selected}, **ctx.details},
    }
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    selected = [n for n in NAMES if not args.only or n in args.only]
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    started, load_start = time.perf_counter(), os.getloadavg()
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="benchmarks-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        ctx = Context(quick=args.quick, tmp=tmp, stack=stack, run_id=args.run_id)
        info = machine()
        import tensorflow as tf

        tf.get_logger().setLevel(logging.ERROR)  # AutoGraph's notes on the pipeline's tf.data lambdas, once per dataset
        rows: list[Row] = []
        runs = {}
        for name in selected:
            new, seconds = run_one(name, ctx)
            rows += new
            runs[name] = {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "quick": args.quick,
                "seconds": round(seconds, 1),
                "load_average_1min_before": round(load_start[0] if name == selected[0] else os.getloadavg()[0], 2),
            }
    total = time.perf_counter() - started
    load_end = os.getloadavg()
    print()
    print(format_table(rows))
    print(
        f"\n{describe(info)}, TensorFlow {info['tensorflow']}, {info['date']}; "
        f"{'--quick, ' if args.quick else ''}{total:.0f} s in all; load average (1 min) {load_start[0]:.1f} at the start, "
        f"{load_end[0]:.1f} at the end{' - other work was running: figures are contaminated' if max(load_start[0], 0) > 0.5 else ''}"
    )
    write_results(
        out,
        selected,
        rows,
        ctx,
        runs,
        {**info, "total_seconds": round(total, 1), "load_average_start": load_start, "load_average_end": load_end},
    )
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
