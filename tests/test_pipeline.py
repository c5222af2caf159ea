"""The whole pipeline through the real `dvc`: a small `dvc repro` in a copy of the repo."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from conftest import SMALL_LIMIT, SMALL_VAL, SmallRun, dvc, edit_params


def test_every_stage_ran_and_is_locked(small_run: SmallRun) -> None:
    lock = yaml.safe_load((small_run.project / "dvc.lock").read_text())["stages"]
    expected = {"fetch", "preprocess", "report"}
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
        data = files[f"data/evaluate/{model}/metrics.json"]["data"]
        assert 0.0 <= data["accuracy"] <= 1.0
        assert data["model"] == model
    board = files["data/leaderboard.json"]["data"]["models"]
    assert set(board) == set(small_run.models())


def test_plots_show_renders_confusion_curves_and_per_class(small_run: SmallRun) -> None:
    out = small_run.project.parent / "plots"
    dvc(small_run.project, "plots", "show", "--out", str(out))
    html = (out / "index.html").read_text()
    for model in small_run.models():  # one vega-lite chart per plot file, its id the file's path
        assert f"data_evaluate_{model}_predictions_csv" in html
        assert f"data_evaluate_{model}_per_class_csv" in html
        assert f"data_models_{model}_history_csv" in html


def test_gate_blocks_export_and_the_rest_goes_on(small_run: SmallRun) -> None:
    linear = json.loads((small_run.project / "data" / "export" / "linear" / "export.json").read_text())
    assert linear["blessed"] is False
    assert "linear" in linear["reason"] and "gate" in linear["reason"]
    assert not [p for p in (small_run.project / "data" / "export" / "linear").iterdir() if p.name.isdigit()]
    for model in small_run.models():
        if model == "linear":
            continue
        record = json.loads((small_run.project / "data" / "export" / model / "export.json").read_text())
        assert record["blessed"] is True
        assert (small_run.project / "data" / "export" / model / str(record["version"]) / "saved_model.pb").is_file()
    assert "not exported" in small_run.output


def test_saved_models_reproduce_evaluate_in_a_fresh_process(small_run: SmallRun) -> None:
    script = """
import json, sys, numpy as np, tensorflow as tf
root = sys.argv[1]
test = np.load(root + '/data/prepared/mnist.npz')
x, y = test['x_test'], test['y_test']
for model in sys.argv[2:]:
    record = json.load(open(f'{root}/data/export/{model}/export.json'))
    loaded = tf.saved_model.load(f"{root}/data/export/{model}/{record['version']}")
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
        assert ran == {"train@cnn", "evaluate@cnn", "export@cnn", "report"}, ran
    finally:
        (project / "params.yaml").write_text(before)
        dvc(project, "repro")  # back to the small run's state for the tests that follow


def test_report_shows_the_leaderboard(small_run: SmallRun) -> None:
    report = (small_run.project / "data" / "report.md").read_text()
    for model in small_run.models():
        assert re.search(rf"^\| {model} +\|", report, re.M), model  # a leaderboard row (tabulate pads the cells)
        assert f"evaluate/{model}/confusion.png" in report
        assert (small_run.project / "data" / "evaluate" / model / "confusion.png").stat().st_size > 1000
