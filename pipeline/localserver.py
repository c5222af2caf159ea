"""Which local Prefect server is the project's own: the record a server's starter leaves.

A Prefect server this project starts (`mnist run`, `mnist dashboards`) gets an auth string of its
own and leaves a record, `$PREFECT_HOME/mnist-servers/<port>.json` (folder 0700, file 0600): its
process id, port and auth string. Another command of the same user finds the server through it
and sends the auth string. Whatever else answers on that port (another account's server, any
program bound there first) is not the project's: nothing is sent to it, credentials least of all.

A bare `dvc repro` (no Prefect server configured) starts the project's servers in the background
(pipeline/stage.py): they stop themselves after `idle_s()` seconds without a stage. The knobs of
that, the port and the idle time, are here, where the stages, the launcher and the servers read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what a Prefect client sends (Prefect's own setting)
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # what a Prefect server asks for (Prefect's own setting)
DEFAULT_PORT = 4200  # where the project's Prefect server listens (`make dashboards`, `mnist run`, a bare `dvc repro`)
PORT_ENV = "MNIST_PREFECT_PORT"  # another port for all of them
IDLE_S = 900.0  # the servers a bare `dvc repro` starts stop after this many seconds without a stage (15 minutes)
IDLE_ENV = "MNIST_SERVERS_IDLE_S"  # another idle time; 0: a bare `dvc repro` starts none (a temporary server per stage)


def port() -> int:
    """The project's Prefect port: $MNIST_PREFECT_PORT, else DEFAULT_PORT."""
    value = os.environ.get(PORT_ENV, "")
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else DEFAULT_PORT


def idle_s() -> float:
    """How long the background servers wait without a stage before they stop: $MNIST_SERVERS_IDLE_S, else IDLE_S."""
    try:
        value = float(os.environ.get(IDLE_ENV, IDLE_S))
    except ValueError:
        return IDLE_S
    return value if value >= 0 else IDLE_S


def idle_words(seconds: float) -> str:
    """`15 min` or `30 s`: an idle time as the messages say it."""
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


@dataclass(frozen=True)
class Record:
    """A Prefect server the project started: its process, port and auth string (None: no authentication)."""

    pid: int
    port: int
    auth: str | None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def folder() -> Path:
    """Where the records live, made private to this user on first use."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    path = home / "mnist-servers"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def new_auth() -> str:
    """A fresh auth string for a server the project starts: `mnist:` and 32 random characters."""
    return f"mnist:{secrets.token_urlsafe(24)}"


def write(record: Record) -> None:
    """Record `record` for its port, readable by this user only (written whole, then renamed)."""
    write_json(folder() / f"{record.port}.json", asdict(record))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` as JSON, readable by this user only (written whole, then renamed)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """What write_json wrote to `path`, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def users_path(port: int) -> Path:
    """The file whose shared flock every command and stage using the server on `port` holds (pipeline/servers.py)."""
    return folder() / f"{port}.users"


def keeper_path(port: int) -> Path:
    """The record of the background process that keeps the Prefect server on `port` (`python -m pipeline.servers keep`)."""
    return folder() / f"{port}.keeper.json"


def warm_path(root: Path, suffix: str = ".json") -> Path:
    """The record (or, with `suffix`, the lock) of the background warm stage server of the project folder `root`."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return folder() / f"warm-{digest}{suffix}"


def started_at(pid: int) -> float | None:
    """When process `pid` started (as psutil tells it), or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_process(pid: int, started: float, word: str) -> bool:
    """True if process `pid` is the one that started at `started` and its command line has `word`: never a
    process that took a recorded PID over."""
    import psutil

    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.01 and any(word in part for part in process.cmdline())
    except psutil.Error:
        return False


def forget(port: int, pid: int) -> None:
    """Remove the record of `port` if it is still the one of process `pid`."""
    path = folder() / f"{port}.json"
    record = read(port)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def read(port: int) -> Record | None:
    """The record of `port`, or None if there is none (or it cannot be read)."""
    try:
        raw = json.loads((folder() / f"{port}.json").read_text())
        return Record(pid=int(raw["pid"]), port=int(raw["port"]), auth=raw.get("auth"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def listener(port: int) -> int | None:
    """The PID of the process listening on TCP `port`, where this user may see it; else None."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def ours(port: int) -> Record | None:
    """The record of `port` if the process listening there is the recorded server (or one of its children)."""
    import psutil

    record = read(port)
    pid = listener(port)
    if record is None or pid is None:
        return None
    try:
        server = psutil.Process(record.pid)
        family = {server.pid, *(child.pid for child in server.children(recursive=True))}
    except psutil.Error:
        return None
    return record if pid in family else None


def describe_listener(port: int) -> str:
    """What listens on `port`, as far as this user can tell: PID, account and command, or that it cannot see it."""
    import psutil

    pid = listener(port)
    if pid is None:
        return "a process this account cannot see (another account's, or outside this machine's view)"
    try:
        process = psutil.Process(pid)
        return f"PID {pid} of user {process.username()}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"PID {pid}"
