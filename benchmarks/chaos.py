"""Chaos: faults injected into runs of the quick configuration, each recovered the way docs/reliability.md
says, and compared with an uninterrupted run of the same commit.

    python -m benchmarks.chaos [--kills N] [--seed S] [--models logreg[,cnn]] [--cases a,b] [--out FILE]
    make chaos ARGS="--kills 3"

Each case works in its own copy of the project (its own DVC cache, so nothing is restored from
another case), on one Prefect server started here:

- sigkill, sigterm: `mnist run` or a bare `dvc repro` (alternately) started and its whole process
  group sent the signal at N random moments, then `mnist run` again until it completes;
- two-at-once: two `mnist run` started together in one workspace, then `mnist run` again;
- dashboards: `mnist dashboards` sent SIGTERM at N random moments of its start-up, half of the
  times a second SIGTERM during its shut-down (no comparison: it computes nothing);
- server-killed: a bare `dvc repro` reporting to `mnist dashboards`, whose Prefect server is
  SIGKILLed at a random moment (the dashboards start it again);
- disk-full: 64 KiB disks (tmpfs, needs root) on data/resume, data/export and data/serving; `mnist
  run` until it stops at each, each then given room;
- verify-during-run: a finished workspace, then a run that rewrites its outputs (every model one epoch
  more) with `mnist verify` at a random moment of it: verify reports no damage and moves nothing aside,
  the run completes, and its outputs pass `mnist verify`; then the params back and `mnist run` (DVC's
  run-cache restores the first run's outputs);
- no-server-two: two `mnist run` at once in two workspaces with no PREFECT_API_URL: one starts the
  local server, the other uses it, and it stops when the last ends (pipeline/servers.py);
- squatter: a program that answers like a Prefect server on 127.0.0.1:4200, then `mnist run` with no
  PREFECT_API_URL: it must refuse, naming what answered, send it no credential and write nothing;
  the squatter gone, `mnist run` again;
- bad-warm-request: during a run, malformed requests and a connection that goes at once sent to its
  warm stage server: the server must go on, and the later stages still start warm;
- damaged: in the clean run's workspace, one bit flipped in the prepared arrays' cache object (then
  checked out), in a model file and in a predictions cache object; `mnist verify`, then `mnist run`.

After each case: every model's model.keras, metrics.json and predictions.csv (their md5 in
dvc.lock) equal the clean run's, `dvc status` is clean, no `.tmp-*` file and no training
resume folder is left under data/, and no process of the case is still running.
The seed is printed; the same seed gives the same moments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

from benchmarks.common import REPO, describe, environ, free_port, machine
from pipeline.integrity import ASIDE_PREFIX

sys.path.insert(0, str(REPO / "tests"))  # the quick configuration and the project copy are the tests'

from conftest import copy_project, edit_params, small_params
from helpers import cache_object_of, flip_a_bit

BIN = Path(sys.executable).parent
COMPARED = ("data/models/{m}/model.keras", "data/evaluate/{m}/metrics.json", "data/evaluate/{m}/predictions.csv")
RUN_TIMEOUT_S = 1200


@dataclass
class Case:
    """One row of the table."""

    name: str
    faults: int = 0  # faults injected (a kill that came after the run had ended is not one)
    recovered: bool = False  # the recovery run completed
    mismatches: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def quick(models: list[str]):
    """The tests' quick configuration with these models only."""

    def edit(raw: dict) -> dict:
        raw = small_params(raw)
        raw["models"] = {m: raw["models"][m] for m in models}
        raw["gates"] = {m: raw["gates"][m] for m in models}
        return raw

    return edit


def workspace(root: Path, name: str, models: list[str]) -> Path:
    project = copy_project(root / name)
    edit_params(project, quick(models))
    subprocess.run(
        ["git", "-c", "user.name=chaos", "-c", "user.email=chaos@localhost", "commit", "-qam", "quick"], cwd=project, check=True
    )
    return project


def env_for(project: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(project), "PATH": f"{BIN}:{os.environ['PATH']}"}


def start(args: list[str], project: Path, log: Path) -> subprocess.Popen:
    """`args` in `project`, in a process group of its own (the one a terminal would give it)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, cwd=project, env=env_for(project), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_to_end(project: Path, log: Path, tries: int = 3) -> bool:
    """`mnist run` until it exits 0 (at most `tries` times)."""
    for _ in range(tries):
        if start([str(BIN / "mnist"), "run"], project, log).wait(timeout=RUN_TIMEOUT_S) == 0:
            return True
    return False


def group_gone(pgid: int, timeout_s: float = 60) -> bool:
    """Until no process of group `pgid` is left; False if some still are after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [p for p in psutil.process_iter() if _pgid(p) == pgid]:
            return True
        time.sleep(0.2)
    return False


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def processes_in(project: Path) -> list[psutil.Process]:
    """Processes running with their working directory inside `project`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if Path(proc.cwd()).is_relative_to(project):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def locked_md5(project: Path) -> dict[str, str]:
    """md5 of every output in dvc.lock; none for an empty or unreadable lock (reported as mismatches)."""
    try:
        lock = yaml.safe_load((project / "dvc.lock").read_text()) or {}
    except yaml.YAMLError:
        return {}
    return {out["path"]: out["md5"] for entry in (lock.get("stages") or {}).values() for out in entry.get("outs", [])}


def compare(case: Case, project: Path, reference: dict[str, str], models: list[str]) -> None:
    """Fill in the case's mismatches, leftovers and orphans."""
    got = locked_md5(project) if (project / "dvc.lock").exists() else {}
    for m in models:
        for pattern in COMPARED:
            path = pattern.format(m=m)
            if got.get(path) != reference[path]:
                case.mismatches.append(f"{path}: {got.get(path)} != {reference[path]}")
    status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env_for(project), capture_output=True, text=True)
    if status.stdout.strip().splitlines()[-1:] != ["{}"]:
        case.mismatches.append(f"dvc status: {status.stdout.strip()[-300:]}")
    data = project / "data"
    case.leftovers += [str(p.relative_to(project)) for p in data.rglob(".tmp-*")]
    resume = data / "resume"
    if resume.exists() and any(resume.iterdir()):
        case.leftovers += [str(p.relative_to(project)) for p in resume.iterdir()]
    for proc in processes_in(project):
        case.orphans.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        proc.kill()


def reference_run(root: Path, models: list[str]) -> tuple[dict[str, str], float, Path]:
    project = workspace(root, "clean", models)
    begin = time.monotonic()
    if not run_to_end(project, root / "clean.log", tries=1):
        raise SystemExit(f"the clean run failed: see {root / 'clean.log'}")
    return locked_md5(project), time.monotonic() - begin, project


def kill_case(
    root: Path, sig: signal.Signals, kills: int, rng: random.Random, clean_s: float, models: list[str], reference: dict[str, str]
) -> Case:
    """Start a run, send `sig` to its process group at a random moment, `kills` times; then run to the end."""
    case = Case(sig.name.lower())
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    for i in range(kills):
        command = [str(BIN / "mnist"), "run"] if i % 2 == 0 else ["dvc", "repro"]
        moment = rng.uniform(1.0, max(5.0, 0.9 * clean_s * (1 - i / kills)))
        proc = start(command, project, log)
        try:
            proc.wait(timeout=moment)
            case.notes.append(f"{Path(command[0]).name} {command[1]} ended before the kill at {moment:.1f} s")
            continue
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, sig)
        case.faults += 1
        proc.wait()
        if not group_gone(proc.pid):
            case.orphans.append(f"process group of kill {i + 1} still running 60 s after {sig.name}")
            os.killpg(proc.pid, signal.SIGKILL)
        case.notes.append(f"kill {i + 1}: {Path(command[0]).name} {command[1]} at {moment:.1f} s, exit {proc.returncode}")
    case.recovered = run_to_end(project, log)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def two_at_once(root: Path, models: list[str], reference: dict[str, str]) -> Case:
    """Two `mnist run` started together in one workspace; then one more to the end."""
    case = Case("two-at-once", faults=1)
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    procs = [start([str(BIN / "mnist"), "run"], project, log) for _ in range(2)]
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
    case.notes.append(f"exit codes {codes}")
    if "is busy, it is being blocked by" in log.read_text():
        case.notes.append("one stopped at once: 'is busy, it is being blocked by (PID ...)'")
    case.recovered = run_to_end(project, log)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def without_server(project: Path, home: Path) -> dict[str, str]:
    """The environment of a command in `project` that finds no Prefect server configured."""
    env = {**env_for(project), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_AUTH_STRING", None)
    return env


def no_server_two(root: Path, models: list[str], reference: dict[str, str]) -> Case:
    """Two `mnist run` at once in two workspaces, no PREFECT_API_URL: both finish, on one server, which goes after."""
    from pipeline import localserver
    from pipeline.servers import PREFECT_PORT, answers

    case = Case("no-server-two", faults=1)
    home = root / f"{case.name}-home"
    projects = [workspace(root, f"{case.name}-{i}", models) for i in (1, 2)]
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    with open(log, "ab") as out:
        procs = [
            subprocess.Popen(
                [str(BIN / "mnist"), "run"],
                cwd=p,
                env=without_server(p, home),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for p in projects
        ]
        codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
    case.notes.append(f"exit codes {codes}; servers started: {log.read_text().count('Prefect: started a server')}")
    case.recovered = codes == [0, 0] and log.read_text().count("Prefect: started a server") == 1
    with environ(PREFECT_HOME=str(home)):
        if localserver.read(PREFECT_PORT) or answers(f"http://127.0.0.1:{PREFECT_PORT}/api/health"):
            case.orphans.append(f"a Prefect server still answers on 127.0.0.1:{PREFECT_PORT}")
    for project in projects:
        compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def squatter(root: Path, models: list[str], reference: dict[str, str]) -> Case:
    """A stranger answering on 127.0.0.1:4200: `mnist run` refuses, sends it nothing secret, writes nothing."""
    import http.server
    import threading

    from pipeline.servers import PREFECT_PORT

    seen: list[str] = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization") or "")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        do_POST = do_GET  # noqa: N815 - http.server's naming

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
            pass

    case = Case("squatter", faults=1)
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", PREFECT_PORT), Answer)
    except OSError as exc:
        case.notes.append(f"port {PREFECT_PORT} is taken ({exc}): case not run")
        return case
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    lock_before = (project / "dvc.lock").read_bytes()
    try:
        with open(log, "ab") as out:
            code = subprocess.run(
                [str(BIN / "mnist"), "run"],
                cwd=project,
                env=without_server(project, root / "squatter-home"),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT_S,
            ).returncode
    finally:
        server.shutdown()
        server.server_close()
    text = log.read_text()
    case.notes.append(f"exit code {code}; the squatter got {len(seen)} requests, {sum(bool(a) for a in seen)} with credentials")
    if code == 0 or "not a Prefect server this project started" not in text:
        case.mismatches.append("mnist run did not refuse the stranger on the port")
    if any(seen):
        case.mismatches.append("credentials were sent to the stranger")
    if (project / "dvc.lock").read_bytes() != lock_before or (project / "data" / "raw").exists():
        case.mismatches.append("the refused run wrote outputs or dvc.lock")
    case.recovered = run_to_end(project, log)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def bad_warm_request(root: Path, models: list[str], reference: dict[str, str]) -> Case:
    """Malformed requests to a run's warm server while it runs: it serves on, and later stages start warm."""
    import socket

    from pipeline.warm import SOCKET_ENV

    case = Case("bad-warm-request")
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    run = start([str(BIN / "mnist"), "run"], project, log)
    path, deadline = None, time.monotonic() + 300
    while path is None and run.poll() is None and time.monotonic() < deadline:
        for proc in processes_in(project):
            try:
                path = proc.environ().get(SOCKET_ENV) or path
            except psutil.Error:
                pass
        time.sleep(0.2)
    while path and not os.path.exists(path) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the server gets ready in a few seconds
    if path and run.poll() is None:
        for message, streams in ((b"not json", []), (b'{"argv": 1}', [0, 1, 2]), (None, [])):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                    conn.settimeout(30)
                    conn.connect(path)
                    if message is not None:  # None: connect and go at once
                        socket.send_fds(conn, [message], streams)
                        conn.recv(1 << 16)
                case.faults += 1
            except OSError as exc:
                case.notes.append(f"request not delivered: {exc}")
        injected = log.stat().st_size
    else:
        injected = None
        case.notes.append("the run ended before its warm server was ready: nothing injected")
    case.recovered = run.wait(timeout=RUN_TIMEOUT_S) == 0 or run_to_end(project, log)
    if injected is not None:
        after = log.read_bytes()[injected:].decode(errors="replace")
        if "warm start not possible" in after or "warm start refused" in after:
            case.mismatches.append("a stage started cold after the bad requests")
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def dashboards_case(root: Path, kills: int, rng: random.Random) -> Case:
    """`mnist dashboards` sent SIGTERM at random moments of start-up (and, half of the times, again in shut-down)."""
    case = Case("dashboards")
    folder = root / "dashboards"
    (folder / "data" / "tensorboard").mkdir(parents=True)
    begin = time.monotonic()
    for i in range(kills):
        ports = [free_port(), free_port()]
        args = [str(BIN / "mnist"), "dashboards", "--prefect-port", str(ports[0]), "--tensorboard-port", str(ports[1])]
        env = {**env_for(folder), "PREFECT_HOME": str(folder / "prefect-home")}
        env.pop("PREFECT_API_URL", None)
        with open(root / "dashboards.log", "ab") as out:
            proc = subprocess.Popen(args, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        moment, seen = rng.uniform(0.0, 25.0), {}
        deadline = time.monotonic() + moment
        while time.monotonic() < deadline and proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen[p.pid] = p
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        case.faults += 1
        twice = rng.random() < 0.5
        if twice:
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                case.faults += 1
        code = proc.wait(timeout=120)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        case.orphans += [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in alive]
        for p in alive:
            p.kill()
        if code not in (0, -signal.SIGTERM):
            case.mismatches.append(f"start-up {i + 1}: exit {code}")
        case.notes.append(
            f"SIGTERM at {moment:.1f} s{' and again' if twice else ''}: exit {code}, {len(seen)} server process(es) seen"
        )
    case.recovered = True
    case.seconds = time.monotonic() - begin
    return case


def server_killed(root: Path, models: list[str], reference: dict[str, str], rng: random.Random, clean_s: float) -> Case:
    """A bare `dvc repro` reporting to `mnist dashboards`; its Prefect server SIGKILLed at a random moment."""
    from pipeline.servers import answers

    case = Case("server-killed")
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    port = free_port()
    env = {**env_for(project), "PREFECT_HOME": str(root / f"{case.name}-home")}
    env.pop("PREFECT_API_URL", None)
    auth = "mnist:chaos-server-killed"  # the dashboards' server asks every client for it
    env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    with open(log, "ab") as out:
        dashboards = subprocess.Popen(
            [str(BIN / "mnist"), "dashboards", "--prefect-port", str(port), "--tensorboard-port", str(free_port())],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while not answers(f"{api}/health"):
            if dashboards.poll() is not None or time.monotonic() > deadline:
                case.notes.append(f"the dashboards did not start (exit {dashboards.poll()})")
                return case
            time.sleep(0.5)
        with open(log, "ab") as out:
            repro = subprocess.Popen(
                ["dvc", "repro"],
                cwd=project,
                env={**env_for(project), "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        moment = rng.uniform(5.0, max(10.0, 0.8 * clean_s))
        try:
            repro.wait(timeout=moment)
            case.notes.append(f"dvc repro ended before the kill at {moment:.1f} s")
        except subprocess.TimeoutExpired:
            for proc in psutil.Process(dashboards.pid).children(recursive=True):
                if "server" in proc.cmdline() and "prefect" in " ".join(proc.cmdline()):
                    for p in [proc, *proc.children(recursive=True)]:
                        p.kill()
                    case.faults = 1
        code = repro.wait(timeout=RUN_TIMEOUT_S)
        restarted = "starting it again" in log.read_text(errors="replace")
        case.notes.append(
            f"server SIGKILLed at {moment:.1f} s; dvc repro exit {code}; "
            f"{'started again by the dashboards' if restarted else 'NOT started again'}"
        )
        case.recovered = (code == 0 or run_to_end(project, log)) and (restarted or not case.faults)
    finally:
        dashboards.terminate()
        dashboards.wait(timeout=120)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def disk_full(root: Path, models: list[str], reference: dict[str, str]) -> Case:
    """64 KiB disks on data/resume, data/export and data/serving: `mnist run` stops at each with a
    clear message and keeps nothing partial; once each is given room, the run goes on to the end."""
    case = Case("disk-full")
    if os.geteuid() != 0:
        case.notes.append("skipped: mounting a tmpfs needs root")
        return case
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    disks = [project / "data" / name for name in ("resume", "export", "serving")]
    try:
        for folder in disks:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=True)
        for folder in disks:
            seen = log.stat().st_size if log.exists() else 0
            code = start([str(BIN / "mnist"), "run"], project, log).wait(timeout=RUN_TIMEOUT_S)
            with open(log, "rb") as f:
                f.seek(seen)
                said = f.read().decode(errors="replace")
            if code != 0 and f"the disk is full: writing data/{folder.name}/" in said:
                case.faults += 1
                case.notes.append(
                    f"stopped at the full data/{folder.name} disk: " + said.split("the disk is full: ")[-1].split(" needs")[0]
                )
            else:
                case.mismatches.append(f"the run did not stop at the full data/{folder.name} disk with its message (exit {code})")
            case.leftovers += [str(p.relative_to(project)) for p in (project / "data").rglob(".tmp-*")]
            subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)  # space freed
        case.recovered = run_to_end(project, log)
        compare(case, project, reference, models)
    finally:
        for folder in disks:
            subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)
    case.seconds = time.monotonic() - begin
    return case


def damaged(project: Path, models: list[str], reference: dict[str, str]) -> Case:
    """In a finished workspace: a bit flipped in the prepared arrays' cache object (then checked out),
    in a model file, and in a predictions cache object; `mnist verify`, then `mnist run`."""
    case = Case("damaged")
    log = project.parent / f"{case.name}.log"
    begin = time.monotonic()
    prepared = project / "data" / "prepared" / "mnist.npz"
    flip_a_bit(cache_object_of(project, "data/prepared/mnist.npz"), prepared.stat().st_size // 2)
    prepared.unlink()
    subprocess.run(["dvc", "checkout"], cwd=project, env=env_for(project), capture_output=True, check=True)
    model = project / "data" / "models" / models[-1] / "model.keras"
    flip_a_bit(model, model.stat().st_size // 2)
    flip_a_bit(cache_object_of(project, f"data/evaluate/{models[0]}/predictions.csv"), 20)
    case.faults = 3
    with open(log, "ab") as out:
        verify = subprocess.run(
            [str(BIN / "mnist"), "verify"], cwd=project, env=env_for(project), stdout=subprocess.PIPE, stderr=out, text=True
        )
    case.notes += [f"mnist verify: {line}" for line in verify.stdout.splitlines() if "(the damaged copy: " in line]
    # what verify moved aside, each damaged copy under its own path in .dvc/tmp/verify-<UTC time>/
    found = [p for p in (project / ".dvc" / "tmp").glob(f"{ASIDE_PREFIX}*/**/*") if p.is_file()]
    if len(found) != 4:  # the arrays: workspace file and cache object; the model file; the predictions object
        case.mismatches.append(f"mnist verify moved {len(found)} damaged copies aside, not 4")
    case.recovered = run_to_end(project, log)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def verify_during_run(root: Path, models: list[str], reference: dict[str, str], rng: random.Random, clean_s: float) -> Case:
    """`mnist verify` at a random moment of a run that rewrites a finished workspace's outputs: it must report
    no damage and move nothing aside; the run must complete and its outputs pass `mnist verify`."""
    case = Case("verify-during-run")
    project = workspace(root, case.name, models)
    log = root / f"{case.name}.log"
    begin = time.monotonic()
    if not run_to_end(project, log, tries=1):
        case.notes.append("the first run failed")
        return case
    params = (project / "params.yaml").read_text()
    edit_params(project, lambda raw: {**raw, "models": {m: {**b, "epochs": b["epochs"] + 1} for m, b in raw["models"].items()}})
    moment = rng.uniform(1.0, max(5.0, 0.9 * clean_s))
    run = start([str(BIN / "mnist"), "run"], project, log)
    try:
        run.wait(timeout=moment)
        case.notes.append(f"the run ended before mnist verify at {moment:.1f} s")
    except subprocess.TimeoutExpired:
        case.faults = 1
        _verify(case, project, f"at {moment:.1f} s of the run")
    code = run.wait(timeout=RUN_TIMEOUT_S)
    if code != 0:
        case.mismatches.append(f"the run beside mnist verify failed (exit {code}): see {log}")
    else:
        _verify(case, project, "after the run", quiet=True)
    (project / "params.yaml").write_text(params)
    case.recovered = run_to_end(project, log)
    compare(case, project, reference, models)
    case.seconds = time.monotonic() - begin
    return case


def _verify(case: Case, project: Path, when: str, quiet: bool = False) -> None:
    """`mnist verify` in `project`: a mismatch for any damage it reports, anything it moves aside, and (`quiet`)
    any output it finds modified."""
    verify = subprocess.run(
        [str(BIN / "mnist"), "verify"], cwd=project, env=env_for(project), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    lines = verify.stdout.splitlines()
    case.notes.append(f"mnist verify {when}: exit {verify.returncode}, {len(lines)} line(s)")
    case.notes += [f"  {line}" for line in lines if ": " in line and not line.startswith(("no damage", "a modified"))]
    shown = [line for line in lines if "(the damaged copy: " in line or (quiet and "modified since dvc.lock" in line)]
    if verify.returncode != 0 or shown or list((project / ".dvc" / "tmp").glob(f"{ASIDE_PREFIX}*")):
        case.mismatches.append(f"mnist verify {when}: exit {verify.returncode}; {'; '.join(shown) or verify.stderr[-300:]}")


CASES = (
    "sigkill",
    "sigterm",
    "two-at-once",
    "dashboards",
    "server-killed",
    "disk-full",
    "verify-during-run",
    "no-server-two",
    "squatter",
    "bad-warm-request",
    "damaged",
)


def table(cases: list[Case]) -> str:
    head = f"{'case':<17} {'faults':>6} {'recovered':>9} {'mismatches':>10} {'leftovers':>9} {'orphans':>7} {'seconds':>8}"
    rows = [
        f"{c.name:<17} {c.faults:>6} {'yes' if c.recovered else 'NO':>9} {len(c.mismatches):>10} "
        f"{len(c.leftovers):>9} {len(c.orphans):>7} {c.seconds:>8.0f}"
        for c in cases
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kills per signal, and dashboards start-ups (default 3)")
    parser.add_argument("--seed", type=int, help="random seed of the moments (default: a new one, printed)")
    # One model keeps the cases short on a 2-core machine (the first seven took under 15 minutes); each kill still lands in any stage.
    parser.add_argument("--models", default="logreg", help="models of the quick configuration (default logreg)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"which cases (default all: {','.join(CASES)})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "chaos.json")
    args = parser.parse_args(argv)
    chosen = args.cases.split(",")
    if set(chosen) - set(CASES):
        parser.error(f"unknown cases {sorted(set(chosen) - set(CASES))}; the cases are {', '.join(CASES)}")
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng, models = random.Random(seed), args.models.split(",")
    info = machine()
    print(f"chaos: seed {seed}, {args.kills} kills per signal, models {', '.join(models)}; {describe(info)}", flush=True)
    from pipeline.servers import prefect_server

    with tempfile.TemporaryDirectory(prefix="mnist-chaos-") as tmp:
        root = Path(tmp)
        home = root / "prefect-home"
        with (
            environ(PREFECT_HOME=str(home)),
            prefect_server("127.0.0.1", free_port(), log=root / "prefect.log") as api,
            environ(PREFECT_API_URL=api),
        ):
            begin = time.monotonic()
            reference, clean_s, clean = reference_run(root, models)
            print(f"clean run: {clean_s:.0f} s", flush=True)
            run = {
                "sigkill": lambda: kill_case(root, signal.SIGKILL, args.kills, rng, clean_s, models, reference),
                "sigterm": lambda: kill_case(root, signal.SIGTERM, args.kills, rng, clean_s, models, reference),
                "two-at-once": lambda: two_at_once(root, models, reference),
                "dashboards": lambda: dashboards_case(root, args.kills, rng),
                "server-killed": lambda: server_killed(root, models, reference, rng, clean_s),
                "disk-full": lambda: disk_full(root, models, reference),
                "verify-during-run": lambda: verify_during_run(root, models, reference, rng, clean_s),
                "no-server-two": lambda: no_server_two(root, models, reference),
                "squatter": lambda: squatter(root, models, reference),
                "bad-warm-request": lambda: bad_warm_request(root, models, reference),
                "damaged": lambda: damaged(clean, models, reference),  # last: it changes the clean workspace
            }
            cases = []
            for name in CASES:
                if name in chosen:
                    cases.append(run[name]())
                    print(table(cases[-1:]).splitlines()[-1], flush=True)
            total = time.monotonic() - begin
        for case in cases:
            for what in ("notes", "mismatches", "leftovers", "orphans"):
                for line in getattr(case, what):
                    print(f"  {case.name}: {what[:-1] if what != 'notes' else 'note'}: {line}")
        print(table(cases))
        print(f"total {total:.0f} s (clean run {clean_s:.0f} s)")
        args.out.write_text(
            json.dumps(
                {
                    "seed": seed,
                    "models": models,
                    "kills": args.kills,
                    "machine": info,
                    "clean_s": clean_s,
                    "total_s": total,
                    "cases": [asdict(c) for c in cases],
                },
                indent=1,
            )
            + "\n"
        )
    failed = [c for c in cases if not c.recovered or c.mismatches or c.leftovers or c.orphans]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
