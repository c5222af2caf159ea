"""pipeline.export and the export stage: the raw-pixel SavedModel, its fresh-process check, the gate.

A tiny logreg trained on synthetic images is exported; every claim of pipeline/export.py's
docstring is checked from outside: a fresh process, saved_model_cli, a SIGKILLed stage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

from helpers import (
    PARAMS_YAML,
    PYTHON,
    REPO,
    VENV_BIN,
    learnable_splits,
    load_stage,
    load_test_params,
    prefect_settings,
    stage_env,
    train_tiny,
)
from pipeline import artifacts, export
from pipeline.artifacts import save_prepared
from pipeline.errors import ExportError
from pipeline.evaluate.scores import evaluate_model

MODEL = "logreg"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder as `dvc repro` leaves it before the export stage: params, data, model, evaluation."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(PARAMS_YAML, root / "params.yaml")
    splits = learnable_splits(seed=0)
    save_prepared(root / "data" / "prepared", splits)
    model_dir = train_tiny(MODEL, splits, root / "data" / "models" / MODEL)
    model, meta = artifacts.read_model(model_dir), artifacts.read_meta(model_dir)
    ev = evaluate_model(model, meta, splits["test"], gate=0.5, batch_size=1000)
    assert ev.metrics["blessed"] and ev.metrics["accuracy"] < 1.0
    artifacts.write_evaluation(root / "data" / "evaluate" / MODEL, ev.metrics, splits["test"].y, ev.predictions, ev.per_class)
    return {"root": root, "test": splits["test"], "model": model, "ev": ev}


@pytest.fixture(scope="module")
def servable(project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("servable") / "1"
    export.save_servable(project["model"], folder)
    return folder


@pytest.fixture(scope="module")
def loaded(servable):
    import tensorflow as tf

    return tf.saved_model.load(str(servable))


def paths(project):
    """The prepared-data folder and the evaluate folder (holding predictions.csv)."""
    root = project["root"]
    return root / "data" / "prepared", root / "data" / "evaluate" / MODEL


# --- the fresh-process check ---------------------------------------------------------------


def test_verify_in_fresh_process_agrees_with_evaluate(servable, project):
    data, evaluation = paths(project)
    check = export.verify_in_fresh_process(servable, data, evaluation, repeats=2)
    assert check["test_images"] == len(project["test"].y) == 200
    assert check["accuracy"] == pytest.approx(project["ev"].metrics["accuracy"], abs=1e-6)
    assert check["latency_ms_batch_1"] > 0 and check["latency_ms_batch_256"] > 0


def test_verify_in_fresh_process_refuses_predictions_that_differ(servable, project, tmp_path):
    data, evaluation = paths(project)
    rows = (evaluation / artifacts.PREDICTIONS_FILE).read_text().splitlines()
    for i in (1, 50, 120):  # flip three predicted labels
        actual, predicted = rows[i].split(",")
        rows[i] = f"{actual},{(int(predicted) + 1) % 10}"
    wrong = tmp_path / "evaluate"
    wrong.mkdir()
    (wrong / artifacts.PREDICTIONS_FILE).write_text("\n".join(rows) + "\n")
    with pytest.raises(ExportError, match="3 of 200 test predictions differ from evaluate's") as info:
        export.verify_in_fresh_process(servable, data, wrong, repeats=1)
    assert str(servable) in str(info.value)


# --- the SavedModel from outside: a fresh process, saved_model_cli ----------------------------

FRESH_LOAD = """
    import json, sys
    import numpy as np
    import tensorflow as tf

    folder, images = sys.argv[1], np.load(sys.argv[2])
    fn = tf.saved_model.load(folder).signatures["serving_default"]
    out = fn(images=tf.constant(images))
    result = {
        "keys": sorted(out),
        "probabilities": out["probabilities"].numpy().tolist(),
        "probabilities_dtype": out["probabilities"].dtype.name,
        "class": out["class"].numpy().tolist(),
        "class_dtype": out["class"].dtype.name,
        "refused": {},
        "pipeline_imported": "pipeline" in sys.modules,
    }
    for name, bad in (("float32", images.astype(np.float32)), ("27x28", images[:, :27, :])):
        try:
            fn(images=tf.constant(bad))
            result["refused"][name] = None
        except Exception as exc:
            result["refused"][name] = type(exc).__name__
    print(json.dumps(result))
"""


def test_saved_model_serves_raw_uint8_images_in_a_fresh_process(servable, project, tmp_path):
    images = project["test"].x[:32]
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [str(PYTHON), "-c", textwrap.dedent(FRESH_LOAD), str(servable), str(tmp_path / "images.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert not r["pipeline_imported"]  # the SavedModel alone, no project code
    assert r["keys"] == ["class", "probabilities"]
    probabilities = np.array(r["probabilities"])
    assert probabilities.shape == (32, 10) and r["probabilities_dtype"] == "float32"
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert r["class_dtype"] == "int64"
    np.testing.assert_array_equal(r["class"], probabilities.argmax(axis=1))
    np.testing.assert_array_equal(r["class"], project["ev"].predictions[:32])  # evaluate's predictions
    for name, error in r["refused"].items():
        assert error in ("TypeError", "ValueError", "InvalidArgumentError"), f"{name} input: {error}"


def test_predict_checks_dtype_and_shape_with_a_clear_message(loaded, project):
    x = project["test"].x[:5]
    out = export.predict(loaded, x)
    np.testing.assert_array_equal(out["class"], project["ev"].predictions[:5])
    assert out["probabilities"].shape == (5, 10)
    single = export.predict(loaded, x[0])  # one [28, 28] image is a batch of one
    assert single["class"].tolist() == [project["ev"].predictions[0]]

    with pytest.raises(ExportError, match=r"raw uint8 pixels \(0\.\.255\), not float32"):
        export.predict(loaded, x.astype(np.float32))
    with pytest.raises(ExportError, match=r"shape \[batch, 28, 28\], not \[5, 27, 28\]"):
        export.predict(loaded, x[:, :27, :])
    with pytest.raises(ExportError, match=r"not \[5, 28, 28, 1\]"):
        export.check_images(x[..., None])
    with pytest.raises(ExportError, match="not int64"):
        export.check_images(x.astype(np.int64))
    assert export.check_images(x[0]).shape == (1, 28, 28)


def test_raw_signature_refuses_wrong_dtype_and_shape(loaded, project):
    import tensorflow as tf

    fn = loaded.signatures[export.SIGNATURE]
    x = project["test"].x[:3]
    for bad in (x.astype(np.float32), x[:, :27, :]):
        with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
            fn(images=tf.constant(bad))


def test_saved_model_cli_shows_a_uint8_batch_of_28x28_input(servable):
    done = subprocess.run(
        [str(VENV_BIN / "saved_model_cli"), "show", "--dir", str(servable), "--all"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "signature_def['serving_default']" in out
    inputs = out.split("signature_def['serving_default']")[1].split("The given SavedModel SignatureDef contains the following output(s):")[0]
    assert "inputs['images']" in inputs and "dtype: DT_UINT8" in inputs and "shape: (-1, 28, 28)" in inputs
    assert "outputs['class']" in out and "DT_INT64" in out
    assert "outputs['probabilities']" in out and "shape: (-1, 10)" in out


def test_describe_signature_names_inputs_and_outputs(servable):
    text = export.describe_signature(servable)
    assert "serving_default" in text
    assert "'images': 'uint8 (None, 28, 28)'" in text
    assert "'probabilities': 'float32 (None, 10)'" in text and "'class': 'int64 (None,)'" in text


def test_next_version_is_above_every_existing_one(tmp_path):
    assert export.next_version(tmp_path) >= int(time.time()) - 1
    future = int(time.time()) + 10_000
    (tmp_path / str(future)).mkdir()
    (tmp_path / ".tmp-99999999999").mkdir()  # a leftover is no version
    assert export.next_version(tmp_path) == future + 1


# --- the decisions of the export stage, as plain functions ---------------------------------------


def test_refusal_explains_a_model_under_its_gate():
    reason = export.refusal(MODEL, {"model": MODEL, "accuracy": 0.8123, "gate": 0.92, "blessed": False})
    assert reason is not None
    for needle in (MODEL, "0.8123", "0.9200", f"gates.{MODEL}"):
        assert needle in reason, needle


def test_refusal_lets_a_blessed_model_through():
    assert export.refusal(MODEL, {"model": MODEL, "accuracy": 0.95, "gate": 0.92, "blessed": True}) is None
    # the evaluate stage's verdict decides, even at exactly the gate
    assert export.refusal(MODEL, {"model": MODEL, "accuracy": 0.92, "gate": 0.92, "blessed": True}) is None


def test_refused_record_says_why_and_names_no_version():
    metrics = {"model": MODEL, "accuracy": 0.8123, "gate": 0.92, "blessed": False, "loss": 0.5}
    record = export.refused_record(MODEL, metrics, "the reason")
    assert record == {"model": MODEL, "blessed": False, "reason": "the reason", "accuracy": 0.8123, "gate": 0.92}


def test_published_record_holds_version_path_size_and_check(tmp_path):
    folder = tmp_path / "17"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"x" * 100)
    (folder / "variables" / "variables.index").write_bytes(b"y" * 23)
    check = {"test_images": 200, "accuracy": 0.9, "latency_ms_batch_1": 1.5, "latency_ms_batch_256": 9.0}
    record = export.published_record(MODEL, 17, folder, check)
    assert record == {"model": MODEL, "blessed": True, "version": 17, "path": str(folder), "bytes": 123, **check}


def test_staging_folder_is_no_version_and_publish_renames_it(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    staging = export.staging_folder(out, 42)
    assert staging.parent == out and not staging.name.isdigit()
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"model")
    assert artifacts.versions(out) == []  # written but not published: no reader sees a version
    final = export.publish(staging, out, 42)
    assert final == out / "42" and (final / "saved_model.pb").read_bytes() == b"model"
    assert not staging.exists()
    assert artifacts.versions(out) == [42]


def test_prepare_creates_the_folder_removes_leftovers_and_clears_tensorboard(tmp_path):
    out, tb = tmp_path / "export" / MODEL, tmp_path / "tb"
    export.prepare(out, tb)
    assert out.is_dir() and list(out.iterdir()) == []
    (out / ".tmp-1700000000").mkdir()  # an interrupted export
    (out / "1700000001").mkdir()  # a published version stays
    (out / artifacts.EXPORT_RECORD).write_text("{}")
    tb.mkdir()
    (tb / "old.tfevents").write_text("an earlier run")
    export.prepare(out, tb)
    assert sorted(p.name for p in out.iterdir()) == sorted(["1700000001", artifacts.EXPORT_RECORD])
    assert not tb.exists()


# --- the export flow: the gate, and an interrupted export --------------------------------------


def test_unblessed_model_is_recorded_and_not_exported(tmp_path):
    export_flow = load_stage("export").export_flow
    evaluation, out, tb = tmp_path / "evaluate", tmp_path / "export" / MODEL, tmp_path / "tb"
    evaluation.mkdir()
    metrics = {"model": MODEL, "accuracy": 0.8123, "gate": 0.92, "blessed": False}
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    (out / ".tmp-1700000000").mkdir(parents=True)  # an earlier interrupted export
    with prefect_settings():
        export_flow(
            params=load_test_params(), model=MODEL, model_dir=tmp_path / "no-model", evaluation=evaluation,
            data=tmp_path / "no-data", out=out, tensorboard=tb,
        )
    record = artifacts.read_export_record(out)
    assert record["model"] == MODEL and record["blessed"] is False
    assert record["accuracy"] == 0.8123 and record["gate"] == 0.92
    for needle in (MODEL, "0.8123", "0.9200"):
        assert needle in record["reason"], needle
    assert sorted(p.name for p in out.iterdir()) == [artifacts.EXPORT_RECORD]  # no version, no leftover


def test_sigkilled_export_publishes_no_version_and_the_next_run_recovers(project):
    export_flow = load_stage("export").export_flow
    root = project["root"]
    out = root / "data" / "export" / MODEL
    cmd = [
        str(PYTHON), str(REPO / "stages" / "export.py"), MODEL, "--model-dir", f"data/models/{MODEL}",
        "--evaluation", f"data/evaluate/{MODEL}", "--data", "data/prepared", "--out", f"data/export/{MODEL}",
        "--tensorboard", f"data/tensorboard/export/{MODEL}",
    ]
    log = root / "export-stage.log"
    with prefect_settings() as api_url, open(log, "w") as log_file:  # a file, not a pipe: a full pipe stalls
        proc = subprocess.Popen(
            cmd, cwd=root, env=stage_env(root, api_url), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes the fresh-process check too
        )
        staging = None
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                written = [p for p in out.glob(".tmp-*") if (p / "saved_model.pb").is_file()]
                if written:  # the SavedModel is written; the fresh-process check is starting
                    staging = written[0]
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"the stage ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert staging is not None, "no staging folder appeared in time"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert staging.is_dir()  # killed midway indeed
        assert not [p for p in out.iterdir() if p.name.isdigit()], "a version folder was published"
        assert not (out / artifacts.EXPORT_RECORD).exists()

        # The next run removes the leftover and publishes one complete, verified version.
        params = load_test_params()
        params = params.model_copy(update={"export": params.export.model_copy(update={"latency_repeats": 2})})
        export_flow(
            params=params, model=MODEL, model_dir=root / "data" / "models" / MODEL,
            evaluation=root / "data" / "evaluate" / MODEL, data=root / "data" / "prepared", out=out,
            tensorboard=root / "data" / "tensorboard" / "export" / MODEL,
        )
    assert not staging.exists()
    versions = [p for p in out.iterdir() if p.name.isdigit()]
    assert len(versions) == 1 and (versions[0] / "saved_model.pb").is_file() and (versions[0] / "variables").is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted([artifacts.EXPORT_RECORD, versions[0].name])
    record = artifacts.read_export_record(out)
    assert record["blessed"] is True and record["version"] == int(versions[0].name)
    assert record["test_images"] == 200 and record["bytes"] == export.folder_bytes(versions[0])
    assert record["accuracy"] == pytest.approx(project["ev"].metrics["accuracy"], abs=1e-6)
