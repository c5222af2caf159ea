"""Which local Prefect server is the project's own: the record a server's starter leaves.

A Prefect server this project starts (`mnist run`, `mnist dashboards`) gets an auth string of its
own and leaves a record, `$PREFECT_HOME/mnist-servers/<port>.json` (folder 0700, file 0600): its
process id, port and auth string. Another command of the same user finds the server through it
and sends the auth string. Whatever else answers on that port (another account's server, any
program bound there first) is not the project's: nothing is sent to it, credentials least of all.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what a Prefect client sends (Prefect's own setting)
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # what a Prefect server asks for (Prefect's own setting)


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
    path = folder() / f"{record.port}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(record), out)
    os.replace(tmp, path)


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
    pid = listener(port)
    if pid is None:
        return "a process this account cannot see (another account's, or outside this machine's view)"
    try:
        process = psutil.Process(pid)
        return f"PID {pid} of user {process.username()}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"PID {pid}"
