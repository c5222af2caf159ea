"""The whole pipeline through the real `dvc`: a small `dvc repro` in a copy of the repo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import yaml

from conftest import BIN, SMALL_LIMIT, SMALL_VAL, SmallRun, dvc, edit_params, project_env
from pipeline import artifacts


def test_every_stage_ran_and_is_locked(small_run: SmallRun) -> None:
    lock = yaml.safe_load((small_run.project / "dvc.lock").read_text())["stages"]
    expected = {"fetch", "preprocess", "report", "publish"}
    for model in small_run.models():
        expected |= {f"train@{model}", f"evaluate@{model}", f"export@{model}"}
    assert expected <= set(lock), expected - set(lock)
    for stage in expected:
        assert f"Running stage '{stage}'" in small_run.output


def test_fetch_output_is_verified_mnist(small_run: SmallRun) -> None:
    from pipeline.data import sha256
    from pipeline.mnist import FILES

    raw = small_run.project / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(FILES)
    for name, digest in FILES.items():
        assert sha256((raw / name).read_bytes()) == digest


def test_data_report_counts_the_small_split(small_run: SmallRun) -> None:
    report = json.loads((small_run.project / "data" / "data_report.json").read_text())
    assert report["splits"]["train"]["images"] == SMALL_LIMIT - SMALL_VAL
    assert report["splits"]["val"]["images"] == SMALL_VAL
    assert report["splits"]["test"]["images"] == 10_000
    assert sum(report["splits"]["val"]["per_class"].values()) == SMALL_VAL
    assert report["checks"]["test"] == ["28x28 uint8", "labels in 0..9", "no blank images"]


def test_second_repro_is_up_to_date(small_run: SmallRun) -> None:
    done = dvc(small_run.project, "repro")
    assert "Running stage" not in done.stdout
    assert "Data and pipelines are up to date." in done.stdout


def test_mirror_change_leaves_every_stage_up_to_date(small_run: SmallRun) -> None:
    """Fetching from another mirror (plain files instead of .gz) gives the same bytes: nothing downstream re-runs."""
    mirror = small_run.project.parent / "plain-mirror"
    mirror.mkdir(exist_ok=True)
    for f in (small_run.project / "data" / "raw").iterdir():
        (mirror / f.name).write_bytes(f.read_bytes())
    from conftest import project_env

    env = project_env(MNIST_MIRROR=str(mirror))
    dvc(small_run.project, "repro", "--force", "--single-item", "fetch", env=env)
    status = json.loads(dvc(small_run.project, "status", "--json", env=env).stdout)
    assert status == {}, status


def test_metrics_show_lists_every_model(small_run: SmallRun) -> None:
    shown = json.loads(dvc(small_run.project, "metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    for model in small_run.models():
        data = files[f"data/evaluate/{model}/metrics.json"]["data"][model]  # under the model's name: unique column names
        assert 0.0 <= data["accuracy"] <= 1.0
        assert set(data) == {"accuracy", "loss", "gate", "blessed"}  # quality only, no timings
    board = files["data/leaderboard.json"]["data"]
    assert set(board) == {"accuracy"} and set(board["accuracy"]) == set(small_run.models())
    for model in small_run.models():
        assert board["accuracy"][model] == small_run.metrics(model)["accuracy"]


def test_plots_show_renders_confusion_curves_and_per_class(small_run: SmallRun) -> None:
    out = small_run.project.parent / "plots"
    dvc(small_run.project, "plots", "show", "--out", str(out))
    html = (out / "index.html").read_text()
    for model in small_run.models():  # one vega-lite chart per plot file, its id the file's path
        assert f"data_evaluate_{model}_predictions_csv" in html
        assert f"data_evaluate_{model}_per_class_csv" in html
        for split in ("train", "eval"):  # DVCLive's per-epoch files, one chart each
            assert f"data_live_{model}_plots_metrics_{split}_accuracy_tsv" in html
    assert "validation-accuracy" in html  # the top-level chart over every model


def test_gate_blocks_export_and_the_rest_goes_on(small_run: SmallRun) -> None:
    linear = json.loads((small_run.project / "data" / "export" / "linear" / "export.json").read_text())
    assert linear["blessed"] is False
    assert "linear" in linear["reason"] and "gate" in linear["reason"]
    assert not (small_run.project / "data" / "export" / "linear" / "saved_model").exists()
    assert not (small_run.project / "data" / "serving" / "linear").exists()
    for model in small_run.models():
        if model == "linear":
            continue
        record = json.loads((small_run.project / "data" / "export" / model / "export.json").read_text())
        assert record["blessed"] is True
        assert (small_run.project / "data" / "export" / model / record["saved_model"] / "saved_model.pb").is_file()
    assert "not exported" in small_run.output


def test_publish_stage_puts_each_blessed_model_into_the_serving_folder(small_run: SmallRun) -> None:
    serving = small_run.project / "data" / "serving"
    for model in small_run.models():
        if model == "linear":
            continue
        versions = sorted(p.name for p in (serving / model).iterdir())
        assert versions and all(v.isdigit() for v in versions), versions  # no staging or deleted leftovers
        newest = serving / model / str(max(map(int, versions)))
        assert (newest / "saved_model.pb").is_file()
        record = json.loads((small_run.project / "data" / "export" / model / "export.json").read_text())
        assert artifacts.tree_digest(newest) == record["sha256"], model


def test_each_exported_model_has_a_card_naming_its_accuracy_interval_and_sources(small_run: SmallRun) -> None:
    """card.md beside each SavedModel: the test accuracy of metrics.json with its interval, a row per digit, the
    project's commit (the run's params.yaml is uncommitted) and its inputs' md5 as dvc.lock has them. No card
    for a model under its gate."""
    project = small_run.project
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True).stdout.strip()
    for model in small_run.models():
        card = project / "data" / "export" / model / artifacts.CARD_FILE
        if not small_run.metrics(model)["blessed"]:
            assert not card.exists(), model
            continue
        text = card.read_text()
        accuracy = small_run.metrics(model)["accuracy"]
        assert f"**Test accuracy.** {accuracy:.2%} (" in text and "95 % interval" in text, text
        assert len(re.findall(r"^\| [0-9] +\| [0-9,]+ +\| [0-9.]+% +\|$", text, re.MULTILINE)) == 10, text  # a row per digit
        assert f"git commit `{head}` (with uncommitted changes to its code, params or dvc.yaml)" in text, text
        inputs = {dep["path"]: dep["md5"] for dep in lock[f"export@{model}"]["deps"]}
        for path in (f"data/models/{model}/model.keras", f"data/evaluate/{model}/predictions.csv"):
            assert re.search(rf"^\| {re.escape(path)} +\| {inputs[path]} +\|$", text, re.MULTILINE), (path, text)


def test_a_registered_version_resolves_through_dvcs_registry_to_the_exported_folder(small_run: SmallRun, tmp_path) -> None:
    """dvc.yaml's artifacts with GTO's tags: in a clone with the small run committed, `gto register` and `gto assign`
    make cnn v1.0.0 the `prod` stage; dvc.api.artifacts_show and `dvc artifacts get . cnn --stage prod` resolve it to
    the export folder, SavedModel and card the same bytes as the run's."""
    from dvc.api import artifacts_show

    clone, identity = (
        tmp_path / "clone",
        {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"},
    )
    env = {**project_env(), **identity, "PYTHONPATH": str(clone)}
    subprocess.run(["git", "clone", "-q", str(small_run.project), str(clone)], check=True)
    for name in ("dvc.lock", "params.yaml"):
        shutil.copy2(small_run.project / name, clone / name)
    subprocess.run(["git", "commit", "-qam", "the small run"], cwd=clone, env=env, check=True)
    dvc(clone, "cache", "dir", "--local", str(small_run.project / ".dvc" / "cache"), env=env)
    for command in (
        ["register", "cnn", "HEAD", "--version", "v1.0.0"],
        ["assign", "cnn", "--version", "v1.0.0", "--stage", "prod"],
    ):
        subprocess.run([str(BIN / "gto"), *command], cwd=clone, env=env, check=True, capture_output=True, timeout=120)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()
    assert artifacts_show("cnn", stage="prod", repo=str(clone)) == {"rev": head, "path": "data/export/cnn"}
    dvc(clone, "artifacts", "get", ".", "cnn", "--stage", "prod", "-o", str(tmp_path / "got"), env=env)
    export = small_run.project / "data" / "export" / "cnn"
    assert artifacts.tree_digest(tmp_path / "got" / artifacts.SAVED_MODEL) == artifacts.tree_digest(
        export / artifacts.SAVED_MODEL
    )
    assert (tmp_path / "got" / artifacts.CARD_FILE).read_bytes() == (export / artifacts.CARD_FILE).read_bytes()


def test_saved_models_reproduce_evaluate_in_a_fresh_process(small_run: SmallRun) -> None:
    script = """
import json, sys, numpy as np, tensorflow as tf
root = sys.argv[1]
test = np.load(root + '/data/prepared/mnist.npz')
x, y = test['x_test'], test['y_test']
for model in sys.argv[2:]:
    record = json.load(open(f'{root}/data/export/{model}/export.json'))
    loaded = tf.saved_model.load(f"{root}/data/export/{model}/{record['saved_model']}")
    pred = np.concatenate([loaded.signatures['serving_default'](images=tf.constant(x[i:i+2500]))['class'].numpy() for i in range(0, len(y), 2500)])
    print(model, float((pred == y).mean()))
"""
    blessed = [m for m in small_run.models() if small_run.metrics(m)["blessed"]]
    done = subprocess.run(
        [sys.executable, "-c", script, str(small_run.project), *blessed], capture_output=True, text=True, check=True
    )
    got = dict(line.split() for line in done.stdout.strip().splitlines())
    for model in blessed:
        assert float(got[model]) == small_run.metrics(model)["accuracy"], model


def test_changing_one_models_params_reruns_only_its_stages(small_run: SmallRun) -> None:
    project = small_run.project
    before = (project / "params.yaml").read_text()
    try:
        edit_params(project, lambda raw: raw["models"]["cnn"].update(learning_rate=0.0005) or raw)
        # DVC reports the stages whose own deps changed: cnn's training, and the report (it reads all models' params)
        status = json.loads(dvc(project, "status", "--json").stdout)
        assert set(status) == {"train@cnn", "report"}, status
        done = dvc(project, "repro").stdout
        ran = {line.split("'")[1] for line in done.splitlines() if line.startswith("Running stage")}
        assert ran == {"train@cnn", "evaluate@cnn", "export@cnn", "report", "publish"}, ran
    finally:
        (project / "params.yaml").write_text(before)
        back = dvc(project, "repro").stdout  # back to the small run's state for the tests that follow
    # put back, cnn's stages come from DVC's run-cache: nothing is trained again
    for stage in ("train@cnn", "evaluate@cnn", "export@cnn"):
        assert f"Stage '{stage}' is cached - skipping run" in back, back[-3000:]
    assert "Running stage 'train@cnn'" not in back


def test_report_shows_the_leaderboard(small_run: SmallRun) -> None:
    report = (small_run.project / "data" / "report.md").read_text()
    for model in small_run.models():
        assert re.search(rf"^\| {model} +\|", report, re.M), model  # a leaderboard row (tabulate pads the cells)
        assert f"evaluate/{model}/confusion.png" in report
        assert (small_run.project / "data" / "evaluate" / model / "confusion.png").stat().st_size > 1000


def test_forced_rerun_of_a_model_gives_the_same_hashes(small_run: SmallRun) -> None:
    """Same inputs, same bytes: model.keras, metrics, predictions and the SavedModel hash the same after --force."""
    project = small_run.project

    def outs() -> dict[str, str]:
        stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        return {
            o["path"]: o["md5"] for name in ("train@logreg", "evaluate@logreg", "export@logreg") for o in stages[name]["outs"]
        }

    record = project / "data" / "export" / "logreg" / "export.json"
    before, saved_before = outs(), json.loads(record.read_text())["sha256"]
    try:
        dvc(project, "repro", "--force", "--single-item", "train@logreg", "evaluate@logreg", "export@logreg")
        after, saved_after = outs(), json.loads(record.read_text())["sha256"]
    finally:
        dvc(project, "repro")  # the report and publish stages read the new timings: bring them up to date
    differs = sorted(path for path in before if before[path] != after[path])
    expected = {  # wall times and durations, as the README lists
        "data/models/logreg/timings.json",
        "data/evaluate/logreg/timings.json",
        "data/export/logreg",
        "data/tensorboard/train/logreg",
        "data/tensorboard/evaluate/logreg",
        "data/tensorboard/export/logreg",
    }
    assert set(differs) <= expected, differs
    for path in (
        "data/models/logreg/model.keras",
        "data/models/logreg/meta.json",
        "data/evaluate/logreg/metrics.json",
        "data/evaluate/logreg/predictions.csv",
        "data/live/logreg/metrics.json",
        "data/live/logreg/plots/metrics",
    ):
        assert before[path] == after[path], path
    assert saved_before == saved_after  # the SavedModel's files, bytes and names (the folder also holds timings.json)
