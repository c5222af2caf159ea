"""Start and stop the local services: a Prefect server and TensorBoard, on loopback by default."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from pipeline import localserver
from pipeline.errors import PipelineError
from pipeline.localserver import (
    CLIENT_AUTH_ENV,
    SERVER_AUTH_ENV as AUTH_ENV,  # Prefect's basic authentication: "user:password"
)
from pipeline.warm import DIE_WITH_PARENT, stop

PREFECT_PORT = 4200
TENSORBOARD_PORT = 6006
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


class Stopped(Exception):
    """SIGINT or SIGTERM arrived while a server was starting; the ones started are stopped."""


class Signals:
    """While in use, SIGINT and SIGTERM only record that a stop was asked for and pass the signal
    on to the process trees of the registered children. No start or stop of a server is cut
    halfway by an exception, so none is left running; the command then ends in its own time."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.children: list[int] = []
        self._saved: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for pid in self.children:
            forward(pid, signum)

    def adopt(self, process: subprocess.Popen[Any]) -> None:
        """Pass later signals on to `process` and its descendants (and one that came already)."""
        self.children.append(process.pid)
        if self.received is not None:
            forward(process.pid, self.received)

    def check(self) -> None:
        """Raise Stopped if a signal came."""
        if self.received is not None:
            raise Stopped(signal.Signals(self.received).name)


def forward(pid: int, signum: int) -> None:
    """Send `signum` to process `pid` and its descendants, those that are still there."""
    import psutil

    try:
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """True if an HTTP GET of `url` succeeds."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until(
    url: str, process: subprocess.Popen[Any], what: str, timeout_s: float, log: Path, signals: Signals | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if signals:
            signals.check()
        if answers(url, 1.0):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.terminate()
    tail = log.read_text()[-1500:] if log.exists() else ""
    raise PipelineError(f"{what} did not start within {timeout_s:.0f} s (see {log}):\n{tail}")


class Watchdog(threading.Thread):
    """Start a server again, on the same port and database, whenever its process ends before `stop()`.

    Prefect's clients retry a refused request for about a minute, so a stage whose server died
    goes on once it is back, and loses nothing. `on_restart()` runs once it answers again.
    The first restart is at once; each further one within `window_s` waits twice as long as the
    one before (from `backoff_s`, at most 30 s). A server that dies again after `max_restarts`
    restarts within `window_s` is left down, with a message: it would only die again (see its log).
    """

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[Any]],
        process: subprocess.Popen[Any],
        url: str,
        what: str,
        on_restart: Callable[[], None] | None = None,
        max_restarts: int = 5,
        window_s: float = 300.0,
        backoff_s: float = 2.0,
        log: Path | None = None,
    ):
        super().__init__(daemon=True, name=f"watchdog {what}")
        self.start_server, self.process, self.url, self.what, self.on_restart = start, process, url, what, on_restart
        self.max_restarts, self.window_s, self.backoff_s, self.log = max_restarts, window_s, backoff_s, log
        self.stopping = threading.Event()
        self.restarts = 0
        self.gave_up = False

    def run(self) -> None:
        recent: list[float] = []  # when the restarts within the window began
        while not self.stopping.wait(1.0):
            if self.process.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in recent if now - t < self.window_s]
            if len(recent) >= self.max_restarts:
                self.gave_up = True
                print(
                    f"{self.what} stopped {len(recent) + 1} times within {self.window_s:.0f} s (last exit status "
                    f"{self.process.returncode}); not starting it again{f': see {self.log}' if self.log else ''}.",
                    file=sys.stderr,
                    flush=True,
                )
                return
            delay = min(self.backoff_s * 2 ** (len(recent) - 1), 30.0) if recent else 0.0
            print(
                f"{self.what} stopped (exit status {self.process.returncode}); starting it again"
                f"{f' in {delay:.0f} s' if delay else ''}.",
                file=sys.stderr,
                flush=True,
            )
            if self.stopping.wait(delay):
                return
            recent.append(time.monotonic())
            self.process = self.start_server()
            self.restarts += 1
            while not self.stopping.is_set() and self.process.poll() is None and not answers(self.url, 1.0):
                time.sleep(0.5)
            if self.process.poll() is None and not self.stopping.is_set():
                print(f"{self.what} answers again.", file=sys.stderr, flush=True)
                if self.on_restart:
                    self.on_restart()

    def stop(self) -> subprocess.Popen[Any]:
        """Stop watching; the server process of the moment, for the caller to stop."""
        self.stopping.set()
        self.join()
        return self.process


class Stranger(PipelineError):
    """Something that is not a server of this project answers on the port asked for."""


class AlreadyRunning(PipelineError):
    """The project's server runs on the port already, and the caller asked to start one, not to use one."""


def stranger_message(host: str, port: int) -> str:
    return (
        f"Something answers on {host}:{port} that is not a Prefect server this project started: "
        f"{localserver.describe_listener(port)}. Nothing was sent to it. Stop it, or pick another port "
        f"(mnist dashboards --prefect-port), or, to use that server on purpose, set PREFECT_API_URL to it "
        f"(and {CLIENT_AUTH_ENV} if it asks for one)."
    )


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[int]:
    """An flock of `mode` on `path` (created if missing), held while in the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def prefect_server(
    host: str = "127.0.0.1",
    port: int = PREFECT_PORT,
    log: Path | None = None,
    database_url: str | None = None,
    signals: Signals | None = None,
    restart: bool = False,
    on_restart: Callable[[str], None] | None = None,
    auth: bool = True,
    reuse: bool = True,
) -> Iterator[str]:
    """Yield the API URL of a Prefect server on host:port: this project's server already running
    there (`reuse=False`: AlreadyRunning instead), or one started now. Anything else answering on
    the port raises Stranger.

    A server started here asks every client for an auth string: PREFECT_SERVER_API_AUTH_STRING if
    set, else a random one (`auth=False`: none). It is recorded for other commands of this user
    (pipeline/localserver.py), and for the block PREFECT_API_AUTH_STRING in os.environ holds it, so
    child processes send it. Checking and starting happen under a lock, so two commands starting
    at once get one server. It is stopped on exit, once no other command is using it (they hold
    the port's `users` lock, and touch its file when they let it go); a server that was running
    already is left alone.
    Its database is `database_url` (a PostgreSQL URL, postgresql+asyncpg://...) if given, else
    PREFECT_SERVER_DATABASE_CONNECTION_URL if set, else Prefect's SQLite file under PREFECT_HOME.
    With `signals`, a SIGINT or SIGTERM during start-up stops it and raises Stopped. With `restart`,
    a server started here that dies is started again (Watchdog), and `on_restart` runs once it answers.
    """
    api = f"http://{host}:{port}/api"
    records = localserver.folder()
    log = log or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The UI calls the API at PREFECT_SERVER_API_HOST/PORT; --port alone leaves it calling 4200.
    env = {**os.environ, "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env[DATABASE_ENV] = database_url
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    secret = os.environ.get(AUTH_ENV) or (localserver.new_auth() if auth else None)
    if secret:
        env[AUTH_ENV] = secret
    else:
        env.pop(AUTH_ENV, None)

    def start() -> subprocess.Popen[Any]:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=DIE_WITH_PARENT,
            )
        localserver.write(localserver.Record(pid=process.pid, port=port, auth=secret))
        return process

    process, watchdog, saved_auth = None, None, os.environ.get(CLIENT_AUTH_ENV)
    with ExitStack() as users:
        with _locked(records / f"{port}.lock", fcntl.LOCK_EX):
            # a command stopping its server holds `users` exclusively until the server is gone
            users_fd = users.enter_context(_locked(localserver.users_path(port), fcntl.LOCK_SH))
            record = localserver.ours(port)
            if record is None and answers(f"{api}/health"):
                raise Stranger(stranger_message(host, port))
            if record is not None and not reuse:
                raise AlreadyRunning(f"The project's Prefect server runs on {host}:{port} already (PID {record.pid}).")
            if record is not None:
                secret = record.auth
            else:
                fcntl.flock(users_fd, fcntl.LOCK_UN)  # the starter is no user: it waits for the users at its end
                process = start()
                try:
                    _wait_until(f"{api}/health", process, f"The Prefect server on {host}:{port}", 90, log, signals)
                except BaseException:
                    localserver.forget(port, process.pid)
                    raise
                if secret and not os.environ.get(AUTH_ENV):  # shown once: the browser asks for it
                    print(f"Prefect: started a server on {host}:{port}; its UI asks for this auth string: {secret}", flush=True)
        try:
            if secret:
                os.environ[CLIENT_AUTH_ENV] = secret
            if process is not None and restart:
                after = (lambda: on_restart(api)) if on_restart else None
                watchdog = Watchdog(start, process, f"{api}/health", f"The Prefect server on {host}:{port}", after, log=log)
                watchdog.start()
            yield api
        finally:
            if saved_auth is None:
                os.environ.pop(CLIENT_AUTH_ENV, None)
            else:
                os.environ[CLIENT_AUTH_ENV] = saved_auth
            if process is None:  # a user: the server's last use is now (a background keeper's idle time counts from it)
                _touch(localserver.users_path(port))
            else:
                if watchdog:
                    process = watchdog.stop()
                try:
                    fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(
                        f"Prefect: other commands still use the server on {host}:{port}; stopping it once they end ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    fcntl.flock(users_fd, fcntl.LOCK_EX)
                localserver.forget(port, process.pid)
                stop(process)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


# --- the background servers of a bare `dvc repro` ------------------------------------------------

KEEPER_EXIT_RUNNING = 3  # `keep`'s exit status when the project's server runs on the port already
SWEEP_S = 10.0  # how often the keeper looks for killed stages while stages use its server


def keep(port: int, idle_s: float) -> int:
    """`python -m pipeline.servers keep PORT IDLE_S`: start the project's Prefect server on 127.0.0.1:PORT (its
    database and auth string as `mnist dashboards` gives them), keep it (started again if it dies), and stop it
    once no command or stage has used it for `idle_s` seconds (wait_idle), or on SIGTERM or SIGINT
    (`mnist dashboards --stop`). A bare `dvc repro`'s first stage starts it detached (pipeline/stage.py); its
    record, localserver.keeper_path, is how `mnist dashboards --stop` finds it. Exit status 0 when it stopped,
    KEEPER_EXIT_RUNNING if the project's server ran there already, 1 if it could not start one."""
    me = os.getpid()
    path = localserver.keeper_path(port)
    with Signals() as signals:
        try:
            localserver.write_json(path, {"pid": me, "started": localserver.started_at(me), "port": port, "idle_s": idle_s})
            with prefect_server("127.0.0.1", port, signals=signals, restart=True, reuse=False) as api:
                print(f"keeping {api}; it stops after {localserver.idle_words(idle_s)} without a stage", flush=True)
                reason = wait_idle(localserver.users_path(port), idle_s, signals, every=lambda: mark_killed_stages(api))
                print(f"stopping the server: {reason}", flush=True)
        except AlreadyRunning:
            return KEEPER_EXIT_RUNNING
        except Stopped:
            return 0
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            record = localserver.read_json(path)
            if record and record.get("pid") == me:
                path.unlink(missing_ok=True)
    return 0


def mark_killed_stages(api: str) -> None:
    """Mark the stage runs whose process is gone, and their pipeline runs, Crashed on the server at `api`: a
    bare `dvc repro` whose stage was killed has no run command left to do it (pipeline/orphans.py), and a
    Crashed pipeline run sends the alert of `mnist alerts`."""
    from pipeline.orphans import mark_orphans  # Prefect's client: imported once a stage uses the server

    mark_orphans(api)


def wait_idle(
    users: Path, idle_s: float, signals: Signals, every: Callable[[], None] | None = None, every_s: float = SWEEP_S
) -> str:
    """Return, saying why, once SIGTERM or SIGINT came or no command or stage has held `users` (each holds a
    shared flock on it while it uses the server) for `idle_s` seconds, counted from the later of the last
    time one was seen holding it and the file's modification time (each touches it as it starts and ends).
    Meanwhile, call `every` each `every_s` seconds while a command or stage holds it."""
    fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
    last_busy = last_call = time.time()
    step = max(0.2, min(2.0, idle_s / 5))
    try:
        while signals.received is None:
            if every is not None and time.time() - last_call >= every_s and time.time() - last_busy < every_s + step:
                every()
                last_call = time.time()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                last_busy = time.time()
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                last = max(last_busy, os.stat(users).st_mtime)
                if time.time() - last >= idle_s:
                    return f"no stage or command used it for {localserver.idle_words(idle_s)}"
            time.sleep(step)
        return f"stopped by {signal.Signals(signals.received).name}"
    finally:
        os.close(fd)


def stop_background(timeout_s: float = 30.0) -> list[str]:
    """Stop the servers that bare `dvc repro` runs started in the background for this user (under this
    PREFECT_HOME): every recorded keeper (keep) and warm stage server (pipeline/warm.py), each only if its
    recorded PID is still that process. Lines saying what was stopped, or what is still stopping."""
    folder = localserver.folder()
    found: list[tuple[int, str]] = []
    for path in sorted(folder.glob("*.keeper.json")):
        record = localserver.read_json(path)
        if record and localserver.is_process(int(record["pid"]), float(record.get("started") or 0), "pipeline.servers"):
            found.append((int(record["pid"]), f"the Prefect server on 127.0.0.1:{record['port']}"))
    for path in sorted(folder.glob("warm-*.json")):
        record = localserver.read_json(path)
        if record and localserver.is_process(int(record["pid"]), float(record.get("started") or 0), "pipeline.warm"):
            found.append((int(record["pid"]), f"the warm stage server of {record['root']}"))
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while not all(_ended(pid) for pid, _ in found) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [
        f"{what} (PID {pid}) is still stopping: it waits for the commands and stages that use it to end"
        if not _ended(pid)
        else f"stopped {what} (PID {pid})"
        for pid, what in found
    ]


def _ended(pid: int) -> bool:
    """True if process `pid` is gone, or is a zombie (detached, its parent is init, which may reap it late)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


LIVE_RUNS = "training"  # the live runs' folder in a runs view: their runs are named training/...


def link_runs(view: Path, logdir: Path, live: Path) -> None:
    """Make `view` hold an absolute symlink to each entry of `logdir`, under its own name, and one named
    LIVE_RUNS to `live` (which may not exist yet); remove the links that point elsewhere or at an entry gone."""
    logdir, live = Path(os.path.abspath(logdir)), Path(os.path.abspath(live))
    try:
        names = os.listdir(logdir)
    except FileNotFoundError:
        names = []
    wanted = {name: str(logdir / name) for name in names if name != LIVE_RUNS}
    wanted[LIVE_RUNS] = str(live)
    for entry in os.scandir(view):
        if entry.is_symlink() and os.readlink(entry.path) != wanted.get(entry.name):
            os.unlink(entry.path)
    for name, target in wanted.items():
        try:
            os.symlink(target, view / name)
        except FileExistsError:
            pass


@contextmanager
def runs_view(logdir: Path, live: Path, view: Path, period_s: float = 2.0) -> Iterator[Path]:
    """`view`, a folder of symlinks (link_runs) that one `tensorboard --logdir` serves as `logdir` and `live`
    together, the runs named as `--logdir_spec {logdir},training:{live}` named them.

    --logdir_spec is no use: TensorBoard's projector plugin takes its folder from --logdir alone
    (tensorboard/backend/application.py: `TBContext(logdir=flags.logdir, ...)`, empty under --logdir_spec),
    so it stayed inactive. TensorBoard follows symlinked folders (both its loaders), and a link goes
    on resolving when DVC replaces the folder it names. The links are made again every `period_s`, for
    a stage's first run in `logdir`, and removed on exit. An flock on `view` keeps a second command
    from sharing (and removing) them."""
    view.mkdir(parents=True, exist_ok=True)
    if view.is_symlink() or not view.is_dir():
        raise PipelineError(f"{view} is not a folder: TensorBoard's runs are linked there. Move it away.")
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"Another command of this project serves TensorBoard from {view}: stop it, or pick another port "
                "(mnist dashboards --tensorboard-port)."
            ) from None
        link_runs(view, logdir, live)
        stopping = threading.Event()

        def keep_linked() -> None:
            while not stopping.wait(period_s):
                try:
                    link_runs(view, logdir, live)
                except OSError as e:
                    print(f"TensorBoard: could not link the runs into {view}: {e}", file=sys.stderr, flush=True)

        keeper = threading.Thread(target=keep_linked, daemon=True, name="tensorboard runs view")
        keeper.start()
        try:
            yield view
        finally:
            stopping.set()
            keeper.join()
            for entry in os.scandir(view):
                if entry.is_symlink():
                    os.unlink(entry.path)
    finally:
        os.close(fd)


@contextmanager
def tensorboard_server(
    logdir: Path,
    host: str = "127.0.0.1",
    port: int = TENSORBOARD_PORT,
    log: Path | None = None,
    live: Path | None = None,
    signals: Signals | None = None,
) -> Iterator[str]:
    """Yield the URL of a TensorBoard serving `logdir` on host:port; stopped on exit.

    `live`, if given, is served too, its runs named `training/...`: the TensorBoard events of
    training runs in progress, which move into `logdir` when they complete. Both are then served
    through a runs view beside `logdir` (`.tensorboard-<port>.runs/`), so that every plugin sees
    them, the projector included. With `signals`, a SIGINT or SIGTERM during start-up stops it
    and raises Stopped.
    """
    url = f"http://{host}:{port}"
    log = log or Path(logdir).parent / f".tensorboard-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if live is not None:
            logdir = stack.enter_context(runs_view(logdir, live, Path(logdir).parent / f".tensorboard-{port}.runs"))
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tensorboard.main",
                    "--logdir",
                    str(logdir),
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--reload_interval",
                    "5",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=DIE_WITH_PARENT,
            )
        try:
            _wait_until(f"{url}/data/logdir", process, f"TensorBoard on {host}:{port}", 90, log, signals)
            yield url
        finally:
            stop(process)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.servers keep PORT IDLE_S` (see keep)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "keep":
        print("usage: python -m pipeline.servers keep PORT IDLE_S", file=sys.stderr)
        return 2
    return keep(int(argv[1]), float(argv[2]))


if __name__ == "__main__":
    sys.exit(main())
