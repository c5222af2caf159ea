"""TensorBoard across DVC experiments: the runs of each experiment side by side in one logdir (`mnist compare`).

Each experiment's TensorBoard outputs are read at its commit through DVC's file system, from
the DVC cache (or the remote), without checking the experiment out. A run is named
`<experiment>/<stage>/<model>`, and HParams gets one trial per (experiment, model) with that
experiment's params and test metrics.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dvc.api import DVCFileSystem
from dvc.repo import Repo
from dvc.repo.experiments.utils import resolve_name
from scmrepo.exceptions import SCMError

from pipeline import artifacts, report
from pipeline.config import load_params
from pipeline.data import atomic_path, remove_leftovers
from pipeline.errors import PipelineError

TENSORBOARD = "data/tensorboard"  # every stage's --tensorboard folder is under it (dvc.yaml)
MODELS, EVALUATE = "data/models", "data/evaluate"  # the train and evaluate stages' outputs (dvc.yaml)
MODEL_FILES = (artifacts.META_FILE, artifacts.TIMINGS_FILE)
EVALUATE_FILES = (artifacts.METRICS_FILE, artifacts.PER_CLASS_FILE, artifacts.TIMINGS_FILE)
MARKER = ".mnist-compare"  # written into every logdir that gather lays out: the only kind of folder it replaces


def experiments(root: Path, names: list[str]) -> dict[str, str]:
    """Each experiment's name and commit: `names` (an experiment's name, or a git revision such as
    HEAD or a branch, for the baseline), or every experiment of HEAD (`dvc exp ls`)."""
    with Repo(str(root)) as repo:
        if not names:
            found = {name: rev for exps in repo.experiments.ls().values() for name, rev in exps if rev}
            if not found:
                raise PipelineError("no DVC experiment to compare: run some first (`dvc exp run -S ...`, see `dvc exp show`)")
            return dict(sorted(found.items()))
        refs, found, unknown = resolve_name(repo.scm, names), {}, []
        for name in names:
            try:
                found[name] = repo.scm.get_ref(str(refs[name])) if refs[name] else repo.scm.resolve_rev(name)
            except SCMError:
                unknown.append(name)
        if unknown:
            raise PipelineError(
                f"no DVC experiment or git revision named {', '.join(unknown)}: `dvc exp ls` lists the experiments"
            )
        return found


def copy_runs(fs: DVCFileSystem, dest: Path) -> list[str]:
    """Each stage's run folders (`<stage>/<model>`), but the report's: its trials are made again, named by experiment."""
    stages = []
    for stage in sorted(fs.ls(TENSORBOARD, detail=False)):
        if Path(stage).name == "report" or not fs.isdir(stage):
            continue
        stages.append(Path(stage).name)
        for run in sorted(fs.ls(stage, detail=False)):
            if fs.isdir(run):  # not the .gitignore files that DVC keeps beside its outputs
                fs.get(run, str(dest / Path(stage).name / Path(run).name), recursive=True)
    return stages


def write_trials(fs: DVCFileSystem, experiment: str, dest: Path) -> list[str]:
    """One HParams trial per model that this experiment evaluated: its params.yaml block and its leaderboard row."""
    from pipeline.models.params import PARAM_TYPES

    with tempfile.TemporaryDirectory(prefix="mnist-compare-") as tmp:
        local = Path(tmp)
        (local / "params.yaml").write_text(fs.read_text("params.yaml"))
        params = load_params(local / "params.yaml", model_types=PARAM_TYPES)
        models = [m for m in params.models if fs.exists(f"{EVALUATE}/{m}/{artifacts.METRICS_FILE}")]
        for m in models:
            for folder, files in ((MODELS, MODEL_FILES), (EVALUATE, EVALUATE_FILES)):
                (local / folder / m).mkdir(parents=True)
                for name in files:
                    fs.get(f"{folder}/{m}/{name}", str(local / folder / m / name))
        for row in report.read_rows(local / MODELS, local / EVALUATE, models):
            report.write_trial(dest / "report" / row["model"], row, params.models[row["model"]], experiment)
    return models


def check_replaceable(logdir: Path) -> None:
    """Raise PipelineError unless `logdir` is absent or a folder that gather laid out (it holds MARKER)."""
    if logdir.is_symlink() or (logdir.exists() and not (logdir / MARKER).is_file()):
        raise PipelineError(
            f"{logdir} already exists and `mnist compare` did not lay it out (it has no {MARKER} file), so it is "
            f"left as it is. Give --logdir a folder that does not exist yet, or one that `mnist compare` made."
        )


def gather(root: Path, names: list[str], logdir: Path) -> dict[str, list[str]]:
    """Lay the named experiments' (or all of HEAD's) runs out in `logdir`, replacing the layout it held.

    Returns each experiment's stages. The folder is made beside `logdir` and renamed into
    place, so a TensorBoard reading it never sees half of it. An existing `logdir` is replaced
    only if gather laid it out (check_replaceable).
    """
    check_replaceable(logdir)
    found = experiments(root, names)
    logdir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(logdir.parent, logdir.name)
    laid_out, models = {}, set()
    with atomic_path(logdir) as staging:
        for name, rev in found.items():
            fs = DVCFileSystem(str(root), rev=rev)
            if not fs.isdir(TENSORBOARD):
                raise PipelineError(f"experiment {name} ({rev[:7]}) has no {TENSORBOARD}: was its `dvc exp run` complete?")
            laid_out[name] = copy_runs(fs, staging / name)
            models.update(write_trials(fs, name, staging / name))
        report.write_hparams_config(staging, sorted(models), list(found))
        (staging / MARKER).write_text("Laid out by `mnist compare`, which replaces this folder on its next run.\n")
        check_replaceable(logdir)  # again: something may have been put there meanwhile
        if logdir.exists():
            shutil.rmtree(logdir)  # the old layout goes only once the new one is complete
    return laid_out
