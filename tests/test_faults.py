"""Faults around a run in one workspace: a second run started beside the first, a run killed outright,
a full disk, and damaged files.

DVC's per-output locks (.dvc/tmp/rwlock) are what keep two runs apart; these tests pin what a
user sees. The fetch stage waits on a mirror that never answers, so the first run is
mid-stage for as long as the test needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import BIN, SmallRun, copy_project, dvc, edit_params, project_env, small_params
from helpers import cache_object_of, flip_a_bit, resize_disk, silent_server, small_disk
from pipeline import artifacts


def start_repro(project: Path, env: dict[str, str]) -> subprocess.Popen:
    """`dvc repro fetch` in its own process group, output piped."""
    return subprocess.Popen(
        ["dvc", "repro", "fetch"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
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


def only_logreg(raw: dict) -> dict:
    """The small run's params, with the logreg model alone."""
    raw = small_params(raw)
    raw["models"], raw["gates"] = {"logreg": raw["models"]["logreg"]}, {"logreg": raw["gates"]["logreg"]}
    return raw


def digest(path: Path) -> str:
    return artifacts.tree_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


SAME_AS_CLEAN = (
    "data/models/logreg/model.keras",
    "data/evaluate/logreg/metrics.json",
    "data/evaluate/logreg/predictions.csv",
    "data/export/logreg/saved_model",
    "data/serving/logreg/1",
)


def test_a_full_disk_in_training_export_and_publishing_stops_with_the_path_and_keeps_nothing_partial(
    tmp_path: Path, small_run: SmallRun
) -> None:
    """Three 64 KiB disks under data/resume, data/export and data/serving: each run stops at the next one
    with a clear message; once each is given room, the run goes on, and ends as the clean small run."""
    project = copy_project(tmp_path / "project")
    edit_params(project, only_logreg)
    disks = {name: project / "data" / name for name in ("resume", "export", "serving")}
    expected = {
        "resume": "data/resume/logreg/epoch-0001",  # the first checkpoint
        "export": "data/export/logreg/saved_model",
        "serving": "data/serving/logreg/1",
    }
    with contextlib.ExitStack() as mounts:
        for folder in disks.values():
            mounts.enter_context(small_disk(folder, 64))
        for name, folder in disks.items():  # each run stops at the next full disk
            run = dvc(project, "repro", check=False)
            assert run.returncode != 0, f"the run went past the full {name} disk"
            message = f"the disk is full: writing {expected[name]} needs at least"
            assert message in run.stderr, run.stderr[-3000:]
            assert f"mounted at {folder}" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
            leftovers = [p for p in (project / "data").rglob("*") if p.name.startswith(".tmp-")]
            assert leftovers == [], leftovers
            assert not (project / expected[name]).exists()  # no partial artifact under its final name
            resize_disk(folder, 16 * 1024)  # space freed
        dvc(project, "repro")
        status = dvc(project, "status")
        assert "up to date" in status.stdout, status.stdout
        for name in SAME_AS_CLEAN:
            assert digest(project / name) == digest(small_run.project / name), name
        assert not (project / "data" / "resume" / "logreg").exists()  # training completed: nothing left to resume


def test_damaged_cache_objects_and_outputs_are_never_trained_on_and_mnist_verify_repairs_them(
    tmp_path: Path, small_run: SmallRun
) -> None:
    project = tmp_path / "project"
    shutil.copytree(small_run.project, project, symlinks=True)
    env = project_env()
    # 1. The prepared arrays' cache object rots; `dvc checkout` copies it into the workspace, and DVC sees nothing.
    prepared = project / "data" / "prepared" / "mnist.npz"
    flip_a_bit(cache_object_of(project, "data/prepared/mnist.npz"), prepared.stat().st_size // 2)
    prepared.unlink()
    dvc(project, "checkout", env=env)
    assert "up to date" in dvc(project, "status", env=env).stdout  # DVC trusts its cache: why `mnist verify` exists
    # The train stage refuses the damaged file (the .npz's CRC-32), naming it and the fix; nothing is trained.
    train = dvc(project, "repro", "--force", "--single-item", "train@logreg", env=env, check=False)
    assert train.returncode != 0
    assert "data/prepared/mnist.npz is not a valid prepared file" in train.stderr and "Bad CRC-32" in train.stderr, train.stderr[
        -2000:
    ]
    assert "epoch 1/1" not in train.stderr and "Traceback" not in train.stderr
    # 2. A model file rots in the workspace (its cache object is good); 3. a predictions object rots in the cache.
    model = project / "data" / "models" / "cnn" / "model.keras"
    flip_a_bit(model, model.stat().st_size // 2)
    predictions_object = cache_object_of(project, "data/evaluate/mlp/predictions.csv")
    flip_a_bit(predictions_object, 20)
    status = dvc(project, "status", env=env).stdout  # train@logreg's outputs are gone (the failed run), but:
    assert "data/models/cnn" not in status and "data/evaluate/mlp" not in status, status  # DVC sees no damage

    verify = subprocess.run([str(BIN / "mnist"), "verify"], cwd=project, env=env, capture_output=True, text=True)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    lines = verify.stdout.splitlines()
    (aside,) = (project / ".dvc" / "tmp").glob("verify-*")  # nothing deleted: every damaged copy moved here
    rel = aside.relative_to(project)
    assert (
        f"data/prepared/mnist.npz: workspace file damaged, and no good copy in the cache: moved aside (the damaged copy: {rel}/data/prepared/mnist.npz)"
        in lines
    ), lines
    assert any("cache object of data/prepared/mnist.npz damaged: moved aside" in line for line in lines), lines
    assert (
        f"data/models/cnn/model.keras: workspace file damaged: restored from the cache (the damaged copy: {rel}/data/models/cnn/model.keras)"
        in lines
    ), lines
    obj = predictions_object.relative_to(project)
    assert (
        f"{obj}: cache object of data/evaluate/mlp/predictions.csv damaged: rewritten from the workspace file (the damaged copy: {rel}/{obj})"
        in lines
    ), lines
    assert "run `dvc repro`" in verify.stdout
    assert len([p for p in aside.rglob("*") if p.is_file()]) == 4

    again = dvc(project, "repro", env=env)  # makes the deleted arrays again: the same bytes, so no model retrains
    assert "Running stage 'preprocess'" in again.stdout and "Running stage 'train@cnn'" not in again.stdout, again.stdout
    assert "up to date" in dvc(project, "status", env=env).stdout
    done = subprocess.run([str(BIN / "mnist"), "verify"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in (
        "data/prepared/mnist.npz",
        "data/models/cnn/model.keras",
        "data/models/logreg/model.keras",
        "data/evaluate/mlp/predictions.csv",
    ):
        assert digest(project / name) == digest(small_run.project / name), name
    assert hashlib.md5(predictions_object.read_bytes()).hexdigest() == predictions_object.parent.name + predictions_object.name


def test_a_dvc_lock_left_empty_by_a_killed_run_is_set_aside_and_the_next_run_restores_from_the_run_cache(
    tmp_path: Path, small_run: SmallRun
) -> None:
    """DVC rewrites dvc.lock in place after each stage: a run killed in that moment leaves it empty (seen in a
    chaos run), and every dvc command then stops on it. `mnist run` moves it aside; nothing trains again."""
    project = tmp_path / "project"
    shutil.copytree(small_run.project, project, symlinks=True)
    env = project_env(PYTHONPATH=str(project))
    (project / "dvc.lock").write_text("")
    stuck = dvc(project, "status", env=env, check=False)
    assert stuck.returncode != 0 and "dvc.lock' validation failed" in stuck.stderr, stuck.stderr[-2000:]

    run = subprocess.run([str(BIN / "mnist"), "run"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dvc.lock could not be read: it is empty. Moved to dvc.lock.broken" in run.stderr, run.stderr[-3000:]
    assert (project / "dvc.lock.broken").read_text() == ""
    for model in small_run.models():
        assert f"] train@{model}: restored from the run-cache" in run.stdout, run.stdout[-3000:]  # mnist run's progress line
        assert f"Running stage 'train@{model}'" not in run.stdout
        assert digest(project / "data" / "models" / model / "model.keras") == digest(
            small_run.project / "data" / "models" / model / "model.keras"
        )
    assert "up to date" in dvc(project, "status", env=env).stdout
    again = subprocess.run([str(BIN / "mnist"), "run"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "dvc.lock could not be read" not in again.stderr, again.stderr[-3000:]  # a good lock stays


def dvc_repo(folder: Path) -> Path:
    """An empty git and DVC repository."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    dvc(folder, "init", "-q")
    return folder


HOLD_REPO_LOCK = (
    "import sys, time, zc.lockfile\nlock = zc.lockfile.LockFile(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)"
)


@contextlib.contextmanager
def dvc_lock_held(root: Path, mode: str):
    """DVC's lock of `root` held by another live process: its repo lock (.dvc/tmp/lock, as dvc/lock.py takes it,
    in that process), or an entry for it in .dvc/tmp/rwlock (as dvc/rwlock.py writes it while a stage's command
    runs, the repo lock given up meanwhile), reading or writing an output."""
    tmp = root / ".dvc" / "tmp"
    if mode == "repo lock":
        holder = subprocess.Popen([sys.executable, "-c", HOLD_REPO_LOCK, str(tmp / "lock")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
    else:
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        info = {"pid": holder.pid, "cmd": "dvc repro"}
        out = str(root / "data" / "raw")
        table = {"write": {out: info}} if mode == "rwlock write" else {"read": {out: [info]}}
        (tmp / "rwlock").write_text(json.dumps(table))
    try:
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("mode", ["repo lock", "rwlock write", "rwlock read"])
def test_a_lock_file_is_left_alone_while_another_dvc_command_holds_the_workspace(tmp_path: Path, mode: str) -> None:
    """It may be writing dvc.lock at that very moment: then an empty file is no sign of a killed run. `dvc repro`
    gives the repo lock up while a stage's command runs, keeping the stage's outputs and deps in .dvc/tmp/rwlock."""
    from pipeline.integrity import set_aside_unreadable_lock

    root = dvc_repo(tmp_path / "repo")
    (root / "dvc.lock").write_text("")
    with dvc_lock_held(root, mode):
        assert set_aside_unreadable_lock(root) is None and (root / "dvc.lock").exists()
    assert "Moved to dvc.lock.broken" in set_aside_unreadable_lock(root)  # once nothing holds it (the dead PID is no holder)
    assert not (root / "dvc.lock").exists() and (root / "dvc.lock.broken").read_text() == ""


LOCK_CONTENTS = {  # what an unreadable dvc.lock holds, and what the message says of it
    "empty": (b"", "dvc.lock could not be read: it is empty."),
    "cut off": (
        b"schema: '2.0'\nstages:\n  fetch:\n    cmd: python -m pipeline.warm stages/fetch.py\n    outs:\n    - path: 'data/r",
        "dvc.lock could not be read: it is not valid YAML: cut off, or damaged.",
    ),
    "not UTF-8": (b"schema: '2.0'\nstages: \xff\xfe\n", "dvc.lock could not be read: it is not UTF-8 text."),
    "not DVC's": (
        b"schema: '2.0'\nstages:\n  fetch:\n    cmd: 3\n    outs: nothing\n",
        "dvc.lock could not be read: it is YAML, but not in DVC's lock format",
    ),
}


@pytest.mark.parametrize("content", list(LOCK_CONTENTS))
def test_every_unreadable_lock_set_aside_is_kept_and_the_message_says_what_was_found(tmp_path: Path, content: str) -> None:
    from pipeline.integrity import set_aside_unreadable_lock

    root = dvc_repo(tmp_path / "repo")
    data, said = LOCK_CONTENTS[content]
    for n, name in enumerate(["dvc.lock.broken", "dvc.lock.broken.1", "dvc.lock.broken.2"]):
        (root / "dvc.lock").write_bytes(data + f"\n# copy {n}".encode() * bool(data))
        message = set_aside_unreadable_lock(root)
        assert message.startswith(said) and f"Moved to {name} (earlier copies are kept)" in message, message
        assert not (root / "dvc.lock").exists()
    for n, name in enumerate(["dvc.lock.broken", "dvc.lock.broken.1", "dvc.lock.broken.2"]):
        assert (root / name).read_bytes() == data + f"\n# copy {n}".encode() * bool(data), name  # none overwritten


def test_a_lock_with_merge_conflict_markers_is_no_damage_it_stays_and_the_error_says_how_to_resolve_the_merge(
    tmp_path: Path,
) -> None:
    """A merge of two branches' dvc.lock leaves git's markers in it: `mnist run` stops, naming the fix, and
    neither moves it aside nor runs anything."""
    project = copy_project(tmp_path / "project")
    lock = (project / "dvc.lock").read_text()
    half = lock.index("\n  preprocess:")
    conflicted = (
        f"{lock[:half]}\n<<<<<<< HEAD\n{lock[half:]}=======\n{lock[half:].replace('md5: ', 'md5: 0')}>>>>>>> experiment\n"
    )
    (project / "dvc.lock").write_text(conflicted)
    run = subprocess.run(
        [str(BIN / "mnist"), "run"],
        cwd=project,
        env=project_env(PYTHONPATH=str(project)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert (
        "error: dvc.lock holds git's merge conflict markers (<<<<<<<, =======, >>>>>>>): its merge is unfinished" in run.stderr
    ), run.stderr[-2000:]
    assert (
        "git checkout --theirs dvc.lock" in run.stderr
        and "git checkout --ours dvc.lock" in run.stderr
        and "dvc commit" in run.stderr
    )
    assert "Traceback" not in run.stderr and "Running stage" not in run.stdout
    assert (project / "dvc.lock").read_text() == conflicted and not list(project.glob("dvc.lock.broken*"))


def test_a_prefect_server_killed_mid_run_is_started_again_the_run_completes_and_orphans_are_marked(
    tmp_path: Path, small_run: SmallRun
) -> None:
    """`mnist dashboards` serves a bare `dvc repro`; its Prefect server is SIGKILLed while a model trains.
    The dashboards start it again; the run completes, or, where a Prefect call that is not retried failed
    during the outage, a second `dvc repro` does; the results are the clean run's, and a run left
    Running by a process that is gone is marked Crashed."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from pipeline.servers import AUTH_ENV
    from pipeline.stage import this_process
    from test_prefect import flow_runs, start_dashboards

    auth = "mnist:server-killed-test"  # the dashboards' server asks every client for it
    dashboards, port, _ = start_dashboards(tmp_path, **{AUTH_ENV: auth})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(dashboards.stdout), daemon=True)
    reader.start()
    api = f"http://127.0.0.1:{port}/api"
    project = copy_project(tmp_path / "work")
    edit_params(project, only_logreg)
    run_id = f"server-killed-{time.time_ns()}"
    log = tmp_path / "repro.log"
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops both" in line for line in lines):
            assert dashboards.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        gone = subprocess.Popen(["true"])
        gone.wait()
        with (
            temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}),
            get_client(sync_client=True) as client,
        ):
            orphan = client.create_flow_run(flow(name="fetch")(lambda: None), name="fetch", tags=["stage:fetch"], state=Running())
            client.update_flow_run(orphan.id, infrastructure_pid=f"{this_process().split(':')[0]}:{gone.pid}")
        env = project_env(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=auth, PIPELINE_RUN_ID=run_id, PYTHONPATH=str(project))
        with open(log, "w") as out:
            repro = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Killed once the train stage's flow run is Running, so that a stage is in the middle of its work;
            # the stages after it start while the server restarts or after, and wait for it at their start-up check.
            deadline = time.monotonic() + 600
            while True:
                with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
                    runs = flow_runs(f"pipeline-run:{run_id}")
                if any(name == "train" and run.state.type == StateType.RUNNING for run, name in runs):
                    break
                assert repro.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            servers = [p for p in descendants(dashboards.pid) if "server" in p.cmdline() and "prefect" in " ".join(p.cmdline())]
            assert servers, [p.cmdline() for p in descendants(dashboards.pid)]
            for p in servers:
                for q in [p, *p.children(recursive=True)]:
                    q.kill()
            code = repro.wait(timeout=900)
        finally:
            if repro.poll() is None:
                repro.kill()
        # The running stage rides out the restart on Prefect's retries (its task runs, untagged, ask for no
        # concurrency slots), and a stage that starts meanwhile waits for the server (check_prefect_api).
        assert code == 0, log.read_text()[-4000:]
        output = "".join(lines)
        assert "stopped (exit status -9); starting it again" in output and "answers again" in output, output
        deadline = time.monotonic() + 60
        while "marked fetch as crashed" not in "".join(lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
            runs = flow_runs(f"pipeline-run:{run_id}")
            with get_client(sync_client=True) as client:
                marked = client.read_flow_run(orphan.id)
        assert {name for _, name in runs} >= {"fetch", "preprocess", "train", "evaluate", "export", "publish"}
        assert marked.state.type == StateType.CRASHED and f"PID {gone.pid}" in marked.state.message
    finally:
        dashboards.terminate()
        dashboards.wait(timeout=90)
        reader.join(timeout=10)
    assert dashboards.returncode == 0, "".join(lines)
    assert "up to date" in dvc(project, "status").stdout
    for name in SAME_AS_CLEAN:
        assert digest(project / name) == digest(small_run.project / name), name


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
