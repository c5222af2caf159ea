"""`mnist alerts` (pipeline/alerts.py): a webhook on 127.0.0.1 receives what the session's Prefect server sends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import BIN, REPO, project_env

# The real code of a pipeline run's parent flow run (pipeline/stage.py), as the stages of one `dvc repro` run it,
# and the evaluate stage's event for a model under its gate.
PARENT = """
import os, sys
from prefect.states import Completed, Failed
from pipeline import alerts, stage
os.environ[stage.RUN_ID_ENV] = sys.argv[1]
parent = stage.adopt_parent()
if sys.argv[2] == "gate":
    alerts.gate_missed("cnn", 0.42, 0.993, sys.argv[1])
    stage.end_parent(parent, Completed(), "evaluate@cnn")
else:
    stage.end_parent(parent, Failed(message="boom") if sys.argv[2] == "fail" else Completed(), "train@cnn")
"""
# A stage of a bare `dvc repro` killed outright: its flow run shows as running, its process is gone; the
# background server's keeper looks for such runs (pipeline/servers.py's mark_killed_stages).
KILLED = """
import os, subprocess, sys
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running
from pipeline import servers, stage
os.environ[stage.RUN_ID_ENV] = sys.argv[1]
parent = stage.adopt_parent()
gone = subprocess.Popen([sys.executable, "-c", "pass"])
gone.wait()
with get_client(sync_client=True) as client:
    tags = ["stage:train@cnn", stage.run_tag(sys.argv[1])]
    run = client.create_flow_run(flow(name="train")(lambda: None), name=f"train-cnn-{sys.argv[1]}", tags=tags, state=Running())
    client.update_flow_run(run.id, infrastructure_pid=f"{stage.this_process().split(':')[0]}:{gone.pid}")
servers.mark_killed_stages(os.environ["PREFECT_API_URL"])
"""
# The end-to-end flow that `mnist flow` runs and `mnist serve` schedules (pipeline/dag.py), on a project whose one stage fails.
SCHEDULED = """
import sys
from pipeline.dag import pipeline_flow
state = pipeline_flow.with_options(flow_run_name=sys.argv[1])(root=sys.argv[2], return_state=True)
assert state.is_failed(), state
"""


def broken_project(root: Path) -> Path:
    """A git and DVC repository whose one stage exits 3."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text("stages:\n  broken:\n    cmd: exit 3\n")
    return root


@contextmanager
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """An HTTP receiver on 127.0.0.1: its URL, and the JSON bodies posted to it so far."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def mnist_alerts(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mnist"), "alerts", *args], cwd=REPO, env=project_env(), capture_output=True, text=True, timeout=120
    )


def test_a_url_that_is_not_http_is_refused_with_its_name() -> None:
    done = mnist_alerts("--webhook", "hooks.example/abc")
    assert done.returncode == 1 and "--webhook 'hooks.example/abc' is not an http(s) URL" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.services
def test_a_failed_run_and_a_missed_gate_alert_once_each_and_a_green_run_not_at_all(prefect_api: str, tmp_path: Path) -> None:
    """Failed: a pipeline run whose stage failed, a run of the flow `mnist serve` schedules, and a bare `dvc repro`
    whose stage was killed."""
    stamp = int(time.time() * 1000)
    runs = {kind: f"alerts-{kind}-{stamp}" for kind in ("green", "fail", "gate", "scheduled", "killed")}
    with webhook() as (url, received):
        done = mnist_alerts("--webhook", url)
        assert done.returncode == 0 and f"Alerts go to {url}" in done.stdout, done.stdout + done.stderr
        try:
            for kind, run in runs.items():
                if kind == "scheduled":
                    script = [SCHEDULED, run, str(broken_project(tmp_path / "broken"))]
                else:
                    script = [KILLED, run] if kind == "killed" else [PARENT, run, kind]
                subprocess.run(
                    [sys.executable, "-c", *script],
                    cwd=REPO,
                    env=project_env(),
                    check=True,
                    capture_output=True,
                    timeout=120,
                )

            def ours() -> list[dict]:
                return [alert for alert in list(received) if any(run in alert["body"] for run in runs.values())]

            deadline = time.monotonic() + 120
            while len(ours()) < 4 and time.monotonic() < deadline:
                time.sleep(0.5)
            alerts = ours()
        finally:
            off = mnist_alerts("--off")
    assert off.returncode == 0 and "Removed mnist-alert-run-failed, mnist-alert-gate-missed" in off.stdout, (
        off.stdout + off.stderr
    )
    failed = [a for a in alerts if runs["fail"] in a["body"] and "train-cnn" not in a["body"]]
    gate = [a for a in alerts if a["subject"] == "MNIST pipeline: a model missed its gate"]
    assert len(failed) == 1 and failed[0]["subject"] == "MNIST pipeline: a run failed", alerts
    assert f"Flow run {runs['fail']} of flow pipeline-run ended Failed: train@cnn failed: boom" in failed[0]["body"], alerts
    assert len(gate) == 1 and "Model cnn: test accuracy 0.42 is under its gate 0.993" in gate[0]["body"], alerts
    assert runs["gate"] in gate[0]["body"] and not [a for a in alerts if runs["green"] in a["body"]], alerts
    scheduled = [a for a in alerts if runs["scheduled"] in a["body"]]
    assert len(scheduled) == 1 and "of flow pipeline ended Failed: failed: " in scheduled[0]["body"], alerts
    killed = [a for a in alerts if f"Flow run {runs['killed']} of flow pipeline-run ended Crashed: train-cnn-" in a["body"]]
    assert len(killed) == 1 and "ended without reporting: killed" in killed[0]["body"], alerts
    assert len(alerts) == 4, alerts
