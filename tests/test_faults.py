"""Faults around a run in one workspace: a second run started beside the first, a run killed outright.

DVC's per-output locks (.dvc/tmp/rwlock) are what keep two runs apart; these tests pin what a
user sees. The fetch stage waits on a mirror that never answers, so the first run is
mid-stage for as long as the test needs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from conftest import copy_project, edit_params, project_env
from helpers import silent_server


def start_repro(project: Path, env: dict[str, str]) -> subprocess.Popen:
    """`dvc repro fetch` in its own process group, output piped."""
    return subprocess.Popen(
        ["dvc", "repro", "fetch"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def wait_for_stage(repro: subprocess.Popen, script: str, timeout_s: float = 180) -> None:
    """Until `script` runs under `repro`."""
    deadline = time.monotonic() + timeout_s
    while not any(script in " ".join(p.cmdline()) for p in psutil.Process(repro.pid).children(recursive=True)):
        assert repro.poll() is None and time.monotonic() < deadline, f"{script} never started"
        time.sleep(0.2)


def test_a_second_run_in_the_same_workspace_stops_at_once_naming_the_first(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    params = (project / "params.yaml").read_text()
    env = {k: v for k, v in project_env().items() if k != "MNIST_MIRROR"}
    with silent_server() as url:
        edit_params(project, lambda raw: {**raw, "fetch": {**raw["fetch"], "mirrors": [url], "timeout_s": 300, "retries": 0}})
        first = start_repro(project, env)
        try:
            wait_for_stage(first, "stages/fetch.py")
            start = time.monotonic()
            second = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
            seconds = time.monotonic() - start
            assert second.returncode != 0
            assert "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr, second.stderr
            assert seconds < 60, f"the second run took {seconds:.0f} s to give up"
            assert first.poll() is None, "the second run disturbed the first"
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the first run killed outright: its lock entry stays behind
            first.wait()
    # A run after the kill is not blocked by the dead run's lock entry, and completes the stage.
    (project / "params.yaml").write_text(params)
    again = subprocess.run(["dvc", "repro", "fetch"], cwd=project, env=project_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    status = subprocess.run(["dvc", "status", "fetch"], cwd=project, env=project_env(), capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    assert not list((project / "data" / "raw").glob("*.tmp*")) and not list((project / "data" / "raw").glob(".*"))
