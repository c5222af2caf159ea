"""`mnist promote` and `mnist models` on a copy of the session's sweep, with a local git origin and a
local DVC remote: two experiments promoted to `prod` one after the other, a rollback, the serving
folder following the registry, a second clone resolving `dvc artifacts get . logreg --stage prod` to
the same SavedModel bytes, and each refusal leaving the repository as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.api import artifacts_show

from conftest import BIN, dvc, edit_params, project_env
from pipeline import artifacts, promote
from sweep import RATES, Sweep

IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
SERVING = Path("data/serving/logreg")  # params.yaml's serving.base, for the sweep's one model


def mnist(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mnist"), *args],
        cwd=project,
        env={**project_env(), **IDENTITY, "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, env={**project_env(), **IDENTITY}, capture_output=True, text=True, check=True
    ).stdout.strip()


def copy_sweep(sweep: Sweep, dest: Path) -> Path:
    """The sweep's project, its git history, experiments and DVC cache, without DVC's queue state."""
    shutil.copytree(sweep.project, dest, ignore=lambda src, names: ["tmp"] if src.endswith(".dvc") else [])
    return dest


def digest(path: Path) -> str:
    return artifacts.tree_digest(path)


@dataclass
class Lifecycle:
    project: Path
    done: dict[str, subprocess.CompletedProcess]  # step: what `mnist` printed
    exported: dict[str, str]  # experiment: the digest of its SavedModel, once applied
    got: Path  # what `dvc artifacts get . logreg --stage prod` gave a second clone


@pytest.fixture(scope="module")
def lifecycle(sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Lifecycle:
    """Promote lr-high, then lr-low, list, roll back, list, run the publish stage again, then resolve prod in
    a second clone of the origin with the DVC remote alone (no cache)."""
    root = tmp_path_factory.mktemp("lifecycle")
    project = copy_sweep(sweep, root / "work")
    git(root, "init", "-q", "--bare", "origin.git")
    git(project, "remote", "add", "origin", str(root / "origin.git"))
    git(project, "push", "-q", "origin", "HEAD")
    dvc(project, "remote", "add", "--local", "--default", "store", str(root / "store"))
    done, exported = {}, {}
    for name in ("lr-high", "lr-low"):
        done[f"promote {name}"] = mnist(project, "promote", "logreg", "--from", name, "--stage", "prod")
        exported[name] = digest(project / "data/export/logreg" / artifacts.SAVED_MODEL)
    done["models"] = mnist(project, "models")
    done["rollback"] = mnist(project, "promote", "--rollback", "logreg", "--stage", "prod")
    done["models after"] = mnist(project, "models")
    done["rollback again"] = mnist(project, "promote", "--rollback", "logreg", "--stage", "prod")
    publish = dvc(project, "repro", "--force", "--single-item", "publish")
    done["publish"] = subprocess.CompletedProcess(publish.args, publish.returncode, publish.stdout + publish.stderr, "")
    clone = root / "clone"
    git(root, "clone", "-q", str(root / "origin.git"), str(clone))
    dvc(clone, "remote", "add", "--local", "--default", "store", str(root / "store"))
    dvc(clone, "artifacts", "get", ".", "logreg", "--stage", "prod", "-o", str(root / "got"))
    return Lifecycle(project, done, exported, root / "got")


def test_each_promoted_experiment_becomes_a_version_in_prod_and_serves(lifecycle: Lifecycle) -> None:
    project, done = lifecycle.project, lifecycle.done
    for name, version, serving in (("lr-high", "v1.0.0", 1), ("lr-low", "v1.1.0", 2)):
        promoted = done[f"promote {name}"]
        assert promoted.returncode == 0, promoted.stderr
        assert f"logreg: {version} (commit " in promoted.stdout and f"is in prod\nserving: {SERVING}/{serving}\n" in (
            promoted.stdout
        ), promoted.stdout
        assert "pushed: git, dvc" in promoted.stdout
    tags = git(project, "tag").split()
    assert {"logreg@v1.0.0", "logreg@v1.1.0", "logreg#prod#1", "logreg#prod#2", "logreg#prod#3"} == set(tags)
    # each version is a commit holding its experiment's params
    for name, version in (("lr-high", "v1.0.0"), ("lr-low", "v1.1.0")):
        params = git(project, "show", f"logreg@{version}:params.yaml")
        assert f"learning_rate: {RATES[name]}" in params, (version, params)
    served = json.loads((project / SERVING / "registry.json").read_text())
    assert {k: v["version"] for k, v in served.items()} == {"1": "v1.0.0", "2": "v1.1.0", "3": "v1.0.0"}
    assert digest(project / SERVING / "1") == lifecycle.exported["lr-high"]
    assert digest(project / SERVING / "2") == lifecycle.exported["lr-low"] != lifecycle.exported["lr-high"]


def test_mnist_models_lists_versions_stages_accuracy_and_what_serves(lifecycle: Lifecycle) -> None:
    before, after = lifecycle.done["models"], lifecycle.done["models after"]
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    accuracy = {
        name: promote.metrics_of(lifecycle.project, "logreg", promote.experiment_rev(lifecycle.project, name))["accuracy"]
        for name in RATES
    }
    rows = {line.split()[1]: line.split() for line in before.stdout.splitlines()[1:]}
    assert rows["v1.1.0"][2:4] == ["prod", f"{accuracy['lr-low']:.4f}"] and rows["v1.1.0"][5:] == ["yes", "(version", "2)"]
    assert rows["v1.0.0"][2:4] == ["-", f"{accuracy['lr-high']:.4f}"] and len(rows["v1.0.0"]) == 5
    rows = {line.split()[1]: line.split() for line in after.stdout.splitlines()[1:]}
    assert rows["v1.0.0"][2] == "prod" and rows["v1.0.0"][5:] == ["yes", "(version", "3)"]
    assert rows["v1.1.0"][2] == "-" and len(rows["v1.1.0"]) == 5


def test_a_rollback_moves_prod_back_and_serves_the_earlier_bytes_again(lifecycle: Lifecycle) -> None:
    project, done = lifecycle.project, lifecycle.done
    assert done["rollback"].returncode == 0, done["rollback"].stderr
    assert done["rollback"].stdout.startswith("logreg: prod is v1.0.0 again (commit "), done["rollback"].stdout
    assert artifacts.versions(project / SERVING) == [1, 2, 3]
    assert digest(project / SERVING / "3") == digest(project / SERVING / "1")
    assert artifacts_show("logreg", stage="prod", repo=str(project))["rev"] == git(project, "rev-parse", "logreg@v1.0.0^{}")
    again = done["rollback again"]
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert "v1.0.0 is the first version that was in 'prod'" in again.stderr


def test_a_second_clone_resolves_prod_to_the_served_bytes(lifecycle: Lifecycle) -> None:
    assert digest(lifecycle.got / artifacts.SAVED_MODEL) == digest(lifecycle.project / SERVING / "3")


def test_the_publish_stage_leaves_a_model_in_the_serving_stage_to_promote(lifecycle: Lifecycle) -> None:
    publish = lifecycle.done["publish"]
    assert "logreg: v1.0.0 of the registry serves (its stage prod)" in publish.stdout, publish.stdout[-3000:]
    assert artifacts.versions(lifecycle.project / SERVING) == [1, 2, 3]


@pytest.fixture
def fresh(sweep: Sweep, tmp_path: Path) -> Path:
    """A copy of the sweep's project, nothing promoted."""
    return copy_sweep(sweep, tmp_path / "work")


def refused(project: Path, *args: str) -> str:
    """Run `mnist promote ARGS`; assert it failed with a message and changed no commit, tag or serving folder."""
    head, status = git(project, "rev-parse", "HEAD"), git(project, "status", "--porcelain")
    done = mnist(project, "promote", *args)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert git(project, "rev-parse", "HEAD") == head and git(project, "tag") == ""
    assert git(project, "status", "--porcelain") == status and not (project / "data/serving").exists()
    return done.stderr


def test_promote_refuses_an_unknown_model_or_experiment_or_a_bad_stage_name(fresh: Path) -> None:
    assert "no model 'resnet' in params.yaml; its models: logreg" in refused(fresh, "resnet", "--stage", "prod")
    assert "'prod!' is no registry stage name" in refused(fresh, "logreg", "--from", "lr-low", "--stage", "prod!")
    assert "'prod!' is no registry stage name" in refused(fresh, "--rollback", "logreg", "--stage", "prod!")
    message = refused(fresh, "logreg", "--from", "nope", "--stage", "prod")
    assert "no experiment 'nope' in this repository; its experiments: lr-high, lr-low" in message


def test_promote_refuses_a_dirty_tree_and_keeps_the_change(fresh: Path) -> None:
    with open(fresh / "README.md", "a") as readme:
        readme.write("an edit of mine\n")
    message = refused(fresh, "logreg", "--from", "lr-low", "--stage", "prod")
    assert "uncommitted changes (README.md)" in message and "commit or stash them first" in message
    assert (fresh / "README.md").read_text().endswith("an edit of mine\n")


def test_promote_refuses_a_model_under_its_gate(fresh: Path) -> None:
    """An experiment whose gate is out of reach: it runs evaluate and what follows (train comes from the run-cache)."""
    dvc(fresh, "exp", "run", "-n", "gated", "-S", f"models.logreg.learning_rate={RATES['lr-low']}", "-S", "gates.logreg=0.999")
    git(fresh, "checkout", "-q", "--", ".")  # `dvc exp run` leaves the experiment in the workspace
    message = refused(fresh, "logreg", "--from", "gated", "--stage", "prod")
    assert "logreg of experiment gated is under its gate: test accuracy 0." in message and "< 0.999" in message


def test_promote_refuses_a_workspace_run_that_its_code_and_params_do_not_make(fresh: Path) -> None:
    assert "has no data/evaluate/logreg/metrics.json: run the pipeline first" in refused(fresh, "logreg", "--stage", "prod")
    dvc(fresh, "exp", "apply", "lr-low")
    edit_params(fresh, lambda raw: raw["models"]["logreg"].update(learning_rate=0.1) or raw)
    git(fresh, "add", "-A", "params.yaml", "dvc.lock", "data")
    git(fresh, "commit", "-qm", "lr-low's run, then another learning rate")
    message = refused(fresh, "logreg", "--stage", "prod")
    assert "the workspace's logreg is not what its code and params make" in message and "train@logreg" in message


def test_a_rollback_without_an_earlier_version_is_refused(fresh: Path) -> None:
    message = refused(fresh, "--rollback", "logreg", "--stage", "prod")
    assert "logreg has no version in stage 'prod': nothing to roll back" in message
