"""pipeline.export, the export stage and pipeline.serving (the publish stage).

A tiny logreg trained on synthetic images is exported; every claim of pipeline/export.py's
docstring is checked from outside: a fresh process, saved_model_cli, a SIGKILLed stage, the
same bytes from two fresh processes. Publishing is checked on small folders standing in for
SavedModels: new versions only for a changed SavedModel, pruning, no partial version seen.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

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
from pipeline import artifacts, export, serving
from pipeline.artifacts import save_prepared
from pipeline.data import disk_bytes
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
    model = artifacts.read_model(model_dir)
    ev = evaluate_model(model, splits["test"], gate=0.5, batch_size=1000)
    assert ev.metrics["blessed"] and ev.metrics["accuracy"] < 1.0
    artifacts.write_evaluation(
        root / "data" / "evaluate" / MODEL, MODEL, ev.metrics, ev.timings, splits["test"].y, ev.predictions, ev.per_class
    )
    return {"root": root, "test": splits["test"], "model": model, "ev": ev, "model_dir": model_dir}


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
    assert "'images': 'uint8 (None, 28, 28)'" in check["signature"]  # as that process loaded it


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
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
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
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "signature_def['serving_default']" in out
    inputs = out.split("signature_def['serving_default']")[1].split(
        "The given SavedModel SignatureDef contains the following output(s):"
    )[0]
    assert "inputs['images']" in inputs and "dtype: DT_UINT8" in inputs and "shape: (-1, 28, 28)" in inputs
    assert "outputs['class']" in out and "DT_INT64" in out
    assert "outputs['probabilities']" in out and "shape: (-1, 10)" in out


def test_describe_signature_names_inputs_and_outputs(servable):
    text = export.describe_signature(tf.saved_model.load(str(servable)))
    assert "serving_default" in text
    assert "'images': 'uint8 (None, 28, 28)'" in text
    assert "'probabilities': 'float32 (None, 10)'" in text and "'class': 'int64 (None,)'" in text


# --- the same weights, the same bytes ---------------------------------------------------------


def test_save_keras_gives_the_same_bytes_for_the_same_model(project, tmp_path):
    """No save date, zip entry times or memory addresses: two saves are byte-identical and load back."""
    a, b = tmp_path / "a" / artifacts.MODEL_FILE, tmp_path / "b" / artifacts.MODEL_FILE
    a.parent.mkdir()
    b.parent.mkdir()
    artifacts.save_keras(project["model"], a)
    artifacts.save_keras(project["model"], b)
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as archive:
        assert archive.testzip() is None
        assert {info.date_time for info in archive.infolist()} == {artifacts.FIXED_ZIP_TIME}
        metadata = json.loads(archive.read("metadata.json"))
        shared = shared_object_ids(json.loads(archive.read("config.json")))
    assert "date_saved" not in metadata and metadata["keras_version"]
    assert not [cls for cls, _ in shared if cls == "DTypePolicy"]  # Keras writes a memory address there
    assert not list(a.parent.glob(".tmp-*"))
    reloaded = artifacts.read_model(a.parent)
    for got, want in zip(reloaded.get_weights(), project["model"].get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def shared_object_ids(node) -> list[tuple[str, int]]:
    """(class_name, shared_object_id) of every node of a Keras config.json that has one."""
    found = []
    if isinstance(node, dict):
        if "shared_object_id" in node:
            found.append((node.get("class_name"), node["shared_object_id"]))
        for value in node.values():
            found += shared_object_ids(value)
    elif isinstance(node, list):
        for item in node:
            found += shared_object_ids(item)
    return found


def test_train_stage_model_file_is_what_save_keras_writes(project, tmp_path):
    """model.keras as the train stage saved the trained model equals a save of that model reloaded
    (other Python objects, other memory addresses)."""
    again = tmp_path / artifacts.MODEL_FILE
    artifacts.save_keras(artifacts.read_model(project["model_dir"]), again)
    assert again.read_bytes() == (project["model_dir"] / artifacts.MODEL_FILE).read_bytes()


SAVE_SERVABLE = """
    import sys
    from pathlib import Path

    import pipeline.models.registry  # registers the custom layers
    from pipeline import artifacts, export

    export.save_servable(artifacts.read_model(Path(sys.argv[1])), Path(sys.argv[2]))
"""


def test_saved_model_bytes_are_the_same_from_two_fresh_processes(project, tmp_path):
    folders = [tmp_path / "first", tmp_path / "second"]
    procs = [
        subprocess.Popen(
            [str(PYTHON), "-c", textwrap.dedent(SAVE_SERVABLE), str(project["model_dir"]), str(folder)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    files = [sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) for folder in folders]
    assert files[0] == files[1] and "saved_model.pb" in files[0] and "fingerprint.pb" in files[0]
    for name in files[0]:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    assert artifacts.tree_digest(folders[0]) == artifacts.tree_digest(folders[1])


def test_content_uuid_replaces_the_random_uuid_by_one_from_the_content(servable, tmp_path):
    from tensorflow.core.protobuf import fingerprint_pb2

    def uuid(folder: Path) -> str:
        return fingerprint_pb2.FingerprintDef.FromString((folder / "fingerprint.pb").read_bytes()).uuid

    copy = tmp_path / "copy"
    shutil.copytree(servable, copy)
    fingerprint = fingerprint_pb2.FingerprintDef.FromString((copy / "fingerprint.pb").read_bytes())
    fingerprint.uuid = "a random uuid, as TensorFlow writes one"
    (copy / "fingerprint.pb").write_bytes(fingerprint.SerializeToString())
    assert artifacts.tree_digest(copy) != artifacts.tree_digest(servable)
    export.content_uuid(copy)
    assert uuid(copy) == uuid(servable) and uuid(copy).isdigit()
    assert artifacts.tree_digest(copy) == artifacts.tree_digest(servable)
    fingerprint.saved_model_checksum += 1  # other content, another uuid
    fingerprint.uuid = ""
    (copy / "fingerprint.pb").write_bytes(fingerprint.SerializeToString())
    export.content_uuid(copy)
    assert uuid(copy) != uuid(servable)


def fake_saved_model(folder: Path, content: bytes = b"graph") -> Path:
    """A folder shaped like a SavedModel, small enough to copy in no time."""
    (folder / "variables").mkdir(parents=True)
    (folder / "assets").mkdir()
    (folder / "saved_model.pb").write_bytes(content)
    (folder / "fingerprint.pb").write_bytes(b"fingerprint of " + content)
    (folder / "variables" / "variables.index").write_bytes(b"index")
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights of " + content)
    return folder


def test_tree_digest_depends_on_names_and_contents_only(tmp_path):
    a = fake_saved_model(tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "b")
    os.utime(b / "saved_model.pb", (0, 0))  # times are not content
    assert artifacts.tree_digest(a) == artifacts.tree_digest(b)
    assert len(artifacts.tree_digest(a)) == 64
    (b / "saved_model.pb").write_bytes(b"grapH")
    assert artifacts.tree_digest(a) != artifacts.tree_digest(b)
    c = shutil.copytree(a, tmp_path / "c")
    (c / "variables" / "variables.index").rename(c / "variables.index")  # the same bytes, another path
    assert artifacts.tree_digest(a) != artifacts.tree_digest(c)
    d = shutil.copytree(a, tmp_path / "d")  # one file's bytes moved into the next file
    (d / "variables" / "variables.data-00000-of-00001").write_bytes(b"")
    (d / "variables" / "variables.index").write_bytes(b"indexweights of graph")
    assert artifacts.tree_digest(a) != artifacts.tree_digest(d)


# --- the decisions of the export stage, as plain functions ---------------------------------------


def test_refusal_explains_a_model_under_its_gate():
    reason = export.refusal(MODEL, {"accuracy": 0.8123, "gate": 0.92, "blessed": False})
    assert reason is not None
    for needle in (MODEL, "0.8123", "0.9200", f"gates.{MODEL}"):
        assert needle in reason, needle


def test_refusal_lets_a_blessed_model_through():
    assert export.refusal(MODEL, {"accuracy": 0.95, "gate": 0.92, "blessed": True}) is None
    # the evaluate stage's verdict decides, even at exactly the gate
    assert export.refusal(MODEL, {"accuracy": 0.92, "gate": 0.92, "blessed": True}) is None


def test_refused_record_says_why_and_names_no_saved_model():
    metrics = {"accuracy": 0.8123, "gate": 0.92, "blessed": False, "loss": 0.5}
    record = export.refused_record(MODEL, metrics, "the reason")
    assert record == {"model": MODEL, "blessed": False, "reason": "the reason", "accuracy": 0.8123, "gate": 0.92}


CHECK = {"test_images": 200, "accuracy": 0.9, "latency_ms_batch_1": 1.5, "latency_ms_batch_256": 9.0}


def test_exported_record_holds_name_size_digest_and_check(tmp_path):
    folder = tmp_path / artifacts.SAVED_MODEL
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"x" * 100)
    (folder / "variables" / "variables.index").write_bytes(b"y" * 23)
    record = export.exported_record(MODEL, folder, CHECK)
    assert record == {
        "model": MODEL,
        "blessed": True,
        "saved_model": artifacts.SAVED_MODEL,
        "bytes": 123,
        "sha256": artifacts.tree_digest(folder),
        "test_images": 200,
        "accuracy": 0.9,
    }
    (folder / "saved_model.pb").write_bytes(b"z" * 100)  # the same size, other bytes
    changed = export.exported_record(MODEL, folder, CHECK)
    assert changed["bytes"] == 123 and changed["sha256"] != record["sha256"]


def test_latency_timings_are_the_latency_figures_only():
    assert export.latency_timings(CHECK) == {"latency_ms_batch_1": 1.5, "latency_ms_batch_256": 9.0}


def test_staging_folder_is_a_leftover_until_the_staged_block_ends(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    staging = export.staging_folder(out)
    assert staging.parent == out and staging.name.startswith(".tmp-")  # what prepare deletes
    assert staging.name != artifacts.SAVED_MODEL and not staging.name.isdigit()
    model = SimpleNamespace(weights=[], optimizer=None)
    with export.staged(out, model) as folder:
        assert folder == staging
        staging.mkdir()
        (staging / "saved_model.pb").write_bytes(b"model")
        assert not (out / artifacts.SAVED_MODEL).exists()  # written but not final
    final = out / artifacts.SAVED_MODEL
    assert (final / "saved_model.pb").read_bytes() == b"model"
    assert not staging.exists()


def test_a_failed_staged_export_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(ExportError), export.staged(out, SimpleNamespace(weights=[], optimizer=None)) as staging:
        staging.mkdir()
        (staging / "saved_model.pb").write_bytes(b"model")
        raise ExportError("the check failed")
    assert list(out.iterdir()) == []


def test_prepare_creates_the_folder_removes_leftovers_and_clears_tensorboard(tmp_path):
    out, tb = tmp_path / "export" / MODEL, tmp_path / "tb"
    export.prepare(out, tb)
    assert out.is_dir() and list(out.iterdir()) == []
    fake_saved_model(export.staging_folder(out))  # an interrupted export
    (out / f".tmp-{artifacts.EXPORT_RECORD}-1234").write_text("{")  # an interrupted write
    tb.mkdir()
    (tb / "old.tfevents").write_text("an earlier run")
    export.prepare(out, tb)
    assert list(out.iterdir()) == []
    assert not tb.exists()


def scalar(acc, tag) -> float:
    from tensorboard.util import tensor_util

    (event,) = acc.Tensors(tag)
    return float(tensor_util.make_ndarray(event.tensor_proto))


def test_write_summaries_shows_size_and_latency_or_why_not(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = {"model": MODEL, "blessed": True, "bytes": 12345}
    export.write_summaries(tmp_path / "blessed", record, export.latency_timings(CHECK), "the signature")
    acc = EventAccumulator(str(tmp_path / "blessed"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {
        "export/signature",
        "export/size_bytes",
        "export/latency_ms_batch_1",
        "export/latency_ms_batch_256",
    }
    assert scalar(acc, "export/size_bytes") == 12345
    assert scalar(acc, "export/latency_ms_batch_1") == 1.5 and scalar(acc, "export/latency_ms_batch_256") == 9.0

    refused = export.refused_record(MODEL, {"accuracy": 0.8, "gate": 0.9}, "under its gate")
    export.write_summaries(tmp_path / "refused", refused, None, signature=None)
    acc = EventAccumulator(str(tmp_path / "refused"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"export/status"}


# --- publishing into the serving folder ------------------------------------------------------


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_publish_makes_a_new_version_only_when_the_saved_model_changed(tmp_path):
    a, b = fake_saved_model(tmp_path / "a", b"A"), fake_saved_model(tmp_path / "b", b"B")
    folder = tmp_path / "serving" / MODEL
    assert serving.publish(MODEL, a, folder, keep=5) == serving.Published(MODEL, 1, True, [])
    assert names(folder) == ["1"] and artifacts.tree_digest(folder / "1") == artifacts.tree_digest(a)
    assert serving.publish(MODEL, a, folder, keep=5) == serving.Published(MODEL, 1, False, [])
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "a")  # the content decides, not the path
    assert serving.publish(MODEL, copy, folder, keep=5) == serving.Published(MODEL, 1, False, [])
    assert names(folder) == ["1"]
    assert serving.publish(MODEL, b, folder, keep=5) == serving.Published(MODEL, 2, True, [])
    assert serving.publish(MODEL, a, folder, keep=5) == serving.Published(MODEL, 3, True, [])  # back to A: newer than B
    assert names(folder) == ["1", "2", "3"]
    for version, source in ((1, a), (2, b), (3, a)):
        assert artifacts.tree_digest(folder / str(version)) == artifacts.tree_digest(source), version
    assert (folder / "3" / "assets").is_dir()  # a copy of the whole tree, empty folders too


def test_publish_keeps_the_newest_versions(tmp_path):
    folder = tmp_path / "serving" / MODEL
    sources = [fake_saved_model(tmp_path / f"m{i}", f"model {i}".encode()) for i in range(1, 6)]
    removed = [serving.publish(MODEL, source, folder, keep=2).removed for source in sources]
    assert removed == [[], [], [1], [2], [3]]
    assert names(folder) == ["4", "5"]
    assert artifacts.tree_digest(folder / "4") == artifacts.tree_digest(sources[3])
    assert artifacts.tree_digest(folder / "5") == artifacts.tree_digest(sources[4])
    unchanged = serving.publish(MODEL, sources[4], folder, keep=1)  # a smaller keep prunes even without a new version
    assert unchanged == serving.Published(MODEL, 5, False, [4])
    assert names(folder) == ["5"]


def test_publish_numbers_after_the_newest_version_left(tmp_path):
    folder = tmp_path / "serving" / MODEL
    (folder / "7").mkdir(parents=True)
    (folder / "10").mkdir()
    (folder / "latest").mkdir()  # not a version: left alone
    done = serving.publish(MODEL, fake_saved_model(tmp_path / "a"), folder, keep=3)
    assert done == serving.Published(MODEL, 11, True, [])
    assert names(folder) == ["10", "11", "7", "latest"]


def test_a_reader_never_sees_a_partial_or_half_deleted_version(tmp_path, monkeypatch):
    """Between every file copied in and every deletion, the integer folders are complete versions."""
    folder = tmp_path / "serving" / MODEL
    sources = [fake_saved_model(tmp_path / f"m{i}", f"model {i}".encode()) for i in range(1, 4)]
    digests = {artifacts.tree_digest(s) for s in sources}
    seen: list[list[int]] = []

    def reader_view() -> None:
        held = artifacts.versions(folder)
        for version in held:
            assert artifacts.tree_digest(folder / str(version)) in digests, f"version {version} is partial"
        newest = serving.newest(folder)
        assert newest == (folder / str(held[-1]) if held else None)
        seen.append(held)

    def copy_file(src, dst):
        reader_view()
        return shutil.copy2(src, dst)

    def deleting(path):
        assert not Path(path).name.isdigit(), f"{path} is deleted under its version name"
        reader_view()
        return shutil.rmtree(path)

    copying = functools.partial(shutil.copytree, copy_function=copy_file)
    monkeypatch.setattr(serving, "shutil", SimpleNamespace(copytree=copying, rmtree=deleting))
    for source in sources:
        serving.publish(MODEL, source, folder, keep=1)
    reader_view()
    assert seen[0] == [] and seen[-1] == [3]
    assert [1] in seen and [2] in seen and len(seen) > 3 * 4  # looked before each of the 4 files of each copy
    assert names(folder) == ["3"]  # no .tmp-* left


def test_an_interrupted_publish_leaves_no_version_and_the_next_one_recovers(tmp_path, monkeypatch):
    folder = tmp_path / "serving" / MODEL
    a, b = fake_saved_model(tmp_path / "a", b"A"), fake_saved_model(tmp_path / "b", b"B")
    serving.publish(MODEL, a, folder, keep=3)
    copied = []

    def crash_after_two_files(src, dst):
        if len(copied) == 2:
            raise OSError("disk full")  # not ENOSPC: passed on as it is
        copied.append(src)
        return shutil.copy2(src, dst)

    copying = functools.partial(shutil.copytree, copy_function=crash_after_two_files)
    monkeypatch.setattr(serving, "shutil", SimpleNamespace(copytree=copying, rmtree=shutil.rmtree))
    with pytest.raises(OSError, match="disk full"):
        serving.publish(MODEL, b, folder, keep=3)
    monkeypatch.undo()
    assert artifacts.versions(folder) == [1] and serving.newest(folder) == folder / "1"
    assert names(folder) == ["1"]  # the partial copy was deleted
    fake_saved_model(folder / ".tmp-2-4321", b"half")  # what a SIGKILLed copy leaves, under a name no reader takes
    assert serving.newest(folder) == folder / "1"
    assert serving.publish(MODEL, b, folder, keep=3) == serving.Published(MODEL, 2, True, [])
    assert names(folder) == ["1", "2"]
    assert artifacts.tree_digest(folder / "2") == artifacts.tree_digest(b)


def test_newest_is_the_highest_integer_version(tmp_path):
    folder = tmp_path / MODEL
    assert serving.newest(folder) is None  # no folder
    folder.mkdir()
    assert serving.newest(folder) is None
    for name in (".tmp-12", ".tmp-old-3", "latest", "5a"):
        (folder / name).mkdir()
    (folder / "13").write_text("a file is no version")
    assert serving.newest(folder) is None
    for name in ("9", "10", "2"):
        (folder / name).mkdir()
    assert serving.newest(folder) == folder / "10"  # numerically, not as text


@pytest.mark.services
def test_publish_stage_publishes_blessed_models_once_per_change(tmp_path):
    publish_flow = load_stage("publish").publish_flow
    params = load_test_params()
    base = tmp_path / "serving"
    params = params.model_copy(update={"serving": params.serving.model_copy(update={"base": str(base), "keep": 2})})
    exports = tmp_path / "export"
    blessed = ["logreg", "cnn"]
    for model in params.gates:
        if model in blessed:
            fake_saved_model(exports / model / artifacts.SAVED_MODEL, model.encode())
            artifacts.write_export_record(exports / model, {"model": model, "blessed": True})
        else:
            artifacts.write_export_record(exports / model, {"model": model, "blessed": False, "reason": "under its gate"})
    with prefect_settings():
        publish_flow(params=params, exports=exports)
        assert names(base) == sorted(blessed)
        assert names(base / "logreg") == ["1"] and names(base / "cnn") == ["1"]
        publish_flow(params=params, exports=exports)  # nothing changed: no new version
        assert names(base / "logreg") == ["1"] and names(base / "cnn") == ["1"]
        for i in (2, 3):  # cnn changes twice; keep 2
            (exports / "cnn" / artifacts.SAVED_MODEL / "saved_model.pb").write_bytes(f"cnn {i}".encode())
            publish_flow(params=params, exports=exports)
    assert names(base / "logreg") == ["1"] and names(base / "cnn") == ["2", "3"]
    assert artifacts.tree_digest(base / "cnn" / "3") == artifacts.tree_digest(exports / "cnn" / artifacts.SAVED_MODEL)


# --- the export flow: the gate, and an interrupted export --------------------------------------


@pytest.mark.services
def test_unblessed_model_is_recorded_and_not_exported(tmp_path):
    export_flow = load_stage("export").export_flow
    evaluation, out, tb = tmp_path / "evaluate", tmp_path / "export" / MODEL, tmp_path / "tb"
    evaluation.mkdir()
    metrics = {"accuracy": 0.8123, "loss": 0.6, "macro_f1": 0.8, "gate": 0.92, "blessed": False}
    (evaluation / artifacts.METRICS_FILE).write_text(json.dumps({MODEL: metrics}))
    fake_saved_model(export.staging_folder(out))  # an earlier interrupted export
    with prefect_settings():
        export_flow(
            params=load_test_params(),
            model=MODEL,
            model_dir=tmp_path / "no-model",
            evaluation=evaluation,
            data=tmp_path / "no-data",
            out=out,
            tensorboard=tb,
        )
    record = artifacts.read_export_record(out)
    assert record["model"] == MODEL and record["blessed"] is False
    assert record["accuracy"] == 0.8123 and record["gate"] == 0.92
    for needle in (MODEL, "0.8123", "0.9200"):
        assert needle in record["reason"], needle
    assert sorted(p.name for p in out.iterdir()) == [artifacts.EXPORT_RECORD]  # no SavedModel, no leftover


@pytest.mark.services
def test_sigkilled_export_leaves_no_saved_model_and_the_next_run_recovers(project):
    export_flow = load_stage("export").export_flow
    root = project["root"]
    out = root / "data" / "export" / MODEL
    cmd = [
        str(PYTHON),
        str(REPO / "stages" / "export.py"),
        MODEL,
        "--model-dir",
        f"data/models/{MODEL}",
        "--evaluation",
        f"data/evaluate/{MODEL}",
        "--data",
        "data/prepared",
        "--out",
        f"data/export/{MODEL}",
        "--tensorboard",
        f"data/tensorboard/export/{MODEL}",
    ]
    log = root / "export-stage.log"
    with prefect_settings() as api_url, open(log, "w") as log_file:  # a file, not a pipe: a full pipe stalls
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=stage_env(root, api_url),
            stdout=log_file,
            stderr=subprocess.STDOUT,
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
        assert staging == export.staging_folder(out) and staging.is_dir()  # killed midway indeed
        assert not (out / artifacts.SAVED_MODEL).exists(), "an unverified SavedModel took its final name"
        assert not (out / artifacts.EXPORT_RECORD).exists() and not (out / artifacts.TIMINGS_FILE).exists()

        # The next run removes the leftover and writes one complete, verified SavedModel.
        params = load_test_params()
        params = params.model_copy(update={"export": params.export.model_copy(update={"latency_repeats": 2})})
        export_flow(
            params=params,
            model=MODEL,
            model_dir=root / "data" / "models" / MODEL,
            evaluation=root / "data" / "evaluate" / MODEL,
            data=root / "data" / "prepared",
            out=out,
            tensorboard=root / "data" / "tensorboard" / "export" / MODEL,
        )
    assert not staging.exists()
    saved = out / artifacts.SAVED_MODEL
    assert (saved / "saved_model.pb").is_file() and (saved / "variables").is_dir()
    assert names(out) == sorted([artifacts.EXPORT_RECORD, artifacts.SAVED_MODEL, artifacts.TIMINGS_FILE, artifacts.CARD_FILE])
    record = artifacts.read_export_record(out)
    assert record["blessed"] is True and record["saved_model"] == artifacts.SAVED_MODEL
    assert record["bytes"] == disk_bytes(saved) and record["sha256"] == artifacts.tree_digest(saved)
    assert record["test_images"] == 200
    assert record["accuracy"] == pytest.approx(project["ev"].metrics["accuracy"], abs=1e-6)
    timings = artifacts.read_timings(out, "export")
    assert set(timings) == {"latency_ms_batch_1", "latency_ms_batch_256"} and min(timings.values()) > 0


def earlier_export(out: Path) -> Path:
    """What a complete export of other weights left in `out`: its SavedModel, record and timings."""
    saved = fake_saved_model(out / artifacts.SAVED_MODEL, b"an earlier model")
    artifacts.write_export_record(out, {"model": MODEL, "blessed": True, "saved_model": artifacts.SAVED_MODEL})
    artifacts.write_timings(out, {"latency_ms_batch_1": 1.0, "latency_ms_batch_256": 2.0})
    return saved


@pytest.mark.services
@pytest.mark.parametrize("blessed", [True, False])
def test_export_run_again_in_place_leaves_only_its_own_outputs(project, tmp_path, blessed):
    """Run by hand (dvc repro deletes the outputs first), the stage replaces an earlier export in its folder."""
    export_flow = load_stage("export").export_flow
    root, out = project["root"], tmp_path / "export" / MODEL
    earlier = artifacts.tree_digest(earlier_export(out))
    evaluation = root / "data" / "evaluate" / MODEL
    if not blessed:
        evaluation = tmp_path / "evaluate"
        evaluation.mkdir()
        metrics = {"accuracy": 0.8123, "loss": 0.6, "macro_f1": 0.8, "gate": 0.92, "blessed": False}
        (evaluation / artifacts.METRICS_FILE).write_text(json.dumps({MODEL: metrics}))
    params = load_test_params()
    params = params.model_copy(update={"export": params.export.model_copy(update={"latency_repeats": 1})})
    with prefect_settings():
        export_flow(
            params=params,
            model=MODEL,
            model_dir=root / "data" / "models" / MODEL,
            evaluation=evaluation,
            data=root / "data" / "prepared",
            out=out,
            tensorboard=tmp_path / "tb",
        )
    record = artifacts.read_export_record(out)
    assert record["blessed"] is blessed
    if blessed:
        assert names(out) == sorted([artifacts.EXPORT_RECORD, artifacts.SAVED_MODEL, artifacts.TIMINGS_FILE, artifacts.CARD_FILE])
        assert record["sha256"] == artifacts.tree_digest(out / artifacts.SAVED_MODEL) != earlier
    else:
        assert names(out) == [artifacts.EXPORT_RECORD]  # no SavedModel or timings of the earlier export


def test_a_published_version_is_on_disk_before_it_is_visible(tmp_path, monkeypatch):
    """Every file and folder of the new version is flushed (fsync) before the rename that shows it, and
    the serving folder after it: a power cut leaves no visible version with empty files."""
    os_module = os
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os_module.fsync, os_module.replace

    def fsync(fd):
        log.append(("fsync", os_module.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os_module, "fsync", fsync)
    monkeypatch.setattr(os_module, "replace", replace)
    saved = fake_saved_model(tmp_path / "a", b"A")
    folder = tmp_path / "serving" / MODEL
    serving.publish(MODEL, saved, folder, keep=5)
    shown = log.index(("replace", str(folder / "1")))
    flushed_before = {Path(p).relative_to(folder).parts[1:] for what, p in log[:shown] if what == "fsync"}
    expected = {(), *(f.relative_to(saved).parts for f in saved.rglob("*"))}
    assert expected <= flushed_before, expected - flushed_before
    assert ("fsync", str(folder)) in log[shown:]


def test_publishers_of_one_folder_take_turns(tmp_path):
    """Four processes publish four SavedModels to one folder at once: four versions, each whole, nothing left over."""
    sources = [fake_saved_model(tmp_path / f"m{i}", bytes([65 + i]) * 200_000) for i in range(4)]
    folder = tmp_path / "serving" / MODEL
    go = tmp_path / "go"
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom pipeline import serving\n"
        "while not Path(sys.argv[3]).exists(): time.sleep(0.001)\n"
        "print(serving.publish('m', Path(sys.argv[1]), Path(sys.argv[2]), keep=10).version)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(s), str(folder), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in sources
    ]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert sorted(int(out) for out, _ in results) == [1, 2, 3, 4]
    assert names(folder) == ["1", "2", "3", "4"]
    digests = {artifacts.tree_digest(folder / v) for v in ("1", "2", "3", "4")}
    assert digests == {artifacts.tree_digest(s) for s in sources}
