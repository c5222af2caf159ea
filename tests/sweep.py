"""The session's sweep (conftest's `sweep` fixture): a logreg-only project whose two DVC experiments,
queued and run by two queue workers, differ in the learning rate. tests/test_compare.py and
tests/test_promote.py read it."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import copy_project, dvc, edit_params, project_env
from test_faults import only_logreg

RATES = {"lr-low": 0.05, "lr-high": 0.2}  # the two experiments: logreg's learning rate
POLL_TIMEOUT_S = 60  # one `dvc exp show` poll while the queue runs; past it, the poll counts as failed
LIVE_METRICS = "data/live/logreg/metrics.json"  # DVCLive's latest values, rewritten after every epoch


@dataclass
class Sweep:
    project: Path
    baseline: str  # the workspace's commit
    live: dict[str, int]  # experiment: DVCLive's last step that `dvc exp show` showed while it ran


def logreg_at_a_constant_rate(raw: dict) -> dict:
    """The logreg-only small run, its learning rate constant (params.yaml's cosine schedule ends an epoch
    at 0): DVCLive's logged rate is then the swept one."""
    raw = only_logreg(raw)
    raw["models"]["logreg"].update(lr_schedule="constant")
    raw["models"]["logreg"].pop("lr_decay", None)
    return raw


def make_sweep(dest: Path) -> Sweep:
    """A logreg-only project in `dest` and two experiments queued in it (`dvc exp run --queue -n NAME -S ...`),
    run side by side by `dvc queue start -j 2`; its workers inherit PREFECT_API_URL, so every stage reports
    to the server it names."""
    project = copy_project(dest)
    edit_params(project, logreg_at_a_constant_rate)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "logreg only"], cwd=project, check=True)
    for name, rate in RATES.items():
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"models.logreg.learning_rate={rate}")
    # the workers keep the output pipes of `dvc queue start` open until the queue is empty: no pipes, no wait
    subprocess.run(
        ["dvc", "queue", "start", "-j", "2"],
        cwd=project,
        env={**project_env(), "PYTHONPATH": str(project)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    live: dict[str, int] = {}
    try:
        wait_for_queue(project, timeout_s=900, live=live)
    finally:
        dvc(project, "queue", "stop", "--kill", check=False)
    baseline = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()
    return Sweep(project, baseline, live)


def running_live_steps(project: Path) -> dict[str, int]:
    """DVCLive's step of each running experiment, as `dvc exp show` reads it from the experiment's workspace."""
    try:
        shown = subprocess.run(
            ["dvc", "exp", "show", "--json"],
            cwd=project,
            env={**project_env(), "PYTHONPATH": str(project)},
            capture_output=True,
            text=True,
            timeout=POLL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:  # seen once: `dvc exp show` hung as a worker deleted its workspace
        return {}
    if shown.returncode != 0:  # a poll that failed (the queue's workers write the repo meanwhile): the next one counts
        return {}
    steps = {}
    for row in json.loads(shown.stdout):
        for exp in row.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") != "running":
                continue
            for rev in exp["revs"]:
                live = (((rev.get("data") or {}).get("metrics") or {}).get(LIVE_METRICS) or {}).get("data")
                if live and rev.get("name"):
                    steps[rev["name"]] = live["step"]
    return steps


def wait_for_queue(project: Path, timeout_s: float, live: dict[str, int]) -> None:
    """Until every queued experiment of `project` has ended; fail with the log of one that did not succeed.
    Meanwhile, `live` collects what running_live_steps shows."""
    deadline = time.monotonic() + timeout_s
    while True:
        live.update(running_live_steps(project))
        rows = [line.split() for line in dvc(project, "queue", "status").stdout.splitlines()]
        states = {row[1]: row[-1] for row in rows if len(row) >= 4 and row[1] in RATES}
        failed = [name for name, state in states.items() if state == "Failed"]
        assert not failed, dvc(project, "queue", "logs", failed[0], check=False).stdout[-3000:]
        if len(states) == len(RATES) and set(states.values()) == {"Success"}:
            return
        assert time.monotonic() < deadline, f"queue not done after {timeout_s:.0f} s: {states}"
        time.sleep(2)
