"""Benchmark 5: peak memory (RSS) of each stage's process.

Each stage's entry point runs as `dvc repro` would run it (the command from dvc.yaml), in a
scratch copy of the project whose params.yaml is cut down: data.limit LIMIT, data.val_size
VAL, one model (logreg, 1 epoch, gate 0 so that export does its full work), reporting to a
Prefect server started for this run. Each runs under benchmarks.peak_rss, which reports
ru_maxrss: the peak of the stage's process, or of a child it waited for (export's
fresh-process check, Prefect's temporary server) if that was higher.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import yaml

from benchmarks.common import REPO, Context, Measured, Row, child_env, mnist_mirror, run_measured

LIMIT, VAL = 2000, 500
MODEL = "logreg"
STAGES = {False: ("fetch", "preprocess", "train", "evaluate", "export", "report"), True: ("fetch", "preprocess", "train")}


def stage_args(stage: str, model: str) -> list[str]:
    """The python arguments of a stage's command in dvc.yaml, with the script path made absolute."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    cmd = (spec["do"]["cmd"] if "do" in spec else spec["cmd"]).replace("${key}", model)
    words = shlex.split(cmd)
    if words[:3] != ["python", "-m", "pipeline.warm"]:
        raise ValueError(f"dvc.yaml's {stage} command does not start with python -m pipeline.warm: {cmd}")
    return [str(REPO / words[3]), *words[4:]]  # the script itself: this benchmark measures a cold stage process


def small_project(ctx: Context) -> Path:
    """A scratch project folder with the cut-down params.yaml."""
    folder = ctx.tmp / "memory-project"
    folder.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit=LIMIT, val_size=VAL)
    params["models"] = {MODEL: {**params["models"][MODEL], "epochs": 1}}
    params["gates"] = {MODEL: 0.0}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def run(ctx: Context) -> list[Row]:
    mirror = mnist_mirror()
    if mirror is None:
        return [
            Row(
                "memory",
                "stages",
                None,
                "MB",
                "skipped: no local MNIST mirror ($MNIST_MIRROR, ../shared/datasets/mnist, data/raw)",
            )
        ]
    folder = small_project(ctx)
    env = child_env(MNIST_MIRROR=str(mirror), PREFECT_API_URL=ctx.prefect_api())
    settings = f"data.limit {LIMIT}, val {VAL}, {MODEL} 1 epoch; Prefect server"
    rows, details = [], {}
    for stage in STAGES[ctx.quick]:
        reused = stage == "fetch" and "fetch_stage_run" in ctx.shared and ctx.shared["fetch_stage_raw"].is_dir()
        if reused:  # the orchestration benchmark ran this very stage with the same server and mirror
            shutil.copytree(ctx.shared["fetch_stage_raw"], folder / "data" / "raw")
            measured: Measured = ctx.shared["fetch_stage_run"]
        else:
            measured = run_measured(stage_args(stage, MODEL), folder, env)
        subject = stage if stage in ("fetch", "preprocess", "report") else f"{stage}@{MODEL}"
        if measured.returncode != 0:
            rows.append(Row("memory", subject, None, "MB", f"failed ({measured.returncode}): {measured.output[-300:]}"))
            break
        note = f"wall {measured.wall_s:.1f} s; " + ("full MNIST fetch, from the orchestration benchmark" if reused else settings)
        rows.append(Row("memory", subject, measured.peak_rss_mb, "MB", note))
        details[subject] = {"peak_rss_mb": measured.peak_rss_mb, "wall_s": measured.wall_s}
    if ctx.quick:
        rows.append(Row("memory", "evaluate, export, report", None, "MB", "full run only"))
    ctx.details["memory"] = {"settings": settings, "stages": details}
    return rows
