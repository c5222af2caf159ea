"""Promotion and rollback of a model, and the table of the registry: DVC's model registry (dvc.yaml's
`artifacts:`, GTO's git tags `NAME@vX.Y.Z` and `NAME#STAGE#N`) joined to the serving folder.

The version a model has in params.yaml's `serving.stage` is the one that serves: `promote` and
`rollback` publish it into the serving folder as a new TF Serving version, and the publish stage
leaves a model with a version in that stage alone. `<serving base>/<model>/registry.json` maps the
serving folder's versions to the registry's, for `mnist models`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dvc.api
import gto.api
from gto.constants import name_re
from gto.exceptions import ArtifactNotFound

from pipeline import artifacts, serving
from pipeline.card import WRITTEN_BY_RUNS
from pipeline.config import Params, load_params
from pipeline.data import atomic_path
from pipeline.errors import PipelineError
from pipeline.fanout import command

RUN_FILES = ("params.yaml", *WRITTEN_BY_RUNS)  # what a promotion commits: the rest of the tree is the code
SERVED_RECORD = "registry.json"  # in <serving base>/<model>/: {serving version: {version, rev, stage}}


@dataclass(frozen=True)
class Promoted:
    model: str
    version: str  # the registry's, vX.Y.Z
    rev: str  # its commit
    stage: str
    serving: int | None  # the serving folder's version that holds it, when `stage` is the one that serves
    pushed: list[str]  # what went to the remotes: "git", "dvc"


def git(root: Path, *args: str) -> str:
    return command(["git", *args], root).strip()


def metrics_of(root: Path, model: str, rev: str | None = None) -> dict[str, Any]:
    """The model's metrics.json (accuracy, gate, blessed) in the workspace, or at git revision `rev`."""
    path = f"data/evaluate/{model}/metrics.json"
    if rev is None:
        if not (root / path).exists():
            raise PipelineError(f"{model} has no {path}: run the pipeline first (`mnist run` or `dvc repro`)")
        text = (root / path).read_text()
    else:
        text = dvc.api.read(path, repo=str(root), rev=rev)
    metrics: dict[str, Any] = json.loads(text)[model]
    return metrics


def changed_files(root: Path, *exclude: str) -> list[str]:
    """Tracked files that differ from HEAD (staged or not), but those under `exclude`."""
    excluded = [f":(top,exclude){path}" for path in exclude]
    return git(root, "diff", "--name-only", "HEAD", "--", ":(top)", *excluded).splitlines()


def experiment_rev(root: Path, name: str) -> str:
    """The commit of DVC experiment `name` (its name or a prefix of its commit); PipelineError naming the known ones."""
    refs = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    found = {ref.rsplit("/", 1)[1]: sha for sha, ref in (line.split(" ", 1) for line in refs)}
    matches = [sha for exp, sha in found.items() if exp == name] or [
        sha for sha in found.values() if len(name) >= 7 and sha.startswith(name)
    ]
    if len(matches) != 1:
        known = ", ".join(sorted(found)) or "none (`dvc exp run` makes them)"
        raise PipelineError(f"no experiment {name!r} in this repository; its experiments: {known}")
    return matches[0]


def check_stage(stage: str) -> None:
    """PipelineError unless `stage` is a name GTO takes for a stage."""
    if not name_re.fullmatch(stage):
        raise PipelineError(
            f"{stage!r} is no registry stage name: letters, digits, '-', '_' and '/', starting and ending with a "
            "letter or digit (prod, staging, ...)"
        )


def check_gate(model: str, metrics: dict[str, Any], where: str) -> None:
    if not metrics.get("blessed"):
        raise PipelineError(
            f"{model} {where} is under its gate: test accuracy {metrics['accuracy']:.4f} < {metrics['gate']}. "
            "Only a model that passed its gate is promoted; train a better one (or lower gates."
            f"{model} in params.yaml, and run again)"
        )


def check_current(root: Path, model: str) -> None:
    """PipelineError unless the workspace's export of `model` is what the committed code, params and data make."""
    status = json.loads(command(["dvc", "status", "--json", "--with-deps", f"export@{model}"], root) or "{}")
    if status:
        raise PipelineError(
            f"the workspace's {model} is not what its code and params make (`dvc status` lists "
            f"{', '.join(sorted(status))}): run `dvc repro export@{model}` first"
        )


def registered(root: Path, model: str) -> list[dict[str, Any]]:
    """GTO's record of every registered version of `model`, newest first (none if it has none)."""
    try:
        versions: list[dict[str, Any]] = gto.api.show(root, model)
        return versions
    except ArtifactNotFound:
        return []


def version_at(root: Path, model: str, rev: str) -> str | None:
    """The registry's version of `model` registered at commit `rev`, if any."""
    return next((v["version"] for v in registered(root, model) if v["commit_hexsha"] == rev), None)


def assignment_tag(root: Path, model: str, stage: str) -> str:
    """The git tag of the latest assignment of `model` to `stage`."""
    return f"{model}#{stage}#{len(serving.assignments(root, model)[stage])}"


def push(root: Path, model: str, tags: list[str]) -> list[str]:
    """Push the branch and `tags` to git's `origin`, and the model's outputs to DVC's default remote, where set."""
    pushed = []
    if "origin" in git(root, "remote").split():
        command(["git", "push", "-q", "origin", "HEAD", *[f"refs/tags/{tag}" for tag in tags]], root)
        pushed.append("git")
    default = subprocess.run(["dvc", "remote", "default"], cwd=root, capture_output=True, text=True)
    if default.returncode == 0 and default.stdout.strip():  # it fails when no default remote is set
        command(["dvc", "push", "-q", f"evaluate@{model}", f"export@{model}"], root)
        pushed.append("dvc")
    return pushed


def publish_version(root: Path, params: Params, model: str, version: str, rev: str, stage: str) -> int:
    """Copy the registry's `version` of `model` into the serving folder (a new serving version unless the
    newest holds it already) and record which registry version each serving version is."""
    folder = root / params.serving.base / model
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".tmp-get-{model}-") as tmp:
        command(["dvc", "artifacts", "get", ".", model, "--rev", version, "-o", f"{tmp}/export"], root)
        done = serving.publish(model, Path(tmp) / "export" / artifacts.SAVED_MODEL, folder, params.serving.keep)
    record = served(folder)
    record = {k: v for k, v in record.items() if int(k) in artifacts.versions(folder)}
    record[str(done.version)] = {"version": version, "rev": rev, "stage": stage}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    with atomic_path(folder / SERVED_RECORD, len(text)) as staging:
        staging.write_text(text)
    return done.version


def served(folder: Path) -> dict[str, dict[str, str]]:
    """The serving folder's record of the registry versions it holds (empty if promotion never published)."""
    path = folder / SERVED_RECORD
    record: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
    return record


def promote(root: Path, model: str, stage: str, experiment: str | None = None) -> Promoted:
    """Make the workspace's `model`, or experiment `experiment`'s, the version in `stage`: commit it, register
    a version, assign the stage, push to the remotes, and publish it when `stage` serves.

    Refused (PipelineError, nothing changed): a model params.yaml lacks, a stage name GTO refuses, tracked files changed but the
    pipeline's own outputs (all of them, with `experiment`), an unknown experiment, a stale export, a model
    under its gate.
    """
    params = load_params(root / "params.yaml")
    if model not in params.gates:
        raise PipelineError(f"no model {model!r} in params.yaml; its models: {', '.join(params.gates)}")
    check_stage(stage)
    changed = changed_files(root) if experiment else changed_files(root, *WRITTEN_BY_RUNS)
    if changed:
        raise PipelineError(
            f"the working tree has uncommitted changes ({', '.join(changed)}): a promoted version is a commit, "
            + ("and applying the experiment would overwrite them; " if experiment else "")
            + "commit or stash them first"
        )
    if experiment:
        rev = experiment_rev(root, experiment)
        check_gate(model, metrics_of(root, model, rev), f"of experiment {experiment}")
        made = git(root, "diff", "--name-only", "HEAD", rev).splitlines()  # the experiment's files, new ones too
        base = git(root, "rev-parse", f"{rev}^")
        moved = git(root, "diff", "--name-only", base, "HEAD", "--", ":(top)", *[f":(top,exclude){p}" for p in RUN_FILES])
        if made and moved:  # none made: HEAD holds the experiment already
            raise PipelineError(
                f"experiment {experiment} was run on commit {base[:7]}, and HEAD's code differs from it "
                f"({', '.join(moved.splitlines()[:5])}): `git checkout {base[:7]}` (or a branch there) first, so "
                "that the promoted commit holds the code the model was trained with"
            )
        if made:
            command(["dvc", "exp", "apply", experiment], root)
        message = f"{model}: experiment {experiment} promoted to {stage}"
    else:
        check_gate(model, metrics_of(root, model), "in the workspace")
        check_current(root, model)
        made = list(WRITTEN_BY_RUNS)
        message = f"{model}: the workspace's run promoted to {stage}"
    if made:
        git(root, "add", "--", *made)
    if experiment and git(root, "diff", "--cached", "--name-only", rev):
        raise PipelineError(f"`dvc exp apply {experiment}` gave files that differ from the experiment's commit {rev[:7]}")
    if git(root, "diff", "--cached", "--name-only"):
        git(root, "commit", "-q", "-m", message)
    rev = git(root, "rev-parse", "HEAD")
    tags = []
    version = version_at(root, model, rev)
    if version is None:
        accuracy = metrics_of(root, model)["accuracy"]
        first = not registered(root, model)
        version = gto.api.register(
            root,
            model,
            rev,
            version="v1.0.0" if first else None,
            bump_minor=not first,
            message=f"{model}: test accuracy {accuracy:.4f}",
        ).version
        tags.append(f"{model}@{version}")
    if serving.assignments(root, model).get(stage, [None])[-1] != version:
        gto.api.assign(root, model, stage, version=version, force=True, message=message)
        tags.append(assignment_tag(root, model, stage))
    pushed = push(root, model, tags)
    served_as = publish_version(root, params, model, version, rev, stage) if stage == params.serving.stage else None
    return Promoted(model, version, rev, stage, served_as, pushed)


def semantic(version: str) -> tuple[int, ...]:
    """GTO's vX.Y.Z as numbers, to order versions."""
    return tuple(int(part) for part in version.lstrip("v").split("."))


def rollback(root: Path, model: str, stage: str) -> Promoted:
    """Move `stage` back to the newest version below the current one that was in it before; republish it."""
    params = load_params(root / "params.yaml")
    check_stage(stage)
    history = serving.assignments(root, model).get(stage, [])
    if not history:
        raise PipelineError(f"{model} has no version in stage {stage!r}: nothing to roll back (`mnist models` lists them)")
    current = semantic(history[-1])
    earlier = sorted({v for v in history if semantic(v) < current}, key=semantic)
    if not earlier:
        raise PipelineError(f"{model} {history[-1]} is the first version that was in {stage!r}: there is none to roll back to")
    version = earlier[-1]
    gto.api.assign(root, model, stage, version=version, force=True, message=f"{model}: {stage} rolled back from {history[-1]}")
    rev = next(v["commit_hexsha"] for v in registered(root, model) if v["version"] == version)
    pushed = push(root, model, [assignment_tag(root, model, stage)])
    served_as = publish_version(root, params, model, version, rev, stage) if stage == params.serving.stage else None
    return Promoted(model, version, rev, stage, served_as, pushed)


@dataclass(frozen=True)
class Row:
    model: str
    version: str
    stages: list[str]
    accuracy: float | None
    commit: str
    serving: int | None  # the serving folder's version holding it, if it is the one that serves


def table(root: Path) -> list[Row]:
    """Every registered version of every model, with its stages, test accuracy (the leaderboard at its commit)
    and the serving version that holds it, when it is the newest one in the serving folder."""
    params = load_params(root / "params.yaml")
    rows = []
    for model in params.gates:
        folder = root / params.serving.base / model
        held = artifacts.versions(folder) if folder.exists() else []
        record = served(folder) if folder.exists() else {}
        serving_now = record.get(str(held[-1])) if held else None
        in_stages = serving.assignments(root, model)
        for version in registered(root, model):
            rev = version["commit_hexsha"]
            try:
                board = json.loads(git(root, "show", f"{rev}:data/leaderboard.json"))
                accuracy = board["accuracy"].get(model)
            except (PipelineError, KeyError, json.JSONDecodeError):
                accuracy = None
            stages = [stage for stage, held in in_stages.items() if held[-1] == version["version"]]
            is_served = serving_now is not None and serving_now["version"] == version["version"]
            rows.append(Row(model, version["version"], stages, accuracy, rev[:7], held[-1] if is_served else None))
    return rows
