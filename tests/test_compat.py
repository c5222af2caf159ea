"""What the project relies on where a library has no public API, so that an upgrade fails a test, not a run:
Keras's seed source (pipeline/train/loop.py keras_seeds_from), the interpreter's exit handlers (pipeline/warm.py
run_atexit_handlers), the private modules the warm server preloads (pipeline/warm.py IMPORTED_LATER), DVC's
printed lines about its stages (pipeline/progress.py stage_event), DVC's locks, lock-file reader and state
database (pipeline/integrity.py), TensorFlow's op-determinism switch off (benchmarks/throughput.py
set_determinism); and the public replacement of Keras's private layer walk."""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import BIN
from helpers import load_test_params
from pipeline import integrity, progress, warm
from pipeline.models import registry
from pipeline.train.callbacks import all_layers, seeded_layers
from pipeline.train.loop import keras_seeds_from


def initial_weights() -> np.ndarray:
    return np.asarray(keras.initializers.GlorotUniform()((4, 3)))


def test_keras_draws_its_default_seeds_from_the_source_keras_seeds_from_sets() -> None:
    keras.utils.set_random_seed(7)
    undisturbed = initial_weights()
    with keras_seeds_from(7):
        random.random()  # another thread's draw from the global generator, as Prefect's client makes
        assert np.array_equal(initial_weights(), undisturbed)
    with keras_seeds_from(8):
        assert not np.array_equal(initial_weights(), undisturbed)


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_the_public_layer_walk_finds_the_random_layers_keras_tracks(name: str) -> None:
    """EpochSeeds reseeds the layers seeded_layers finds: the same ones, in the same order, as Keras's own walk."""
    params = load_test_params()
    model = registry.build(name, params.model(name))
    private = [layer.name for layer in model._flatten_layers(include_self=False) if hasattr(layer, "seed_generator")]
    assert [layer.name for layer in seeded_layers(model)] == private
    assert {layer.name for layer in all_layers(model)} >= {layer.name for layer in model.layers}


def test_some_models_have_random_layers_to_reseed() -> None:
    params = load_test_params()
    assert seeded_layers(registry.build("deep_mlp", params.model("deep_mlp")))  # its dropout


def test_run_atexit_handlers_runs_them_once_as_exit_would() -> None:
    code = textwrap.dedent("""
        import atexit
        from pipeline.warm import run_atexit_handlers
        atexit.register(print, "first")
        atexit.register(print, "second")
        run_atexit_handlers()
        print("after")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["second", "first", "after"]  # last registered first, and not again at exit


@pytest.mark.parametrize("name", warm.IMPORTED_LATER)
def test_every_module_the_warm_server_preloads_imports(name: str) -> None:
    """Some are private (anyio._core._sockets, rich._emoji_codes): the server ignores one that is gone, and the
    stages would only lose start-up time, so a rename in an upgrade fails here."""
    importlib.import_module(name)


# --- DVC: a tiny project, run by the real dvc ----------------------------------------------------------------

WAIT_FOR_GO = "touch waiting; n=0; while [ ! -e go ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done; echo slow > slow.txt"
TINY_DVC_YAML = f"""\
stages:
  first:
    cmd: echo "$DVC_STAGE" > first.txt
    deps: [seed.txt]
    outs: [first.txt]
  each:
    foreach: [x]
    do:
      cmd: echo "$DVC_STAGE" > ${{item}}.txt
      deps: [first.txt]
      outs:
        - ${{item}}.txt
  broken:
    cmd: 'echo "error in stage broken: it always fails"; exit 3'
    deps: [first.txt]
    outs: [never.txt]
  slow:
    cmd: '{WAIT_FOR_GO}'
    outs: [slow.txt]
"""


def dvc_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `root`, its stdout and stderr together as `mnist run` reads them."""
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert run_dvc(root, "init", "-q").returncode == 0
    (root / "dvc.yaml").write_text(TINY_DVC_YAML)
    (root / "seed.txt").write_text("a dependency: a stage without one always runs, and the run-cache keeps none of it\n")
    return root


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_dvc_repro_says_what_it_did_to_each_stage_in_the_lines_progress_reads(tiny: Path) -> None:
    """`dvc repro` has no structured output, and DVC's Python API does not tell a stage that ran from one restored
    from the run-cache: pipeline.progress reads these lines (for mnist run, mnist flow and the fan-out's chains)."""
    ran = run_dvc(tiny, "repro", "each@x")
    assert ran.returncode == 0, ran.stdout
    assert progress.repro_outcomes(ran.stdout) == {"first": progress.RAN, "each@x": progress.RAN}, ran.stdout
    assert "Running stage 'first':" in ran.stdout.splitlines()
    assert '> echo "$DVC_STAGE" > first.txt' in ran.stdout.splitlines()  # DVC echoes the command as it runs it
    # DVC names each stage's command's stage in DVC_STAGE, as it names the stage in these lines
    assert (tiny / "first.txt").read_text() == "first\n" and (tiny / "x.txt").read_text() == "each@x\n"

    again = run_dvc(tiny, "repro", "each@x")
    assert progress.repro_outcomes(again.stdout) == {"first": progress.UP_TO_DATE, "each@x": progress.UP_TO_DATE}, again.stdout

    for name in ("dvc.lock", "first.txt", "x.txt"):
        (tiny / name).unlink()
    restored = run_dvc(tiny, "repro", "each@x")
    assert restored.returncode == 0, restored.stdout
    assert progress.repro_outcomes(restored.stdout) == {"first": progress.RESTORED, "each@x": progress.RESTORED}, restored.stdout
    assert (tiny / "x.txt").read_text() == "each@x\n"

    failed = run_dvc(tiny, "repro", "--single-item", "broken")
    assert failed.returncode != 0
    assert progress.repro_outcomes(failed.stdout) == {"broken": progress.FAILED}, failed.stdout

    lines: list[str] = []
    tracker = progress.Progress(["first", "each@x", "broken"], out=lines.append, clock=lambda: 0.0)
    for line in (ran.stdout + failed.stdout).splitlines(keepends=True):
        tracker.feed(line)
    tracker.close()
    assert lines == ["[1/3] first: ran, 0.0 s", "[2/3] each@x: ran, 0.0 s", "[3/3] broken: failed, 0.0 s"]
    assert tracker.errors == {"broken": "it always fails"}


@pytest.fixture
def slow_stage(tiny: Path) -> Iterator[subprocess.Popen[str]]:
    """`dvc repro slow`, its command waiting for a file named go."""
    repro = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "slow"], cwd=tiny, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (tiny / "waiting").exists():
            assert repro.poll() is None and time.monotonic() < deadline, "the slow stage never started"
            time.sleep(0.05)
        yield repro
    finally:
        (tiny / "go").touch()
        repro.communicate(timeout=60)


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_dvc_gives_the_repo_lock_up_while_a_stage_runs_and_keeps_its_outputs_in_the_rwlock(
    tiny: Path, slow_stage: subprocess.Popen[str]
) -> None:
    """What mnist verify and the set-aside of a broken dvc.lock rely on (pipeline/integrity.py): the repo lock is
    free while a stage's command runs, and .dvc/tmp/rwlock names the stage's outputs with the PID of `dvc repro`."""
    from dvc.repo import Repo

    with Repo(str(tiny)) as repo:
        assert integrity.take_repo_lock(repo)
        integrity.release_repo_lock(repo)
        out = str(Path(repo.root_dir) / "slow.txt")
        table = integrity.read_rwlock(repo)
        assert table is not None and list(table["write"]) == [out], table
        writer = table["write"][out]
        assert writer["pid"] == slow_stage.pid and "repro slow" in writer["cmd"]
        assert integrity.rwlock_holders(repo)[0] == ("write", slow_stage.pid, writer["cmd"], out)
    (tiny / "go").touch()
    assert slow_stage.wait(timeout=60) == 0
    with Repo(str(tiny)) as repo:
        assert integrity.read_rwlock(repo) == {"write": {}, "read": {}}
        assert integrity.rwlock_holders(repo) == []


HOLD_WITH_REPO_LOCK = """
import sys, time
from pathlib import Path
from pipeline.integrity import repo_lock
with repo_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_the_repo_lock_integrity_takes_is_the_one_that_stops_a_dvc_repro(tiny: Path) -> None:
    from dvc.repo import Repo

    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_REPO_LOCK, str(tiny)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert (tiny / ".dvc" / "tmp" / "lock").exists()
        blocked = run_dvc(tiny, "repro", "first")
        assert blocked.returncode != 0 and "Unable to acquire lock" in blocked.stdout, blocked.stdout
        assert not (tiny / "first.txt").exists()
        with Repo(str(tiny)) as repo:
            assert not integrity.take_repo_lock(repo)
    finally:
        holder.kill()
        holder.wait()
    assert run_dvc(tiny, "repro", "first").returncode == 0


BROKEN_LOCKS = {
    "cut off": "schema: '2.0'\nstages:\n  first:\n    cmd: echo\n    outs:\n    - path: 'first",
    "not DVC's schema": "schema: '2.0'\nstages:\n  first:\n    cmd: 3\n    outs: nothing\n",
}


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
@pytest.mark.parametrize("content", list(BROKEN_LOCKS))
def test_dvc_refuses_the_lock_files_its_reader_rejects_and_reads_the_one_it_wrote(tiny: Path, content: str) -> None:
    assert run_dvc(tiny, "repro", "first").returncode == 0
    lock = tiny / "dvc.lock"
    assert integrity.dvc_reads_lock_file(lock) and integrity.lock_problem(lock) is None
    assert run_dvc(tiny, "status", "first").returncode == 0
    lock.write_text(BROKEN_LOCKS[content])
    assert not integrity.dvc_reads_lock_file(lock)
    refused = run_dvc(tiny, "status", "first")
    assert refused.returncode != 0 and "dvc.lock" in refused.stdout, refused.stdout


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_dvc_refuses_an_empty_lock_file(tiny: Path) -> None:
    assert run_dvc(tiny, "repro", "first").returncode == 0
    (tiny / "dvc.lock").write_text("")
    assert integrity.lock_problem(tiny / "dvc.lock") == "empty"
    refused = run_dvc(tiny, "status", "first")
    assert refused.returncode != 0 and "dvc.lock" in refused.stdout, refused.stdout


@pytest.mark.pipeline  # runs dvc repro (a tiny project)
def test_dvcs_state_database_keeps_a_files_hash_while_its_inode_size_and_time_stay(tiny: Path) -> None:
    """mnist verify tells a decayed file (bytes changed, DVC's record of it still matching) from a newer output."""
    from dvc.repo import Repo

    assert run_dvc(tiny, "repro", "first").returncode == 0
    out = tiny / "first.txt"
    good = hashlib.md5(out.read_bytes()).hexdigest()
    with Repo(str(tiny)) as repo:
        assert integrity.recorded_md5(repo, out) == good
    stat = out.stat()
    with open(out, "r+b") as f:  # in place: the same inode and size
        f.write(b"F")
    os.utime(out, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with Repo(str(tiny)) as repo:
        assert integrity.recorded_md5(repo, out) == good  # decayed: DVC still records the good hash
    os.utime(out, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with Repo(str(tiny)) as repo:
        assert integrity.recorded_md5(repo, out) is None  # touched since: DVC has no record of it as it is


def test_the_throughput_benchmark_switches_op_determinism_on_and_off() -> None:
    """TensorFlow has a public switch on (tf.config.experimental.enable_op_determinism) and only a private one off."""
    from tensorflow.python.framework import config

    from benchmarks.throughput import set_determinism

    was = config.is_op_determinism_enabled()
    try:
        set_determinism(True)
        assert config.is_op_determinism_enabled()
        set_determinism(False)
        assert not config.is_op_determinism_enabled()
    finally:
        set_determinism(was)
