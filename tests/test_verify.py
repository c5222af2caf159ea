"""`mnist verify` tells damage from a newer output: it repairs what decayed, leaves what a run (or a person)
wrote after dvc.lock alone, works under DVC's repo lock, and deletes nothing.

Each test works in a copy of one finished logreg-only run, after a `dvc status` there: DVC has then
hashed every output of the copy (its state database), as it has in a workspace where it ran.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, copy_project, dvc, edit_params, project_env
from helpers import cache_object_of, flip_a_bit, silent_server
from pipeline.errors import PipelineError
from test_faults import HOLD_REPO_LOCK, only_logreg, wait_for_stage


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A logreg-only small run, complete."""
    project = copy_project(tmp_path_factory.mktemp("verify") / "finished")
    edit_params(project, only_logreg)
    dvc(project, "repro")
    return project


def workspace(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run that DVC has looked at (`dvc status`: clean)."""
    project = tmp_path / "project"
    shutil.copytree(finished, project, symlinks=True)
    assert "up to date" in dvc(project, "status").stdout
    return project


def verify(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mnist"), "verify"],
        cwd=project,
        env=project_env(PYTHONPATH=str(project)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def asides(project: Path) -> list[Path]:
    return sorted((project / ".dvc" / "tmp").glob("verify-*"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_newer_output_is_reported_as_modified_and_left_alone(finished: Path, tmp_path: Path) -> None:
    """A line appended to per_class.csv as a newer run would write it, and a model that a stage wrote before it
    was killed (before DVC recorded it): both differ from dvc.lock, neither is damage, both stay."""
    project = workspace(finished, tmp_path)
    per_class = project / "data" / "evaluate" / "logreg" / "per_class.csv"
    with open(per_class, "a") as f:
        f.write("10,0.5,0.5,0.5,1\n")
    newer_csv = per_class.read_bytes()
    model = project / "data" / "models" / "logreg" / "model.keras"
    newer_model = model.read_bytes() + b"newer"  # other bytes, written as the stage writes: a new file renamed into place
    (model.parent / ".tmp-model.keras").write_bytes(newer_model)
    os.replace(model.parent / ".tmp-model.keras", model)

    done = verify(project)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for path in ("data/evaluate/logreg/per_class.csv", "data/models/logreg/model.keras"):
        assert f"{path}: modified since dvc.lock recorded it (a newer output, not damage): left alone" in lines, lines
    assert not any("damaged" in line or "restored" in line for line in lines), lines
    assert per_class.read_bytes() == newer_csv and model.read_bytes() == newer_model
    assert asides(project) == []  # nothing moved
    assert "Traceback" not in done.stderr


def test_damaged_copies_are_moved_into_one_dated_folder_not_deleted(finished: Path, tmp_path: Path) -> None:
    """A bit flipped in place (size and times kept) in a model and in the cache object of the predictions, and a
    metrics file (not cached) likewise: repaired where a good copy exists, moved aside where none does; every
    damaged copy is kept, byte for byte, in one .dvc/tmp/verify-<UTC time>/ folder under its own path."""
    project = workspace(finished, tmp_path)
    model = project / "data" / "models" / "logreg" / "model.keras"
    predictions = cache_object_of(project, "data/evaluate/logreg/predictions.csv")
    metrics = project / "data" / "leaderboard.json"  # a metric that DVC does not cache
    good = {p: md5(p) for p in (model, predictions, metrics)}
    flip_a_bit(model, model.stat().st_size // 2)
    flip_a_bit(predictions, 20)
    flip_a_bit(metrics, 5)
    damaged = {p: p.read_bytes() for p in (model, predictions, metrics)}

    done = verify(project)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    (aside,) = asides(project)
    assert aside.name.startswith("verify-") and aside.name.endswith("Z")
    rel = aside.relative_to(project)
    lines = done.stdout.splitlines()
    assert (
        f"data/models/logreg/model.keras: workspace file damaged: restored from the cache (the damaged copy: {rel}/data/models/logreg/model.keras)"
        in lines
    ), lines
    obj = predictions.relative_to(project)
    assert (
        f"{obj}: cache object of data/evaluate/logreg/predictions.csv damaged: rewritten from the workspace file (the damaged copy: {rel}/{obj})"
        in lines
    ), lines
    assert (
        f"data/leaderboard.json: workspace file damaged: moved aside (the damaged copy: {rel}/data/leaderboard.json)" in lines
    ), lines
    assert (
        f"nothing was deleted: each damaged copy is in {rel}/, under its own path; to put one back: mv {rel}/<path> <path>"
        in lines
    ), lines
    assert (aside / "data/models/logreg/model.keras").read_bytes() == damaged[model]
    assert (aside / obj).read_bytes() == damaged[predictions]
    assert (aside / "data/leaderboard.json").read_bytes() == damaged[metrics]
    assert md5(model) == good[model] and md5(predictions) == good[predictions] and not metrics.exists()
    assert "Running stage 'report'" in dvc(project, "repro").stdout  # makes the leaderboard again
    assert md5(metrics) == good[metrics] and verify(project).returncode == 0


def test_verify_waits_for_the_dvc_command_that_holds_the_repo_lock(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds DVC's repo lock (.dvc/tmp/lock), verify changes nothing: it waits for it
    (here 1 s) and then says who holds the workspace; once it is free, it repairs."""
    from pipeline import integrity

    project = workspace(finished, tmp_path)
    model = project / "data" / "models" / "logreg" / "model.keras"
    flip_a_bit(model, model.stat().st_size // 2)
    damaged = model.read_bytes()
    monkeypatch.setattr(integrity, "LOCK_WAIT_S", 1.0, raising=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_REPO_LOCK, str(project / ".dvc" / "tmp" / "lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError) as busy:
            integrity.verify(project)
        assert f"another DVC command holds this workspace ({project / '.dvc' / 'tmp' / 'lock'})" in str(busy.value)
        assert model.read_bytes() == damaged and asides(project) == []
    finally:
        holder.kill()
        holder.wait()
    report = integrity.verify(project)
    assert [(f.path, f.action) for f in report.damaged] == [(model, "restored from the cache")]


def test_verify_beside_a_running_stage_leaves_what_it_writes_alone_and_the_run_goes_on(finished: Path, tmp_path: Path) -> None:
    """`dvc repro --force fetch` waits on a mirror that never answers: the stage has given DVC's repo lock up and
    holds data/raw in .dvc/tmp/rwlock. A file written there meanwhile, as the stage writes its outputs, is left
    alone (reported as being written by that command), and the run is not disturbed."""
    project = workspace(finished, tmp_path)
    env = {k: v for k, v in project_env(PYTHONPATH=str(project)).items() if k != "MNIST_MIRROR"}
    raw = project / "data" / "raw" / "t10k-labels-idx1-ubyte"
    with silent_server() as url:
        edit_params(project, lambda p: {**p, "fetch": {**p["fetch"], "mirrors": [url], "timeout_s": 300, "retries": 0}})
        repro = subprocess.Popen(
            ["dvc", "repro", "--force", "fetch"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            wait_for_stage(repro, "stages/fetch.py")
            written = b"\x00\x00\x08\x01 a newer file of the running stage"
            raw.parent.mkdir(exist_ok=True)
            raw.write_bytes(written)
            done = verify(project)
            assert repro.poll() is None, "the run did not survive mnist verify"
        finally:
            os.killpg(repro.pid, signal.SIGKILL)
            repro.wait()
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("data/raw/t10k-labels-idx1-ubyte: ")] or [done.stdout]
    assert line.startswith(f"data/raw/t10k-labels-idx1-ubyte: being written by a DVC command (PID {repro.pid}: "), line
    assert line.endswith("repro --force fetch): left alone"), line
    assert raw.read_bytes() == written and asides(project) == []
