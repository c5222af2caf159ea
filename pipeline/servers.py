"""Start and stop the local services: a Prefect server and TensorBoard, on loopback by default."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from pipeline.errors import PipelineError

PREFECT_PORT = 4200
TENSORBOARD_PORT = 6006
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # Prefect's basic authentication: "user:password"
DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


def is_loopback(host: str) -> bool:
    """True if binding `host` keeps a server reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """True if an HTTP GET of `url` succeeds."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until(url: str, process: subprocess.Popen, what: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(url, 1.0):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.terminate()
    tail = log.read_text()[-1500:] if log.exists() else ""
    raise PipelineError(f"{what} did not start within {timeout_s:.0f} s (see {log}):\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def prefect_server(
    host: str = "127.0.0.1", port: int = PREFECT_PORT, log: Path | None = None, database_url: str | None = None
) -> Iterator[str]:
    """Yield the API URL of a Prefect server on host:port, starting one unless one already answers.

    A server started here is stopped on exit; one that was already running is left alone.
    Its database is `database_url` (a PostgreSQL URL, postgresql+asyncpg://...) if given, else
    PREFECT_SERVER_DATABASE_CONNECTION_URL if set, else Prefect's SQLite file under PREFECT_HOME.
    With PREFECT_SERVER_API_AUTH_STRING set, the server asks every client for it.
    """
    api = f"http://{host}:{port}/api"
    if answers(f"{api}/health"):
        yield api
        return
    log = log or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The UI calls the API at PREFECT_SERVER_API_HOST/PORT; --port alone leaves it calling 4200.
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env[DATABASE_ENV] = database_url
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        _wait_until(f"{api}/health", process, f"The Prefect server on {host}:{port}", 90, log)
        yield api
    finally:
        _stop(process)


@contextmanager
def tensorboard_server(
    logdir: Path, host: str = "127.0.0.1", port: int = TENSORBOARD_PORT, log: Path | None = None, live: Path | None = None
) -> Iterator[str]:
    """Yield the URL of a TensorBoard serving `logdir` on host:port; stopped on exit.

    `live`, if given, is served too, its runs named `training/...`: the TensorBoard events of
    training runs in progress, which move into `logdir` when they complete.
    """
    url = f"http://{host}:{port}"
    log = log or Path(logdir).parent / f".tensorboard-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    where = ["--logdir", str(logdir)] if live is None else ["--logdir_spec", f"{logdir},training:{live}"]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", *where, "--host", host, "--port", str(port),
             "--reload_interval", "5"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_until(f"{url}/data/logdir", process, f"TensorBoard on {host}:{port}", 90, log)
        yield url
    finally:
        _stop(process)
