"""Warm stage starts: each stage process forked from one that has already imported everything.

Every stage command in dvc.yaml is `python -m pipeline.warm stages/<stage>.py ARGS`. On its own
that is `python stages/<stage>.py ARGS`: the launcher, which imports nothing heavy, replaces
itself with that command (os.execv). A stage process spends about 3 s importing TensorFlow,
Keras and Prefect before its work begins, 28 times per full run; so `mnist run` also starts a
warm server (`serve`) that imports every stage script once, and tells the stages where it
listens ($PIPELINE_WARM_SOCKET). The launcher then hands its script, arguments, working
directory, environment and stdin/stdout/stderr to the server, which forks a child to run the
script; the launcher waits and exits as the child did (same status, same signal).

What the child runs is what `python stages/<stage>.py` would run: the same files (the server
refuses, and the launcher starts cold, when the working directory is another one or a module
the server imported changed on disk since), a fresh `__main__`, the launcher's environment; and it
ends as that would (status, atexit handlers, threads), less the teardown of the modules, 0.2 s.
SIGINT, SIGTERM and SIGHUP sent to the launcher are passed on to the child; a launcher that
dies (SIGKILL) takes its child with it, and the server dies with the command that started it.

A bare `dvc repro` (or `dvc exp run`, a queued experiment) has no such command: its first stage
starts a background server for its project folder instead (`start_background`, called by
pipeline/stage.py), detached from DVC. It records itself in $PREFECT_HOME/mnist-servers/
(localserver.warm_path), where later launchers in the same folder find it, and ends by itself
after localserver.idle_s() without a stage, when its folder is gone or a module it imported
changes on disk, or on SIGTERM (`mnist dashboards --stop`).

`python -m pipeline.warm -m MODULE ARGS` does the same for `python -m MODULE ARGS`: the export
stage checks its SavedModel this way, in a new process that has imported TensorFlow but never
built or loaded a model (pipeline/export.py).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from pipeline import localserver

SOCKET_ENV = "PIPELINE_WARM_SOCKET"
RUN_ID_ENV = "PIPELINE_RUN_ID"  # set by a run command (`mnist run`, `mnist flow`, the fan-out), which brings its own servers
LAUNCHED_ENV = "PIPELINE_STAGE_LAUNCHED"  # "<unix time> warm|cold": when and how the launcher started the stage
LAUNCHED_BY_ENV = "PIPELINE_LAUNCHED_BY"  # the PID of the process that started the launcher (DVC): one pipeline run
# DVC runs a stage's command with `$SHELL -c` (else /bin/sh). bash and zsh replace themselves with the
# command; dash (Debian's /bin/sh) and fish stay its parent, one shell per stage, so the launcher looks past them.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh", "ash", "busybox"})
MAX_MESSAGE = 1 << 20  # a request: the script, its arguments, the working directory and the environment
EXCHANGE_TIMEOUT_S = 30.0  # for a request and its reply; the stage's own run has no limit
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A stage still running this long after a forwarded signal is killed: an exception raised by a signal handler
# can leave a lock held (in Prefect's log handler, say), and the stage then waits on it for ever.
STOP_GRACE_S = 20
# Variables that libraries read when they are imported (Prefect's settings, TensorFlow's, Python's):
# a stage whose values differ from the server's starts cold.
READ_AT_IMPORT = ("PREFECT_", "TF_", "CUDA_", "KERAS_", "OMP_", "OPENBLAS_", "PYTHON")
# numpy's OpenBLAS starts a worker thread per core when imported. The stages do no BLAS work in
# numpy (TensorFlow has its own threads, started later), and the server only forks while it has
# a single thread: so a stage, warm or cold, runs with one OpenBLAS thread unless the user says otherwise.
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1"}
# Modules that the stages import only once they run (Prefect's engines and the encoder it takes from
# FastAPI, DVCLive's DVC, TensorBoard's summary ops): about 0.15 s per stage, 0.25 s per train stage,
# found with PYTHONPROFILEIMPORTTIME=1 on a warm `mnist run`. The server imports them too, where they exist.
IMPORTED_LATER = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.utilities.visualization",
    "fastapi.encoders",
    "anyio._core._sockets",
    "anyio._core._streams",
    "rich._emoji_codes",
    "dvc.repo",
    "dvc.scm",
    "dvc.dirs",
    "tensorboard.summary.v2",
)


def _die_with_parent() -> None:
    """Run in a child process before it starts (Linux): the kernel sends it SIGTERM when the
    process that started it dies, even by SIGKILL, so no server or stage outlives its command."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
DIE_WITH_PARENT: Callable[[], None] | None
if sys.platform == "linux":  # looked up here: after fork, the child only calls it
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
    _PRCTL, _FFLUSH = _LIBC.prctl, _LIBC.fflush
    DIE_WITH_PARENT = _die_with_parent
else:
    DIE_WITH_PARENT = _FFLUSH = None


# --- the launcher: the stage command DVC runs ---------------------------------------------------


def launched_by() -> int:
    """The PID of the process that ran the stage command (DVC for a `dvc repro`), past the shell it ran it in.

    Reads /proc (Linux; psutil's import would cost each stage 15 ms); elsewhere the parent's PID."""
    pid = os.getppid()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()  # "PID (NAME) STATE PPID ..."
    except OSError:
        return pid
    name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 1 :].split()
    return int(fields[1]) if name in SHELLS else pid


def launch(argv: list[str]) -> None:
    """Run `python SCRIPT ARGS...` (or `python -m MODULE ARGS...`) in a child of the warm server if one
    answers, else here, cold."""
    if not argv or not (argv[0].endswith(".py") or (argv[0] == "-m" and len(argv) > 1)):
        sys.exit("usage: python -m pipeline.warm stages/<stage>.py [ARGS...]  (or: -m MODULE [ARGS...])")
    for name, value in ONE_THREAD.items():
        os.environ.setdefault(name, value)
    os.environ[LAUNCHED_BY_ENV] = str(launched_by())
    if DIE_WITH_PARENT:  # the stage goes when DVC does, even killed outright (kept across os.execv)
        parent = os.getppid()
        DIE_WITH_PARENT()
        if os.getppid() != parent:  # DVC was gone before the call
            sys.exit(f"{argv[0]}: the process that started it ended; not running")
    path = os.environ.get(SOCKET_ENV)
    if path:
        os.environ[LAUNCHED_ENV] = f"{time.time():.6f} warm"
        status = _run_warm(path, argv)
        if status is not None:
            _exit_like(status)
    elif not os.environ.get(RUN_ID_ENV) and (path := background_socket(Path.cwd().resolve(), os.environ)):
        os.environ[LAUNCHED_ENV] = f"{time.time():.6f} warm"
        os.environ[SOCKET_ENV] = path  # in the request: the stage and its own launchers use the same server
        status = _run_warm(path, argv, quiet=True)
        if status is not None:
            _exit_like(status)
        del os.environ[SOCKET_ENV]  # gone since it was recorded: the stage starts cold, and may start a new one
    os.environ[LAUNCHED_ENV] = f"{time.time():.6f} cold"
    os.execv(sys.executable, [sys.executable, *argv])


def launched() -> tuple[float, str] | None:
    """When the launcher started this stage process (unix time), and "warm" or "cold"; None without a launcher."""
    when, _, how = os.environ.get(LAUNCHED_ENV, "").partition(" ")
    try:
        return float(when), how
    except ValueError:
        return None


def _run_warm(path: str, argv: list[str], quiet: bool = False) -> int | None:
    """The child's exit status (negative: the signal that ended it), or None if the server cannot take the run.
    `quiet`: a server that is not there (a background one that just ended) is not worth a note."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(EXCHANGE_TIMEOUT_S)
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if quiet:
                return None
            raise
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = json.loads(conn.recv(MAX_MESSAGE) or b"{}")
        conn.settimeout(None)  # from here on, the wait is the stage's run
    except (OSError, ValueError) as exc:
        print(f"warm start not possible ({exc}); starting {argv[0]} cold", file=sys.stderr)
        return None
    if "pid" not in reply:
        print(f"warm start refused: {reply.get('refused', 'no answer')}; starting {argv[0]} cold", file=sys.stderr)
        return None
    child = reply["pid"]

    def forward(signum: int, frame: object) -> None:
        _send(child, signum)
        if left := signal.alarm(STOP_GRACE_S):  # armed already by an earlier signal: that one's deadline holds
            signal.alarm(left)

    def kill(signum: int, frame: object) -> None:
        print(f"{argv[0]}: still running {STOP_GRACE_S} s after it was asked to stop; killed", file=sys.stderr)
        _send(child, signal.SIGKILL)

    signal.signal(signal.SIGALRM, kill)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    end = conn.recv(MAX_MESSAGE)  # the supervisor's last word: the child's exit status
    if not end:
        print(f"the warm stage process {child} ended without reporting its status", file=sys.stderr)
        return 1
    return int(json.loads(end)["status"])


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exit_like(status: int) -> None:
    """Exit with `status`; for a child ended by a signal, end by the same signal, as DVC would have seen it."""
    if status < 0:
        sys.stdout.flush(), sys.stderr.flush()
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status if status >= 0 else 128 - status)


# --- the server: started by `mnist run` ----------------------------------------------------------


@contextmanager
def server(root: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A warm server for the stages of `root`, started with `env` (the stages' own); yields the
    variable that points the launchers at it. It gets ready in a few seconds: stages that start
    before then start cold. Stopped on exit; it also dies with this process."""
    with tempfile.TemporaryDirectory(prefix="mnist-warm-") as folder:
        path = str(Path(folder) / "socket")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.warm", "--serve", path],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=DIE_WITH_PARENT,
        )
        try:
            yield {SOCKET_ENV: path}
        finally:
            stop(process)


def kept_server(root: Path, env: Mapping[str, str], timeout_s: float = 60.0) -> dict[str, str]:
    """The variable that points stages at the background server of `root` for `env` (start_background), started
    now if none runs, and waited for: unlike `server`'s, it outlives the command, so the next run in `root`
    finds it ready, until localserver.idle_s() passes without a stage. Empty (the stages start cold) when that
    is 0, or when the server is not ready within `timeout_s`."""
    idle_s = localserver.idle_s()
    if idle_s <= 0:
        return {}
    env = {**ONE_THREAD, **env}  # as the launchers and the server see it (launch, background)
    stop_if_stale(root)
    if background_socket(root, env) is None:
        start_background(root, env, idle_s)
    deadline = time.monotonic() + timeout_s
    while (path := background_socket(root, env)) is None:
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.1)
    return {SOCKET_ENV: path}


def stop_if_stale(root: Path, timeout_s: float = 30.0) -> None:
    """Stop the background server of `root` if a source file of its stages changed since it started (a checkout
    of other code, the folder cloned again): it would refuse every stage until its next check. Returns once it
    has ended (or after `timeout_s`)."""
    record_path = localserver.warm_path(root)
    record = localserver.read_json(record_path)
    if not record:
        return
    pid, started = int(record["pid"]), float(record.get("started") or 0)
    try:
        ready = record_path.stat().st_mtime  # written once its imports were done; the file system's clock, as the sources'
    except FileNotFoundError:  # it ended meanwhile
        return
    sources = [*root.glob("stages/*.py"), *root.glob("pipeline/**/*.py")]
    if all(path.stat().st_mtime <= ready for path in sources) or not localserver.is_process(pid, started, "pipeline.warm"):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while localserver.is_process(pid, started, "pipeline.warm") and time.monotonic() < deadline:
        time.sleep(0.1)


def import_fingerprint(env: Mapping[str, str]) -> str:
    """A digest of the variables in `env` that the server reads when it imports (READ_AT_IMPORT): a launcher
    whose digest differs from a background server's does not ask it (it would refuse), and starts cold."""
    read = sorted((k, v) for k, v in env.items() if k.startswith(READ_AT_IMPORT))
    return hashlib.sha256(json.dumps(read).encode()).hexdigest()


def background_socket(root: Path, env: Mapping[str, str]) -> str | None:
    """The socket of the background server of the project folder `root`, if one is recorded for the same
    variables as `env`'s (import_fingerprint); else None."""
    record = localserver.read_json(localserver.warm_path(root))
    if not record or record.get("root") != str(root) or record.get("env") != import_fingerprint(env):
        return None
    path = record.get("socket")
    return path if isinstance(path, str) and os.path.exists(path) else None


def initial_environ() -> dict[str, str]:
    """This process's environment as it started (Linux: /proc/self/environ), before any import set a
    variable: for a cold stage, the launcher's; else os.environ as it is now."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {os.fsdecode(name): os.fsdecode(value) for name, _, value in pairs}


def start_background(root: Path, env: Mapping[str, str], idle_s: float) -> bool:
    """Start the background server of the project folder `root`, with `env` (the stages' own), detached: it
    outlives the stage and DVC, and ends after `idle_s` seconds without a stage (serve). True if one was
    started; False if one runs already or is starting (it holds the folder's lock)."""
    lock = localserver.warm_path(root, ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    subprocess.Popen(
        [sys.executable, "-m", "pipeline.warm", "--background", str(idle_s)],
        cwd=root,
        env={k: v for k, v in env.items() if k != SOCKET_ENV},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in DVC's process group: a Ctrl-C of the run does not reach it
    )
    return True


_LOCK_FD: int | None = None  # a background server's lock on its folder's record, closed in every fork


def background(root: Path, idle_s: float) -> None:
    """Serve `root`'s stages in the background: take the folder's lock (else another one serves, and this one
    ends at once), listen in a new private folder, record the socket, serve until idle, and clean up."""
    global _LOCK_FD
    record_path = localserver.warm_path(root)
    _LOCK_FD = os.open(localserver.warm_path(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(_LOCK_FD, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    remove_leftover(localserver.read_json(record_path))
    folder = tempfile.mkdtemp(prefix="mnist-warm-")  # 0700
    path = str(Path(folder) / "socket")
    for name, value in ONE_THREAD.items():  # as the launchers set it before they look for a server
        os.environ.setdefault(name, value)
    me, fingerprint = os.getpid(), import_fingerprint(os.environ)  # the environment as the launchers have it

    def record() -> None:
        started = localserver.started_at(me)
        data = {"pid": me, "started": started, "root": str(root), "socket": path, "env": fingerprint}
        localserver.write_json(record_path, {**data, "idle_s": idle_s})

    try:
        serve(path, root, idle_s=idle_s, on_ready=record)
    finally:
        if os.getpid() == me:
            current = localserver.read_json(record_path)
            if current and current.get("pid") == me:
                record_path.unlink(missing_ok=True)
            Path(path).unlink(missing_ok=True)
            os.rmdir(folder)


def remove_leftover(record: dict[str, Any] | None) -> None:
    """Remove the socket and folder named by the record of a background server that no longer runs (one killed
    before it could clean up; the caller holds the folder's lock, so none runs): the folder only if it is a
    `mnist-warm-` folder and nothing else is left in it."""
    socket_path = Path(str((record or {}).get("socket") or ""))
    if not socket_path.parent.name.startswith("mnist-warm-"):
        return
    socket_path.unlink(missing_ok=True)
    try:
        socket_path.parent.rmdir()
    except OSError:  # gone already, or something else is in it: not this project's to delete
        pass


def stop(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    """End a server process: SIGTERM, then SIGKILL if it has not ended after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(path: str, root: Path, idle_s: float | None = None, on_ready: Callable[[], None] | None = None) -> None:
    """Import every stage script of `root`, then fork a stage process for each launcher that connects.

    Listens on the Unix socket `path` (created only when ready, then `on_ready` runs); ends on SIGTERM,
    or when the process that started it is gone. With `idle_s` (a background server) it outlives the
    process that started it, and ends instead once no stage has started or run for `idle_s` seconds,
    once `root` is gone, or once a module it imported changed on disk (the next stage starts a new one).
    """
    import gc
    import importlib
    import runpy

    server, parent = os.getpid(), os.getppid()
    os.chdir(root)
    for name, value in ONE_THREAD.items():
        os.environ.setdefault(name, value)
    for script in sorted((root / "stages").glob("*.py")):
        runpy.run_path(str(script), run_name="__warm__")  # its imports and definitions; not its main block
    for name in IMPORTED_LATER:
        try:
            importlib.import_module(name)
        except ImportError:  # another version of the library: the stages import what they need themselves
            pass
    loaded = _module_times(root)
    gc.freeze()  # the imported objects stay shared with the children, untouched by their collections
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the stage (via its launcher), not for the server
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(1.0)
    last_used = time.monotonic()
    if on_ready:
        on_ready()
    try:
        while idle_s is not None or os.getppid() == parent:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if idle_s is None:
                    continue
                if _has_children():
                    last_used = time.monotonic()
                elif time.monotonic() - last_used >= idle_s or not root.is_dir() or _changed(loaded):
                    return
                continue
            with conn:
                _answer(conn, listener, root, loaded)
            last_used = time.monotonic()
            if idle_s is not None and _changed(loaded):  # that stage was refused; the next one starts a new server
                return
    finally:
        if os.getpid() == server:
            listener.close()
            Path(path).unlink(missing_ok=True)


def _has_children() -> bool:
    """True while a supervisor forked by this server (and so a stage) is running."""
    import psutil

    return bool(psutil.Process().children())


def _changed(loaded: dict[str, int]) -> bool:
    return any(_mtime(name) != mtime for name, mtime in loaded.items())


def _answer(conn: socket.socket, listener: socket.socket, root: Path, loaded: dict[str, int]) -> None:
    """Take one launcher's request: fork a supervisor for it, or refuse it. A bad request, a launcher
    gone mid-way or a failed fork is refused (the launcher then starts cold); the server goes on."""
    fds: list[int] = []
    try:
        conn.settimeout(EXCHANGE_TIMEOUT_S)
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        conn.settimeout(None)
        refused = _peer_refusal(conn) or _request_refusal(message, fds, root, loaded)
        if refused:
            conn.send(json.dumps({"refused": refused}).encode())
            return
        sys.stdout.flush(), sys.stderr.flush()
        if os.fork() == 0:
            try:
                listener.close()
                if _LOCK_FD is not None:  # the stage must not keep the folder's lock when the server ends
                    os.close(_LOCK_FD)
                _supervise(conn, json.loads(message), fds)  # never returns: it ends in os._exit
            finally:
                os._exit(1)  # an error in the supervisor must not go on as a second server
    except (OSError, ValueError) as exc:  # the launcher went away, or the fork failed
        try:
            conn.send(json.dumps({"refused": f"the server could not take the request ({exc})"}).encode())
        except OSError:
            pass
    finally:
        for fd in fds:
            os.close(fd)


def _peer_refusal(conn: socket.socket) -> str | None:
    """Why the process at the other end may not use this server (another account's), or None."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return None if uid == os.getuid() else f"the launcher runs as uid {uid}, the server as uid {os.getuid()}"


def _request_refusal(message: bytes, fds: list[int], root: Path, loaded: dict[str, int]) -> str | None:
    """Why the request cannot be run here: malformed, or to be run cold (see refusal); or None."""
    try:
        request = json.loads(message)
        if (
            len(fds) != 3
            or not isinstance(request, dict)
            or not isinstance(request.get("argv"), list)
            or not isinstance(request.get("cwd"), str)
            or not isinstance(request.get("env"), dict)
        ):
            return "a malformed request (argv, cwd, env and three streams expected)"
        threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
        if threads != 1:
            return f"the server runs {threads} threads, and a fork of it would hold their locks"
        return refusal(request, root, loaded)
    except ValueError:
        return "a malformed request (not JSON)"


def refusal(request: dict[str, Any], root: Path, loaded: dict[str, int]) -> str | None:
    """Why the server must not run `request` (the launcher then starts cold), or None."""
    if Path(request["cwd"]).resolve() != root:
        return f"the server runs the code of {root}, not of {request['cwd']}"
    read_at_import = {k for k in {**os.environ, **request["env"]} if k.startswith(READ_AT_IMPORT)}
    differs = sorted(k for k in read_at_import if os.environ.get(k) != request["env"].get(k))
    if differs:
        return f"${differs[0]} differs from the server's, and the server read it when it imported"
    changed = [name for name, mtime in loaded.items() if _mtime(name) != mtime]
    if changed:
        return f"{changed[0]} changed on disk since the server imported it"
    return None


def _module_times(root: Path) -> dict[str, int]:
    """Modification times of the project's files that are imported in this process."""
    code = (root / "pipeline", root / "stages")
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    times = {str(f): _mtime(str(f)) for f in files if f and any(Path(f).resolve().is_relative_to(c) for c in code)}
    times.update({str(s): _mtime(str(s)) for s in (root / "stages").glob("*.py")})
    return times


def _mtime(name: str) -> int:
    try:
        return os.stat(name).st_mtime_ns
    except OSError:
        return -1


def _supervise(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In a fork of the server: fork the stage process (set up as `python SCRIPT ARGS` would be), report
    its pid and then its exit status to the launcher."""
    os.setpgid(0, 0)  # signals to the server's process group reach the stage only through its launcher
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        _become_stage(conn, request, fds)
    conn.send(json.dumps({"pid": child}).encode())

    def launcher_gone() -> None:  # the launcher sends nothing more: EOF means it died
        conn.recv(1)
        _send(child, signal.SIGKILL)

    threading.Thread(target=launcher_gone, daemon=True).start()
    # WNOWAIT: the ended child stays a zombie until this process exits, so its pid is not reused
    # while the launcher_gone thread might still signal it.
    ended = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    status = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status  # type: ignore[union-attr]  # None only with WNOHANG
    try:
        conn.send(json.dumps({"status": status}).encode())
    finally:
        os._exit(0)


def _become_stage(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """Turn this fork into the stage process: the launcher's stdio, directory, environment, arguments, signals."""
    supervisor = os.getppid()
    conn.close()
    if DIE_WITH_PARENT:
        DIE_WITH_PARENT()  # SIGTERM when the supervisor dies
    if os.getppid() != supervisor:
        os._exit(1)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())  # type: ignore[union-attr]  # sys.stdout and sys.stderr are TextIOWrappers
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import runpy

    script, *args = request["argv"]
    if script == "-m":  # as `python -m MODULE ARGS`: a fresh __main__ run of the module's code
        module, *args = args
        sys.argv, sys.path[0] = [module, *args], os.getcwd()
        # The server imported the module already (as its stages do); runpy warns of that, needlessly here.
        warnings.filterwarnings("ignore", f"'{module}' found in sys.modules", RuntimeWarning)
        _exit_after(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    _exit_after(lambda: runpy.run_path(script, run_name="__main__"))


def _exit_after(run: Callable[[], object]) -> NoReturn:
    """Run the stage, then end this process as Python ends one (an uncaught exception printed, other
    threads joined, atexit handlers run, streams flushed, the same exit status, or SIGINT after an
    uncaught KeyboardInterrupt) but without tearing down every module: about 0.2 s with TensorFlow
    loaded, and the server's copies of them are not this process's to clean up."""
    interrupted = False
    try:
        run()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - the stage's error, whatever it is, is shown and becomes its exit status
        sys.excepthook(type(exc), exc, exc.__traceback__)
        status, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    run_atexit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if _FFLUSH:
        _FFLUSH(None)  # what C libraries wrote to their buffered stdout: exit() would flush it, os._exit does not
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


def run_atexit_handlers() -> None:
    """Run and clear the atexit handlers now, as interpreter exit would; Python has no public call for it
    (tests/test_compat.py pins what the stages rely on)."""
    atexit._run_exitfuncs()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(argv[1], Path.cwd().resolve())
    elif argv[:1] == ["--background"]:
        background(Path.cwd().resolve(), float(argv[1]))
    else:
        launch(argv)


if __name__ == "__main__":
    main()
