"""Benchmark 3: what the orchestration costs.

(a) a no-op `dvc repro` in the repo: only when dvc.lock exists, no other DVC process runs
    here and `dvc status` says everything is up to date.
(b) a stage's process with and without Prefect, in a scratch folder (params.yaml copied):
    `stages/<stage>.py` reporting to a Prefect server started for this run
    (pipeline.servers.prefect_server), and `benchmarks/plain_<stage>.py` doing the same work
    as plain function calls; for fetch (MNIST from a local mirror) also with no
    PREFECT_API_URL (Prefect's temporary server). Two stages: fetch, whose work is short, and
    train@linear (data/prepared of the repo, 10 epochs), which adds a progress artifact per
    epoch. overhead = median wall(stage process) - median wall(plain process); the ways run
    interleaved (A, B, C, A, B, C ...) after one warm-up round.
(c) a full `dvc repro` against the sum of its stages' own work, from its record in the Prefect
    server's database (the flow runs tagged pipeline-run:<id>): the run --run-id names, else
    the latest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from benchmarks.breakdown import database, expected_stage_count, read_run
from benchmarks.common import PYTHON, REPO, Context, Measured, Row, child_env, median, mnist_mirror, run_measured
from pipeline import progress
from pipeline.stage import DASHBOARDS_API_URL, dashboards_api

DVC = str(Path(PYTHON).parent / "dvc")
REPEATS = {False: 4, True: 1}  # timed runs per way (full, quick); a full run also does one warm-up each
TRAIN_MODEL = "linear"  # the quickest model: the stage's fixed costs stand out, plus one progress update per epoch
SERVER, TEMPORARY, PLAIN = "a Prefect server", "Prefect's temporary server", "plain functions"


# --- (a) no-op dvc repro -------------------------------------------------------------------------------


def other_dvc_running() -> bool:
    """True if another DVC process works in this repo (its lock would make ours fail, or ours theirs)."""
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "daemon" in cmd or proc.pid == os.getpid():  # DVC's analytics/updater daemons hold no lock
                continue
            if re.search(r"(^|/)dvc(\s|$)", cmd) and proc.info["cwd"] and Path(proc.info["cwd"]).resolve() == REPO:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def stale_stages(status_json: str) -> str:
    """The first stale stages named by `dvc status --json`."""
    try:
        names = list(json.loads(status_json))
    except ValueError:
        return status_json.strip()[:120]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def noop_repro(ctx: Context) -> list[Row]:
    subject = "no-op dvc repro (repo)"
    if not (REPO / "dvc.lock").exists():
        return [Row("orchestration", subject, None, "s", "skipped: no dvc.lock")]
    if other_dvc_running():
        return [Row("orchestration", subject, None, "s", "skipped: another dvc process runs in the repo")]
    env = child_env()
    status = subprocess.run([DVC, "status", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if status.returncode != 0 or status.stdout.strip() not in ("{}", ""):
        why = status.stderr.strip()[-200:] if status.returncode else "stale: " + stale_stages(status.stdout)
        return [Row("orchestration", subject, None, "s", f"skipped: dvc status not clean ({why})")]
    walls = []
    for _ in range(REPEATS[ctx.quick]):
        start = time.perf_counter()
        done = subprocess.run([DVC, "repro"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        walls.append(time.perf_counter() - start)
        if done.returncode != 0 or progress.RAN in progress.repro_outcomes(done.stdout + done.stderr).values():
            return [Row("orchestration", subject, None, "s", "skipped: dvc repro was not a no-op: " + done.stdout[-200:])]
    ctx.details.setdefault("orchestration", {})["noop_repro_s"] = walls
    return [Row("orchestration", subject, min(walls), "s", f"best of {len(walls)}; dvc status clean")]


# --- (b) one stage, with and without Prefect ---------------------------------------------------------


@dataclass
class Case:
    """One stage measured as its stage process and as the same work in plain function calls."""

    name: str
    stage: list[str]  # python arguments of the DVC stage's command
    plain: list[str]  # python arguments of the plain baseline
    outputs: tuple[str, ...]  # folders cleared before every run
    temporary_server: bool  # also measure it with Prefect's temporary server (no PREFECT_API_URL)


def cases(ctx: Context) -> list[Case]:
    """fetch (full MNIST from a local mirror) and train@linear (the committed params, 10 epochs)."""
    from pipeline.artifacts import PREPARED_FILE

    fetch_args = ["--out", "raw", "--tensorboard", "tb-fetch"]
    found = [
        Case(
            "fetch",
            [str(REPO / "stages" / "fetch.py"), *fetch_args],
            ["-m", "benchmarks.plain_fetch", *fetch_args],
            ("raw", "tb-fetch"),
            True,
        )
    ]
    prepared = REPO / "data" / "prepared"
    if (prepared / PREPARED_FILE).exists() and not ctx.quick:
        train_args = [
            TRAIN_MODEL,
            "--data",
            str(prepared),
            "--out",
            "model",
            "--live",
            "live",
            "--resume",
            "resume",
            "--tensorboard",
            "tb-train",
        ]
        found.append(
            Case(
                f"train@{TRAIN_MODEL}",
                [str(REPO / "stages" / "train.py"), *train_args],
                ["-m", "benchmarks.plain_train", *train_args],
                ("model", "live", "resume", "tb-train"),
                False,
            )
        )
    return found


def ways(ctx: Context, case: Case, mirror: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The ways to run one case: python arguments and environment."""
    base = {"MNIST_MIRROR": str(mirror), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    found = {
        SERVER: (case.stage, child_env(**base, PREFECT_API_URL=ctx.prefect_api())),
        PLAIN: (case.plain, child_env(**base)),
    }
    if case.temporary_server and dashboards_api():  # the stages would report to it instead (pipeline/stage.py)
        print(
            f"orchestration: a Prefect server answers at {DASHBOARDS_API_URL} (make dashboards?): "
            "Prefect's temporary server is not measured; stop that server to measure it.",
            flush=True,
        )
    elif case.temporary_server:
        temp_home = ctx.tmp / "prefect-temporary-home"
        temp_home.mkdir(exist_ok=True)
        found[TEMPORARY] = (case.stage, child_env(**base, PREFECT_HOME=str(temp_home)))
    return found


def measure_case(ctx: Context, case: Case, folder: Path, mirror: Path) -> dict[str, list[Measured]] | Row:
    """Every way of `case`, interleaved (A, B, C, A, B, C ...) after one warm-up round."""
    runs: dict[str, list[Measured]] = {}
    warmups = 0 if ctx.quick else 1
    case_ways = ways(ctx, case, mirror)
    for i in range(warmups + REPEATS[ctx.quick]):
        for way, (args, env) in case_ways.items():
            for leftover in case.outputs:
                shutil.rmtree(folder / leftover, ignore_errors=True)
            measured = run_measured(args, folder, env)
            if measured.returncode != 0:
                return Row(
                    "orchestration", f"{case.name}: {way}", None, "s", f"failed ({measured.returncode}): {measured.output[-300:]}"
                )
            if i >= warmups:
                runs.setdefault(way, []).append(measured)
    return runs


def case_rows(case: Case, runs: dict[str, list[Measured]], quick: bool) -> list[Row]:
    """Median wall times, and each Prefect way's overhead over the plain baseline (medians, and round by round)."""
    walls = {way: [m.wall_s for m in ms] for way, ms in runs.items()}
    n = len(walls[PLAIN])
    note = f"median of {n}" + (", no warm-up run (--quick)" if quick else " after a warm-up")
    rows = [Row("orchestration", f"{case.name}: {PLAIN}", median(walls[PLAIN]), "s", f"process wall time, {note}")]
    for way in (SERVER, TEMPORARY):
        if way not in walls:
            continue
        over = median(walls[way]) - median(walls[PLAIN])
        paired = [w - p for w, p in zip(walls[way], walls[PLAIN])]  # with the plain run of the same round
        rows += [
            Row("orchestration", f"{case.name}: stage, {way}", median(walls[way]), "s", note),
            Row(
                "orchestration",
                f"{case.name}: overhead with {way}",
                over,
                "s",
                f"stage - plain, medians; round by round {', '.join(f'{d:.2f}' for d in paired)} s",
            ),
        ]
    return rows


def stage_overhead(ctx: Context) -> list[Row]:
    mirror = mnist_mirror()
    if mirror is None:
        return [
            Row(
                "orchestration",
                "stage overhead",
                None,
                "s",
                "skipped: no local MNIST mirror ($MNIST_MIRROR, ../shared/datasets/mnist, data/raw)",
            )
        ]
    folder = ctx.tmp / "stage-overhead"
    folder.mkdir()
    shutil.copy2(REPO / "params.yaml", folder / "params.yaml")
    rows: list[Row] = []
    details = ctx.details.setdefault("orchestration", {})
    for case in cases(ctx):
        runs = measure_case(ctx, case, folder, mirror)
        if isinstance(runs, Row):
            rows.append(runs)
            continue
        if case.name == "fetch":
            ctx.shared["fetch_stage_run"] = runs[SERVER][-1]  # the memory benchmark reuses it
            ctx.shared["fetch_stage_raw"] = folder / "raw"
        details[case.name] = {way: [{"wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb} for m in ms] for way, ms in runs.items()}
        rows += case_rows(case, runs, ctx.quick)
    details["prefect_server_start_s"] = ctx.shared.get("prefect_server_start_s")
    rows.append(
        Row(
            "orchestration",
            "Prefect server start (once per run)",
            ctx.shared.get("prefect_server_start_s"),
            "s",
            "pipeline.servers.prefect_server, fresh PREFECT_HOME",
        )
    )
    return rows


# --- (c) a full dvc repro vs its stages' own work ---------------------------------------------------------

FlowRun = tuple[str, datetime, datetime, str]  # name, start, end, state


def flows_from_prefect_db(run_id: str | None = None) -> tuple[list[FlowRun], str]:
    """Pipeline run `run_id` (default: the latest complete one) in the Prefect database (benchmarks.breakdown reads it)."""
    db = database()
    if not db.exists():
        return [], f"no Prefect database at {db}"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        try:
            run_id, flows = read_run(con, run_id)
        except LookupError as exc:
            return [], str(exc)
    return [(f["name"], f["start"], f["end"], f["state"]) for f in flows], f"Prefect database {db}, pipeline-run:{run_id}"


def is_complete(flows: list[FlowRun]) -> bool:
    """All stages of a full run, each once, all completed."""
    names = {f[0] for f in flows}
    return len(names) == len(flows) == expected_stage_count() and all(f[3] == "COMPLETED" for f in flows)


def full_repro(ctx: Context) -> list[Row]:
    subject = "full dvc repro"
    flows, source = flows_from_prefect_db(ctx.run_id)
    if not flows:
        return [Row("orchestration", subject, None, "s", f"skipped: {source}; `make run` records one")]
    if not is_complete(flows):
        return [
            Row(
                "orchestration",
                subject,
                None,
                "s",
                f"skipped: {source} holds {len(flows)} flow runs, not a complete run of {expected_stage_count()} stages",
            )
        ]
    span = (max(f[2] for f in flows) - min(f[1] for f in flows)).total_seconds()
    work = sum((f[2] - f[1]).total_seconds() for f in flows)
    gaps = span - work
    ctx.details.setdefault("orchestration", {})["full_repro"] = {
        "source": source,
        "span_s": span,
        "flows_s": work,
        "flows": [{"name": f[0], "start": f[1].isoformat(), "seconds": (f[2] - f[1]).total_seconds()} for f in flows],
    }
    return [
        Row(
            "orchestration",
            f"{subject}: first flow start to last flow end",
            span,
            "s",
            f"{source}; leaves out the first process's start and dvc's work before it",
        ),
        Row(
            "orchestration",
            f"{subject}: sum of the stages' flow runs",
            work,
            "s",
            f"{len(flows)} stages' own work, inside Prefect",
        ),
        Row(
            "orchestration",
            f"{subject}: between the flows",
            gaps,
            "s",
            f"{gaps / max(len(flows) - 1, 1):.1f} s per stage: process start, imports, dvc hashing and lock updates",
        ),
    ]


def run(ctx: Context) -> list[Row]:
    return noop_repro(ctx) + stage_overhead(ctx) + full_repro(ctx)
