"""Warm stage starts (pipeline/warm.py): the launcher runs a stage script as a fork of a server that
imported it, or cold when there is none, with the same arguments, streams, status and signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SmallRun, project_env
from pipeline.warm import SOCKET_ENV

PROBE = """
import os, signal, sys, time
from pathlib import Path
out = Path(os.environ["PROBE_OUT"])
if __name__ == "__main__":  # the server imports it; only a run does this
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("PROBE_VAR"), "pid", os.getpid(), "ppid", os.getppid(), "by", os.environ.get("PIPELINE_LAUNCHED_BY"), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    out.with_suffix(".pid").write_text(str(os.getpid()))
    what = sys.argv[1]
    if what == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "wait-for-sigterm":
        signal.signal(signal.SIGTERM, lambda *_: (out.with_suffix(".term").write_text("got it"), sys.exit(7)))
        out.with_suffix(".ready").write_text("")
        time.sleep(120)
    if what == "sleep":
        out.with_suffix(".ready").write_text("")
        time.sleep(120)
    if what == "hang-on-sigterm":  # as a stage whose handler waits on a lock the signal left held
        import threading
        held = threading.Lock()
        held.acquire()
        signal.signal(signal.SIGTERM, lambda *_: held.acquire())
        out.with_suffix(".ready").write_text("")
        time.sleep(120)
    if what == "raise":
        raise RuntimeError("boom")
    if what == "interrupt":
        raise KeyboardInterrupt
    if what == "message":
        sys.exit("bad input")
    if what == "at-exit":
        import atexit, threading
        atexit.register(lambda: out.with_suffix(".atexit").write_text("ran"))
        late = lambda: (time.sleep(0.5), out.with_suffix(".thread").write_text("joined"))
        threading.Thread(target=late).start()
        sys.stdout.write("unflushed")
        sys.stdout.flush()
        import ctypes
        ctypes.CDLL(None).printf(b" from C")  # into the C library's buffer (stdout is a pipe), not yet written
        sys.exit(0)
    sys.exit(int(what))
"""


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A project folder with one stage script, the probe."""
    (tmp_path / "root" / "stages").mkdir(parents=True)
    (tmp_path / "root" / "stages" / "probe.py").write_text(PROBE)
    return tmp_path / "root"


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PROBE_OUT": str(tmp_path / "probe"), **extra}


@contextmanager
def warm_server(root: Path, env: dict[str, str]) -> Iterator[str]:
    """`python -m pipeline.warm --serve` in `root`; yields its socket once it listens."""
    path = str(root.parent / "warm.sock")
    server = subprocess.Popen([sys.executable, "-m", "pipeline.warm", "--serve", path], cwd=root, env=env)
    try:
        wait_for(lambda: os.path.exists(path) or server.poll() is not None, "the warm server")
        assert server.poll() is None, f"the warm server ended with {server.returncode}"
        yield path
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not os.path.exists(path), "the server left its socket behind"


def launch(root: Path, env: dict[str, str], *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.warm", "stages/probe.py", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_without_a_server_the_launcher_runs_the_script_itself(root: Path, tmp_path: Path) -> None:
    proc = launch(root, env_for(tmp_path, PROBE_VAR="x"), "3", "--flag")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert f"argv ['3', '--flag'] cwd {root} var x pid {proc.pid} " in out  # os.execv: the launcher's own process
    assert "to stderr" in err and "warm" not in err


def test_a_warm_start_is_a_fork_of_the_server_with_the_launchers_arguments_streams_and_status(root: Path, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path, "PROBE_VAR": "y"}, "5", "--flag")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert f"argv ['5', '--flag'] cwd {root} var y" in out
    pid = int(out.split(" pid ")[1].split()[0])
    ppid = int(out.split(" ppid ")[1].split()[0])
    assert pid != proc.pid and ppid != proc.pid, out  # not the launcher, nor its child
    assert "to stderr" in err and "cold" not in err


@pytest.mark.parametrize("shell", ["/bin/sh", "bash"])
def test_the_launcher_names_the_process_that_ran_the_command_past_its_shell(root: Path, tmp_path: Path, shell: str) -> None:
    """DVC runs a stage command with `$SHELL -c`, else /bin/sh: Debian's dash stays the command's parent
    (one shell per stage), bash replaces itself. Either way every stage of one `dvc repro` names DVC."""
    runner = (
        "import subprocess, sys\n"
        "cmd = f'{sys.executable} -m pipeline.warm stages/probe.py 0'\n"
        "print('runner', __import__('os').getpid(), flush=True)\n"
        "for _ in range(2):\n"
        "    subprocess.run([sys.argv[1], '-c', cmd], check=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", runner, shell], cwd=root, env=env_for(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    runner_pid = out.stdout.split("runner ")[1].split()[0]
    assert out.stdout.count(f" by {runner_pid}\n") == 2, out.stdout


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_a_module_runs_as_python_dash_m_would_run_it(root: Path, tmp_path: Path, how: str) -> None:
    """`-m MODULE`, as export's check runs: a module that the server imported runs again as __main__."""
    (root / "probepkg").mkdir()
    (root / "probepkg" / "__init__.py").write_text("")
    (root / "probepkg" / "probe.py").write_text(PROBE)
    (root / "stages" / "probe.py").write_text("import probepkg.probe\n")  # so the server imports it
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        launch_env = {**env, SOCKET_ENV: path} if how == "warm" else env
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.warm", "-m", "probepkg.probe", "6", "--flag"],
            cwd=root,
            env=launch_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 6, err
    assert f"argv ['6', '--flag'] cwd {root}" in out, out
    assert (f" pid {proc.pid} " in out) == (how == "cold"), out  # warm: a fork of the server, not the launcher
    assert err.strip() == "to stderr", err  # no refusal, no note of a cold start, no runpy warning


@pytest.mark.parametrize("what", ["raise", "interrupt", "message", "at-exit"])
def test_a_warm_stage_ends_as_a_cold_one_does(root: Path, tmp_path: Path, what: str) -> None:
    """Status, stderr, atexit handlers, threads and buffered output: as `python script` ends (warm.py skips
    only the teardown of the modules)."""
    ended = {}
    for how in ("cold", "warm"):
        for leftover in tmp_path.glob("probe.*"):
            leftover.unlink()
        env = env_for(tmp_path)
        env.pop("PYTHONUNBUFFERED", None)  # it would make the C library's stdout unbuffered too
        with warm_server(root, env) as path:
            proc = launch(root, {**env, SOCKET_ENV: path} if how == "warm" else env, what)
            out, err = proc.communicate(timeout=60)
        files = sorted(f.suffix for f in tmp_path.glob("probe.*") if f.suffix != ".pid")
        ended[how] = (proc.returncode, out.split(" pid ")[0] + out.split("\n", 1)[1], err.splitlines()[-1:], files)
    assert ended["warm"] == ended["cold"]
    expected = {"raise": 1, "interrupt": -signal.SIGINT, "message": 1, "at-exit": 0}[what]
    assert ended["warm"][0] == expected, ended
    if what == "at-exit":
        assert ended["warm"][1].endswith("unflushed from C") and ended["warm"][3] == [".atexit", ".thread"], ended


def test_a_signal_that_ends_the_stage_ends_the_launcher_the_same_way(root: Path, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path}, "sigkill")
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigterm_to_the_launcher_reaches_the_stage(root: Path, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path}, "wait-for-sigterm")
        wait_for(lambda: (tmp_path / "probe.ready").exists(), "the stage")
        proc.terminate()
        proc.communicate(timeout=60)
    assert (tmp_path / "probe.term").read_text() == "got it"
    assert proc.returncode == 7


def test_a_stage_that_hangs_after_sigterm_is_killed_after_the_grace_period(root: Path, tmp_path: Path) -> None:
    from pipeline.warm import STOP_GRACE_S

    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path}, "hang-on-sigterm")
        wait_for(lambda: (tmp_path / "probe.ready").exists(), "the stage")
        stage = psutil.Process(int((tmp_path / "probe.pid").read_text()))
        proc.terminate()
        _, err = proc.communicate(timeout=STOP_GRACE_S + 60)
        stage.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    assert f"still running {STOP_GRACE_S} s after it was asked to stop; killed" in err


def test_a_killed_launcher_takes_its_stage_with_it(root: Path, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path}, "sleep")
        wait_for(lambda: (tmp_path / "probe.ready").exists(), "the stage")
        stage = psutil.Process(int((tmp_path / "probe.pid").read_text()))
        proc.kill()
        proc.communicate(timeout=60)
        stage.wait(timeout=30)
        assert not stage.is_running()


@pytest.mark.parametrize("change", ["other folder", "edited script", "Prefect setting"])
def test_the_server_refuses_what_it_could_run_wrong_and_the_stage_starts_cold(root: Path, tmp_path: Path, change: str) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        cwd, launch_env = root, {**env, SOCKET_ENV: path}
        if change == "other folder":
            cwd = tmp_path / "copy"
            (cwd / "stages").mkdir(parents=True)
            (cwd / "stages" / "probe.py").write_text(PROBE)
        elif change == "edited script":
            script = root / "stages" / "probe.py"
            script.write_text(PROBE + "\n# edited\n")
            os.utime(script, ns=(time.time_ns(), time.time_ns() + 10**9))
        else:
            launch_env["PREFECT_API_URL"] = "http://127.0.0.1:1/api"
        proc = launch(cwd, launch_env, "0")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f" pid {proc.pid} " in out, out  # it ran in the launcher's own process
    assert "warm start refused" in err and "starting stages/probe.py cold" in err, err


def test_a_background_server_serves_its_folder_until_it_is_idle(root: Path, tmp_path: Path) -> None:
    """As a bare `dvc repro`'s first stage starts it (warm.start_background): detached, found by the launchers
    in its folder through its record, passed by a launcher whose import-time variables differ (cold, without a
    note), and gone with its record and socket after its idle time."""
    records = tmp_path / "prefect-home" / "mnist-servers"
    env = env_for(tmp_path, PREFECT_HOME=str(records.parent))
    env.pop("PIPELINE_RUN_ID", None)
    start = "import os, sys; from pathlib import Path; from pipeline import warm\n"
    start += "print(warm.start_background(Path(sys.argv[1]), dict(os.environ), 3.0))"
    started = subprocess.run([sys.executable, "-c", start, str(root)], env=env, capture_output=True, text=True, timeout=60)
    assert started.stdout.split() == ["True"], started.stderr
    wait_for(lambda: list(records.glob("warm-*.json")), "the background server's record")
    record = json.loads(next(records.glob("warm-*.json")).read_text())
    server = psutil.Process(record["pid"])
    try:
        assert record["root"] == str(root.resolve()) and os.path.exists(record["socket"])
        proc = launch(root, env, "0")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f" pid {proc.pid} " not in out and "warm" not in err, (out, err)  # a fork of the server
        proc = launch(root, {**env, "TF_PROBE": "1"}, "0")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f" pid {proc.pid} " in out and "warm" not in err, (out, err)  # its own process
        wait_for(lambda: ended(server), "the idle stop (3 s)")
        assert not list(records.glob("warm-*.json")) and not os.path.exists(record["socket"])
    finally:
        if not ended(server):
            server.kill()


def test_a_background_server_removes_the_socket_folder_of_a_killed_one(root: Path, tmp_path: Path) -> None:
    """A background server killed by SIGKILL leaves its socket folder in the temporary folder; the next one
    started for the same project folder removes it, and a file put beside the socket stays."""
    records = tmp_path / "prefect-home" / "mnist-servers"
    env = env_for(tmp_path, PREFECT_HOME=str(records.parent))
    env.pop("PIPELINE_RUN_ID", None)
    start = "import os, sys; from pathlib import Path; from pipeline import warm\n"
    start += "print(warm.start_background(Path(sys.argv[1]), dict(os.environ), 60.0))"
    servers: list[psutil.Process] = []
    try:
        sockets = []
        for _ in range(3):
            started = subprocess.run(
                [sys.executable, "-c", start, str(root)], env=env, capture_output=True, text=True, timeout=60
            )
            assert started.stdout.split() == ["True"], started.stderr
            wait_for(lambda: new_record(records, sockets), "the new server's record")
            record = new_record(records, sockets)
            servers.append(psutil.Process(record["pid"]))
            sockets.append(record["socket"])
            servers[-1].kill()
            wait_for(lambda: ended(servers[-1]), "the killed server's end")
            assert Path(sockets[-1]).parent.is_dir()  # SIGKILL: it could not clean up
            if len(sockets) == 2:
                (Path(sockets[-1]).parent / "kept.txt").write_text("not the server's")
        assert not Path(sockets[0]).parent.exists()
        assert sorted(p.name for p in Path(sockets[1]).parent.iterdir()) == ["kept.txt"]
    finally:
        for server in servers:
            if not ended(server):
                server.kill()
        for path in sockets:
            shutil.rmtree(Path(path).parent, ignore_errors=True)


def new_record(records: Path, known: list[str]) -> dict | None:
    """The record of a background server in `records` whose socket is not one of `known`."""
    found = [json.loads(path.read_text()) for path in records.glob("warm-*.json")]
    return next((record for record in found if record["socket"] not in known), None)


def test_a_kept_server_is_ready_when_returned_and_serves_the_next_run_of_its_folder(root: Path, tmp_path: Path) -> None:
    """As a fan-out chain starts it (warm.kept_server): the variable it returns points at a server that answers
    (a launcher forks from it), and the next call, as the next chain's, finds the same server; once a stage's
    source changed on disk, the next call stops that server and starts a new one."""
    records = tmp_path / "prefect-home" / "mnist-servers"
    env = env_for(tmp_path, PREFECT_HOME=str(records.parent), MNIST_SERVERS_IDLE_S="60")
    keep = "import os, sys; from pathlib import Path; from pipeline import warm\n"
    keep += "print(warm.kept_server(Path(sys.argv[1]), dict(os.environ)).get(warm.SOCKET_ENV, 'none'))"
    socket_path = ""
    try:
        for _ in range(2):
            kept = subprocess.run([sys.executable, "-c", keep, str(root)], env=env, capture_output=True, text=True, timeout=120)
            assert kept.returncode == 0 and kept.stdout.strip() != "none", kept.stderr
            assert socket_path in ("", kept.stdout.strip())
            socket_path = kept.stdout.strip()
            proc = launch(root, {**env, SOCKET_ENV: socket_path}, "0")
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0 and f" pid {proc.pid} " not in out and "cold" not in err, (out, err)  # a fork
        (root / "stages" / "probe.py").touch()  # as a checkout of other code: that server would refuse every stage
        kept = subprocess.run([sys.executable, "-c", keep, str(root)], env=env, capture_output=True, text=True, timeout=120)
        assert kept.returncode == 0 and kept.stdout.strip() not in ("none", socket_path), kept.stdout
        socket_path = kept.stdout.strip()
        proc = launch(root, {**env, SOCKET_ENV: socket_path}, "0")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f" pid {proc.pid} " not in out and "cold" not in err, (out, err)  # a new one
    finally:
        record = json.loads(next(records.glob("warm-*.json")).read_text()) if records.is_dir() else None
        if record:  # SIGTERM: it removes its socket and folder as it ends
            server = psutil.Process(record["pid"])
            server.terminate()
            server.wait(timeout=60)


def ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie: a detached server's parent is init, which may reap it late."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_server_ends_with_the_process_that_started_it(root: Path, tmp_path: Path) -> None:
    """As `mnist run` starts it (warm.server): killed outright, that command leaves no server behind."""
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline import warm\n"
            "import os\nwith warm.server(Path(sys.argv[1]), dict(os.environ)):\n    time.sleep(300)",
            str(root),
        ],
        env=env_for(tmp_path),
    )
    wait_for(lambda: any(c.cmdline()[3:4] == ["--serve"] for c in psutil.Process(starter.pid).children()), "the server")
    server = next(c for c in psutil.Process(starter.pid).children() if "--serve" in c.cmdline())
    folder = Path(server.cmdline()[-1]).parent  # the starter's temporary folder, which its SIGKILL leaves behind
    starter.kill()
    starter.wait(timeout=30)
    server.wait(timeout=60)
    assert not server.is_running()
    assert list(folder.iterdir()) == []  # the server removed its socket
    folder.rmdir()


def test_a_warm_train_stage_writes_the_same_bytes_as_a_cold_one(small_run: SmallRun, tmp_path: Path) -> None:
    """The same train stage as the small run's, cold and warm, gives the same model as that run."""
    project = small_run.project
    env = project_env(PYTHONPATH=str(project))

    def train(into: Path, extra: dict[str, str]) -> Path:
        cmd = [
            sys.executable,
            "-m",
            "pipeline.warm",
            "stages/train.py",
            "logreg",
            "--data",
            "data/prepared",
            "--out",
            str(into / "model"),
            "--live",
            str(into / "live"),
            "--resume",
            str(into / "resume"),
            "--tensorboard",
            str(into / "tb"),
        ]
        done = subprocess.run(cmd, cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert SOCKET_ENV not in extra or "cold" not in done.stderr, done.stderr[-3000:]
        return into / "model" / "model.keras"

    cold = train(tmp_path / "cold", {"PIPELINE_RUN_ID": "cold"})  # a run command's id: no background server
    with warm_server(project, env) as path:
        warm = train(tmp_path / "warm", {SOCKET_ENV: path})
    made = (project / "data" / "models" / "logreg" / "model.keras").read_bytes()
    assert cold.read_bytes() == made and warm.read_bytes() == made


# ask() as a script: argv[1] the socket, argv[2] the request; prints the reply.
ASK = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
    conn.settimeout(30)
    conn.connect(sys.argv[1])
    socket.send_fds(conn, [sys.argv[2].encode()], [0, 1, 2])
    sys.stdout.buffer.write(conn.recv(1 << 16))
"""


def ask(path: str, message: bytes, streams: list[int] | None = None) -> bytes:
    """Send one raw request to the warm server at `path` (with `streams` as its file descriptors); its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(30)
        conn.connect(path)
        socket.send_fds(conn, [message], streams or [])
        return conn.recv(1 << 16)


def test_a_bad_request_or_a_vanished_launcher_leaves_the_server_serving(root: Path, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        assert b"not JSON" in ask(path, b"not json")
        assert b"malformed" in ask(path, b'{"argv": 1}', [0, 1, 2])
        assert b"malformed" in ask(path, json.dumps({"argv": ["stages/probe.py"], "cwd": str(root), "env": {}}).encode())
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:  # connects, sends nothing, goes
            gone.connect(path)
        proc = launch(root, {**env, SOCKET_ENV: path}, "5")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert "cold" not in err and "refused" not in err, err
    assert f" pid {proc.pid} " not in out  # a fork of the server, not the launcher itself


def test_a_server_with_a_second_thread_does_not_fork_and_the_stage_starts_cold(root: Path, tmp_path: Path) -> None:
    (root / "stages" / "probe.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n" + PROBE
    )
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        proc = launch(root, {**env, SOCKET_ENV: path}, "4")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert "warm start refused: the server runs 2 threads" in err and "starting stages/probe.py cold" in err, err
    assert f" pid {proc.pid} " in out


# The system's Python, which `nobody` may run (this venv's may be in a private folder such as /root).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON, reason="needs root, to connect as another account, and /usr/bin/python3"
)
def test_a_launcher_of_another_account_is_refused(tmp_path: Path) -> None:
    """The socket's folder is private; here it is open to all, so the server's own check (SO_PEERCRED) must refuse."""
    import tempfile

    open_folder = Path(tempfile.mkdtemp(prefix="mnist-warm-open-"))  # under /tmp, which every account may enter
    open_folder.chmod(0o777)
    root = open_folder / "root"
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "probe.py").write_text(PROBE)
    env = env_for(tmp_path)
    with warm_server(root, env) as path:
        os.chmod(path, 0o777)
        request = {"argv": ["stages/probe.py", "0"], "cwd": str(root), "env": dict(os.environ)}
        asked = subprocess.run(  # as user `nobody`: a new process (a fork of this one, which has threads, may hang)
            [SYSTEM_PYTHON, "-c", ASK, path, json.dumps(request)],
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
        )
    shutil.rmtree(open_folder)
    status, reply = asked.returncode, asked.stdout
    assert status == 0 and b"the launcher runs as uid 65534" in reply, reply
