"""Fan-out: the model chains over 1 and 2 Prefect workers on loopback, and a prediction for N machines.

    python -m benchmarks.fanout [--full-run run-YYYYmmdd-HHMMSS] [--out benchmarks/fanout.json]
    python -m benchmarks.fanout --config default --out benchmarks/fanout-default.json

Not one of `python -m benchmarks`' set: it takes about 15 minutes on 2 cores. On the loopback
cluster of the fan-out test (tests/loopback.py: PostgreSQL, a Prefect server, workers in
their own clones, a local DVC remote), the quick configuration with all eight models runs:

1. `mnist flow --work-pool` with one worker, then, on a fresh commit and remote (so nothing
   is restored), with two. Wall time of each, from the command's start to its end.
2. Per chain, from the Prefect server: the chain's flow run, minus the three stage flow runs
   inside it = the fan-out's own overhead per chain (clone, pull, process starts, DVC
   bookkeeping, push), plus the wait between the chain's scheduled and its actual start.
3. A prediction: wall(N) = before + makespan of the chains (each its stages' flow runs plus
   the mean overhead), placed longest first on N machines + after, where `before` is the
   coordinator's time until it starts the chains (fetch, preprocess, push) and `after` its
   time from the last chain's end (restore, report, push). Checked against (1) on the quick
   chains; then, given --full-run (a full `make run`'s pipeline run, from the Prefect database
   as benchmarks.breakdown reads it), for the default configuration on 1, 2, 4 and 8 machines.

With `--config default` (about 20 minutes) the runs of (1) use params.yaml as it is, and a
`mnist run` of the same params in a fresh clone, on the same server, is timed beside them.

On one 2-core machine two workers share the cores, so they are not faster than one: the
prediction assumes one worker per machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from benchmarks.common import REPO, describe, machine
from benchmarks.orchestration import flows_from_prefect_db

sys.path.insert(0, str(REPO / "tests"))  # the loopback cluster and the quick configuration are the tests'

from conftest import small_params
from loopback import BIN, Loopback, loopback, run

STAGES = ("train", "evaluate", "export")
BEFORE, AFTER = ("fetch", "preprocess"), ("report", "publish")  # the coordinator's own stages
COORDINATOR_STAGES = BEFORE + AFTER


def seconds(flow: dict) -> float:
    return (datetime.fromisoformat(flow["end_time"]) - datetime.fromisoformat(flow["start_time"])).total_seconds()


CONFIGS: dict[str, Callable[[dict], dict]] = {"quick": small_params, "default": lambda raw: raw}


def local_run(cluster: Loopback, config: str) -> float:
    """Wall seconds of `mnist run` of `config` in a fresh clone (nothing to restore), its stages on the cluster's server."""
    project = cluster.project("local", CONFIGS[config])
    start = time.perf_counter()
    run([str(BIN / "mnist"), "run"], project.coordinator, cluster.env(project.coordinator))
    return time.perf_counter() - start


def distributed_run(cluster: Loopback, name: str, workers: int, config: str = "quick") -> dict:
    """One distributed run of `config` on `workers` workers: its wall and per-chain figures."""
    project = cluster.project(name, CONFIGS[config])
    pool = name
    run([str(BIN / "mnist"), "deploy", "--work-pool", pool], project.coordinator, cluster.env())
    cluster.start_workers(project, pool, [f"{name}-w{i + 1}" for i in range(workers)])
    before = {f["id"] for f in cluster.flow_runs()}
    start = time.perf_counter()
    run([str(BIN / "mnist"), "flow", "--work-pool", pool], project.coordinator, cluster.env())
    wall = time.perf_counter() - start
    flows = cluster.flow_runs(new_run_tag(cluster, before))
    parent = next(
        f
        for f in flows
        if f["name"]
        and not f["deployment_id"]
        and f["parent_task_run_id"] is None
        and not any(t.startswith("stage:") for t in f["tags"])
    )
    chains = {}
    free_since: dict[str, datetime] = {}  # when each worker last finished a chain
    for chain in sorted((f for f in flows if f["deployment_id"]), key=lambda f: f["start_time"]):
        model, _, worker = chain["name"].partition("@")
        inside = [f for f in flows if f["name"] in {f"{s}-{model}" for s in STAGES}]
        stages = sum(seconds(f) for f in inside)
        start, scheduled = datetime.fromisoformat(chain["start_time"]), datetime.fromisoformat(chain["expected_start_time"])
        # From the moment the chain could start (scheduled, and its worker free) to its flow run's start:
        # the worker's poll, its process start and the deployment's git clone.
        pickup = (start - max(scheduled, free_since.get(worker, scheduled))).total_seconds()
        free_since[worker] = datetime.fromisoformat(chain["end_time"])
        chains[model] = {
            "worker": worker,
            "chain_s": seconds(chain),
            "stages_s": stages,
            "overhead_s": seconds(chain) - stages,
            "pickup_s": pickup,
            "queued_s": (start - scheduled).total_seconds(),
        }
    first_start = min(datetime.fromisoformat(f["expected_start_time"]) for f in flows if f["deployment_id"])
    last_end = max(datetime.fromisoformat(f["end_time"]) for f in flows if f["deployment_id"])
    before = (first_start - datetime.fromisoformat(parent["start_time"])).total_seconds()
    after = (datetime.fromisoformat(parent["end_time"]) - last_end).total_seconds()
    coordinator_stages = {f["name"]: seconds(f) for f in flows if f["name"] in COORDINATOR_STAGES}
    return {
        "workers": workers,
        "wall_s": wall,
        "flow_s": seconds(parent),
        "before_s": before,
        "after_s": after,
        "coordinator_stages_s": coordinator_stages,
        "chains": chains,
    }


def makespan(durations: list[float], machines: int) -> float:
    """Longest first, each onto the machine that frees up first (LPT): the time until the last one ends."""
    loads = [0.0] * machines
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def predict(chain_stages: dict[str, float], overhead: float, before: float, after: float, machines: int) -> float:
    return before + makespan([s + overhead for s in chain_stages.values()], machines) + after


def new_run_tag(cluster: Loopback, before: set[str]) -> str:
    """The pipeline-run tag of the flow runs the server holds that were not among `before` (their ids): one run's."""
    (tag,) = {t for f in cluster.flow_runs() if f["id"] not in before for t in f["tags"] if t.startswith("pipeline-run:")}
    return tag


def full_run(run_id: str) -> tuple[dict[str, float], dict[str, float]]:
    """From a full `make run` in the Prefect database: each model's Σ train, evaluate and export flow-run
    seconds, and the seconds of the coordinator's own stages."""
    chains: dict[str, float] = {}
    own: dict[str, float] = {}
    flows, source = flows_from_prefect_db(run_id)
    if not flows:
        raise SystemExit(f"--full-run {run_id}: {source}")
    for name, start, end, _ in flows:
        stage, _, model = name.partition("-")
        if stage in STAGES and model:
            chains[model] = chains.get(model, 0.0) + (end - start).total_seconds()
        elif name in COORDINATOR_STAGES:
            own[name] = (end - start).total_seconds()
    return chains, own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full-run",
        help="a full `make run`'s pipeline run (run-YYYYmmdd-HHMMSS) in Prefect's database, for the default configuration's prediction",
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick", help="the params of the runs (default quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "fanout.json")
    args = parser.parse_args(argv)
    local_s = None
    with tempfile.TemporaryDirectory(prefix="mnist-fanout-") as tmp, loopback(Path(tmp)) as cluster:
        runs = [distributed_run(cluster, "one", 1, args.config), distributed_run(cluster, "two", 2, args.config)]
        if args.config == "default":
            local_s = local_run(cluster, args.config)
    one = runs[0]
    overhead = sum(c["overhead_s"] + c["pickup_s"] for c in one["chains"].values()) / len(one["chains"])
    quick = {m: c["stages_s"] for m, c in one["chains"].items()}
    lines = [f"machine: {describe(machine())}"]
    for r in runs:
        per_chain = [c["overhead_s"] for c in r["chains"].values()]
        pickup = [c["pickup_s"] for c in r["chains"].values()]
        r["predicted_flow_s"] = predict(quick, overhead, one["before_s"], one["after_s"], r["workers"])
        lines.append(
            f"{args.config}, {r['workers']} worker(s): wall {r['wall_s']:.0f} s (flow {r['flow_s']:.0f} s: before the chains "
            f"{r['before_s']:.0f} s, after {r['after_s']:.0f} s); overhead per chain {min(per_chain):.1f}-{max(per_chain):.1f} s "
            f"+ pickup {min(pickup):.1f}-{max(pickup):.1f} s; predicted flow {r['predicted_flow_s']:.0f} s"
        )
    lines.append(f"overhead per chain used for predictions (mean, 1 worker): {overhead:.1f} s")
    result = {"machine": machine(), "config": args.config, "runs": runs, "overhead_per_chain_s": overhead}
    if local_s is not None:
        result["local_s"] = local_s
        lines.append(
            f"{args.config}, local `mnist run` in a fresh clone: {local_s:.0f} s; with the pool: "
            + ", ".join(f"{r['workers']} worker(s) {r['wall_s'] / local_s:.2f}x" for r in runs)
        )
    if args.full_run:
        # The coordinator's time around the chains, with the quick run's stages swapped for the full run's.
        full, own = full_run(args.full_run)
        quick_own = one["coordinator_stages_s"]
        before = one["before_s"] + sum(own.get(s, 0) - quick_own.get(s, 0) for s in BEFORE)
        after = one["after_s"] + sum(own.get(s, 0) - quick_own.get(s, 0) for s in AFTER)
        result["full"] = {"chains_s": full, "stages_s": own, "before_s": before, "after_s": after, "predicted_s": {}}
        for n in (1, 2, 4, 8):
            result["full"]["predicted_s"][n] = predict(full, overhead, before, after, n)
        lines.append(
            "default configuration, predicted wall: "
            + ", ".join(f"{n} machine(s) {s:.0f} s" for n, s in result["full"]["predicted_s"].items())
        )
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("\n".join(lines))
    print(f"(details: {args.out})")


if __name__ == "__main__":
    main()
