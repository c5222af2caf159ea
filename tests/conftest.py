"""Shared fixtures: a real Prefect server for the session, and one small `dvc repro` in a copy of the repo.

The Prefect server starts before any test module imports Prefect (pytest_configure), so
every flow a test runs, in this process or in a child, reports to it instead of starting
Prefect's temporary server. It runs on a free port of 127.0.0.1 with its own PREFECT_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import system
import tiers
from helpers import MIRROR, NO_SERVER_ENV, REPO

BIN = Path(sys.executable).parent

_services = ExitStack()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wants_server(config: pytest.Config) -> bool:
    """Whether the selected tests may include the services tier (`-m "not services"` rules it out)."""
    return "not services" not in (config.getoption("markexpr") or "")


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in tiers.TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if not wants_server(config):
        os.environ[NO_SERVER_ENV] = "1"  # `make check`: a test that runs a flow fails, naming the tier it needs
        return
    if os.environ.get("PREFECT_API_URL"):
        return  # a server given from outside (e.g. by a developer) is used as is
    from pipeline import servers

    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # Without an auth string, so that the browser tests open its UI directly; tests/test_servers.py
    # covers the servers the commands start, which ask for one.
    _services.callback(shutil.rmtree, home, ignore_errors=True)  # registered first, so it runs once the server has stopped
    api = _services.enter_context(servers.prefect_server("127.0.0.1", free_port(), log=home / "server.log", auth=False))
    os.environ["PREFECT_API_URL"] = api


def pytest_unconfigure(config: pytest.Config) -> None:
    _services.close()


@pytest.hookimpl(tryfirst=True)  # before -m deselects and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tiers.mark(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process runs the files in order, each module's fixtures once
        tiers.longest_first(items)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """End with one line naming the Debian packages whose absence skipped tests, and how to install them."""
    reasons = [str(r.longrepr[2]) for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple)]
    line = system.summary(reasons)
    if line:
        terminalreporter.write_sep("-", line, yellow=True)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The API URL of the session's Prefect server."""
    return os.environ["PREFECT_API_URL"]


# --- one small pipeline run, shared by the integration tests -----------------------------

SMALL_LIMIT = 1500
SMALL_VAL = 300


def small_params(raw: dict) -> dict:
    """params.yaml for a quick run: few images, one epoch, gates every model can pass but `linear`."""
    raw["data"]["limit"] = SMALL_LIMIT
    raw["data"]["val_size"] = SMALL_VAL
    for block in raw["models"].values():
        block["epochs"] = 1
    # Below chance (0.1), so every model passes whatever one epoch on 1,200 images gives it (pattern_deep got
    # 0.15 in a bf16 run of the suite, 0.22 in float32 and 0.34 in bf16 in a quick check), except `linear`: one
    # model under its gate, not exported, and the rest goes on.
    raw["gates"] = dict.fromkeys(raw["models"], 0.05)
    raw["gates"]["linear"] = 0.999
    raw["evaluate"]["embedding_sample"] = 200
    raw["export"]["latency_repeats"] = 3
    return raw


def copy_project(dest: Path) -> Path:
    """A fresh git repo holding the project's files as they are in the working tree (no data)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file() and not name.startswith(("data/", "docs/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def edit_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text())), sort_keys=False))


def project_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "MNIST_MIRROR": str(MIRROR), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.update(extra)
    return env


def dvc(project: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `project`; its stages import the project copy's `pipeline`, not the editable install's."""
    env = {**(env or project_env()), "PYTHONPATH": str(project)}
    done = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@dataclass
class SmallRun:
    project: Path
    run_id: str
    output: str
    seconds: float

    def models(self) -> list[str]:
        return list(yaml.safe_load((self.project / "params.yaml").read_text())["models"])

    def metrics(self, model: str) -> dict:
        return json.loads((self.project / "data" / "evaluate" / model / "metrics.json").read_text())[model]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory: pytest.TempPathFactory, prefect_api: str):
    """The session's two-experiment sweep of a logreg-only project (tests/sweep.py), its stages reporting to
    the session's Prefect server."""
    from sweep import make_sweep

    return make_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> SmallRun:
    """`dvc repro` of the whole pipeline on 1,500 images and one epoch, in a copy of the repo, its stages
    started warm as `mnist run` starts them (the first ones cold, while the warm server imports)."""
    from pipeline import warm

    project = copy_project(tmp_path_factory.mktemp("project"))
    edit_params(project, small_params)
    run_id = f"test-{int(time.time())}"
    env = {**project_env(PIPELINE_RUN_ID=run_id), "PYTHONPATH": str(project)}
    start = time.perf_counter()
    with warm.server(project, env) as socket_env:
        done = dvc(project, "repro", env={**env, **socket_env})
    return SmallRun(project, run_id, done.stdout + done.stderr, time.perf_counter() - start)
