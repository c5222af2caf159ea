"""Benchmark 7: where a full run's wall time goes, stage by stage.

    python -m benchmarks.breakdown [--run-id run-YYYYmmdd-HHMMSS] [--wall SECONDS]

Reads one complete pipeline run (default: the latest) from the Prefect server's SQLite
database (PREFECT_HOME or ~/.prefect): each stage's flow run, its task runs and the start-up
labels each stage puts on its flow run (pipeline/stage.py START_UP_LABELS). Every second from the first stage's
launch to the last flow's end falls in one category:

    training      the `fit <model>` tasks (model build, epochs, per-epoch checkpoints and DVCLive)
    evaluation    evaluate's model and data loading, test-set prediction, metrics files
    summaries     TensorBoard summaries and pictures (tasks `tensorboard*`, `draw pictures`)
    export        the SavedModel: writing it, checking it in a fresh process, loading the model for it
    data          fetch's downloads and preprocess's checks and arrays
    other tasks   the rest: train's data loading and model saving, the report, publishing
    prefect       inside a flow run but in no task (Prefect's own work, argument and params handling)
    start-up      launcher to a stage process ready to run its flow (imports, or a fork: pipeline/warm.py)
    flow set-up   ready to the flow run's start (creating the flow run on the server)
    dvc           the previous flow's end to this stage's launch (DVC saving outputs, run-cache,
                  dvc.lock, checking the next stage), and after the last flow with --wall

A run made before stages logged their start-up (or by `dvc repro` without the launcher) has
start-up, flow set-up and dvc together in one `between flows` figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks.common import REPO, Context, Row
from pipeline.stage import START_UP_LABELS

CATEGORIES = (
    "training",
    "evaluation",
    "summaries",
    "export",
    "data",
    "other tasks",
    "prefect",
    "start-up",
    "flow set-up",
    "dvc",
    "between flows",
)


def category(stage: str, task: str) -> str:
    """The category of task run `task` of stage `stage` (fetch, train, evaluate, ...)."""
    if task.startswith("fit "):
        return "training"
    if task.startswith("tensorboard") or task == "draw pictures":
        return "summaries"
    if stage in ("fetch", "preprocess"):
        return "data"
    if stage == "evaluate":
        return "evaluation"
    if stage == "export":
        return "export"
    return "other tasks"


def expected_stage_count() -> int:
    """How many stages one full `dvc repro` runs: dvc.yaml's, a foreach stage once per model of params.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    return sum(len(models) if "foreach" in stage else 1 for stage in stages.values())


def database() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "prefect.db"


def read_run(con: sqlite3.Connection, run_id: str | None) -> tuple[str, list[dict]]:
    """The flow runs of pipeline run `run_id` (default: the latest complete one), each with its tasks and start-up."""
    runs: dict[str, list[dict]] = defaultdict(list)
    query = "select id, name, tags, start_time, end_time, state_type from flow_run where start_time is not null and end_time is not null"
    for fid, name, tags, start, end, state in con.execute(query):
        tags = json.loads(tags or "[]")
        ids = [t.split(":", 1)[1] for t in tags if t.startswith("pipeline-run:")]
        if ids and any(t.startswith("stage:") for t in tags):  # a stage's flow run, not `mnist flow`'s own
            runs[ids[0]].append({"id": fid, "name": name, "start": _time(start), "end": _time(end), "state": state})
    complete = {
        rid: flows
        for rid, flows in runs.items()
        if len(flows) == len({f["name"] for f in flows}) == expected_stage_count()
        and all(f["state"] == "COMPLETED" for f in flows)
    }
    if run_id is None:
        if not complete:
            raise LookupError(f"no complete pipeline run (all {expected_stage_count()} stages) in {database()}")
        run_id = max(complete, key=lambda rid: max(f["end"] for f in complete[rid]))
    if run_id not in complete:
        raise LookupError(f"pipeline run {run_id} is not a complete run in {database()}")
    flows = sorted(complete[run_id], key=lambda f: f["start"])
    for flow in flows:
        flow["tasks"] = [
            (name, (_time(end) - _time(start)).total_seconds())
            for name, start, end in con.execute(
                "select name, start_time, end_time from task_run where flow_run_id = ? and start_time is not null and end_time is not null",
                (flow["id"],),
            )
        ]
        flow["start_up"] = None
        (raw,) = con.execute("select labels from flow_run where id = ?", (flow["id"],)).fetchone()
        labels = json.loads(raw) if raw else {}
        if all(key in labels for key in START_UP_LABELS):
            seconds, how, launched = (labels[key] for key in START_UP_LABELS)
            flow["start_up"] = (float(seconds), how, _time(launched))
    return run_id, flows


def _time(text: str) -> datetime:
    """A timestamp of the database (UTC, stored without a zone) or of a log line, as an aware datetime."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def breakdown(flows: list[dict], wall: float | None = None) -> tuple[dict[str, dict[str, float]], float]:
    """Seconds per stage and category, and the wall time they add up to (first launch to last flow end, or `wall`)."""
    table: dict[str, dict[str, float]] = {}
    previous_end = None
    first = flows[0]["start_up"][2] if flows[0]["start_up"] else flows[0]["start"]
    for flow in flows:
        row = dict.fromkeys(CATEGORIES, 0.0)
        stage = flow["name"].split("-")[0]
        for name, seconds in flow["tasks"]:
            row[category(stage, name)] += seconds
        inside = (flow["end"] - flow["start"]).total_seconds()
        row["prefect"] = inside - sum(seconds for _, seconds in flow["tasks"])
        if flow["start_up"]:
            ready_s, _, launched = flow["start_up"]
            row["start-up"] = ready_s
            row["flow set-up"] = (flow["start"] - launched).total_seconds() - ready_s
            if previous_end is not None:
                row["dvc"] = (launched - previous_end).total_seconds()
        elif previous_end is not None:
            row["between flows"] = (flow["start"] - previous_end).total_seconds()
        table[flow["name"]] = row
        previous_end = flow["end"]
    span = (previous_end - first).total_seconds()
    if wall is not None:
        table[flows[-1]["name"]]["dvc"] += max(wall - span, 0.0)  # dvc's start before the first stage and its end after the last
    return table, wall if wall is not None else span


def totals(table: dict[str, dict[str, float]]) -> dict[str, float]:
    return {c: sum(row[c] for row in table.values()) for c in CATEGORIES}


def format_breakdown(table: dict[str, dict[str, float]], wall: float) -> str:
    used = [c for c in CATEGORIES if any(row[c] for row in table.values())]
    width = max(len(name) for name in table)
    lines = [f"{'stage':<{width}} " + " ".join(f"{c:>12}" for c in used) + f" {'sum':>8}"]
    for name, row in [*table.items(), ("all stages", totals(table))]:
        lines.append(f"{name:<{width}} " + " ".join(f"{row[c]:12.2f}" for c in used) + f" {sum(row[c] for c in used):8.2f}")
    sums = totals(table)
    training = sums["training"]
    lines.append(
        f"\nwall {wall:.1f} s; training {training:.1f} s; non-training share (wall - training) / training = "
        f"{(wall - training) / training:.2f}"
    )
    return "\n".join(lines)


def run(ctx: Context) -> list[Row]:
    db = database()
    if not db.exists():
        return [Row("breakdown", "full run", None, "s", f"skipped: no Prefect database at {db}")]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        try:
            run_id, flows = read_run(con, None)
        except LookupError as exc:
            return [Row("breakdown", "full run", None, "s", f"skipped: {exc}")]
    table, wall = breakdown(flows)
    sums = totals(table)
    ctx.details["breakdown"] = {"run": run_id, "wall_s": wall, "stages": table}
    note = f"pipeline-run:{run_id}, first launch to last flow end"
    rows = [Row("breakdown", "full run wall", wall, "s", note)]
    rows += [Row("breakdown", c, sums[c], "s", "summed over the stages") for c in CATEGORIES if sums[c]]
    rows.append(
        Row("breakdown", "non-training share", (wall - sums["training"]) / sums["training"], "", "(wall - training) / training")
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.breakdown", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-id", help="the pipeline run (tag pipeline-run:<id>; default: the latest complete one)")
    parser.add_argument(
        "--wall", type=float, help="the run command's own wall time (e.g. from /usr/bin/time), to count dvc's start and end"
    )
    args = parser.parse_args(argv)
    with sqlite3.connect(f"file:{database()}?mode=ro", uri=True, timeout=5) as con:
        run_id, flows = read_run(con, args.run_id)
    table, wall = breakdown(flows, args.wall)
    print(f"pipeline-run:{run_id} ({database()})\n")
    print(format_breakdown(table, wall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
