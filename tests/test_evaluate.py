"""pipeline.evaluate: scores, the quality gate, the DVC metrics/plots files and the TensorBoard views.

The models are tiny (a logreg trained 3 epochs, a 2-block CNN trained 1 epoch) on a few
hundred synthetic images; every number checked is recomputed here from first principles.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from helpers import learnable_splits, load_stage, load_test_params, prefect_settings, tiny_live, train_tiny
from pipeline import artifacts
from pipeline.artifacts import read_predictions, save_prepared
from pipeline.errors import DataError
from pipeline.evaluate import pictures
from pipeline.evaluate.scores import confusion_matrix, evaluate_model, passes_gate, per_class_scores
from pipeline.evaluate.tensorboard import pr_curve_counts, write_summaries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# metrics.json holds quality figures only (the same for the same model and data); timings.json the rest.
METRIC_KEYS = {"accuracy", "loss", "gate", "blessed"}
TIMING_KEYS = {"eval_seconds", "eval_images_per_s"}


# --- scores on hand-made predictions ---------------------------------------------------

# 7 images of digits 0, 1, 2 (no other digit occurs). Digit 2 is never predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.uint8)
Y_PRED = np.array([0, 0, 1, 1, 0, 0, 1])


def test_confusion_matrix_counts_true_predicted_pairs():
    c = confusion_matrix(Y_TRUE, Y_PRED)
    assert c.shape == (10, 10)
    expected = np.zeros((10, 10), dtype=int)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1], expected[1, 0] = 1, 1
    expected[2, 0], expected[2, 1] = 1, 1
    np.testing.assert_array_equal(c, expected)
    assert c.sum() == len(Y_TRUE)


def test_per_class_scores_on_known_predictions():
    s = per_class_scores(confusion_matrix(Y_TRUE, Y_PRED))
    # digit 0: tp 2 of 4 predicted, 2 of 3 actual; digit 1: tp 1 of 3 predicted, 1 of 2 actual
    np.testing.assert_allclose(s["precision"][:3], [2 / 4, 1 / 3, 0.0])
    np.testing.assert_allclose(s["recall"][:3], [2 / 3, 1 / 2, 0.0])
    np.testing.assert_allclose(s["f1"][:3], [4 / 7, 0.4, 0.0])
    np.testing.assert_array_equal(s["accuracy"], s["recall"])  # per-class accuracy is recall
    for key in ("precision", "recall", "f1", "accuracy"):
        assert s[key].shape == (10,)
        assert np.isfinite(s[key]).all(), key  # digit 2 (never predicted) and 3..9 (absent): 0, not NaN
        np.testing.assert_array_equal(s[key][3:], 0.0)


def test_per_class_scores_of_perfect_predictions_are_one():
    y = np.arange(30) % 10
    s = per_class_scores(confusion_matrix(y, y))
    for key in ("precision", "recall", "f1", "accuracy"):
        np.testing.assert_array_equal(s[key], 1.0)


@pytest.mark.parametrize(
    "accuracy, gate, expected",
    [(0.9, 0.5, True), (0.5, 0.5, True), (0.4999, 0.5, False), (0.0, 0.0, True), (0.99, 1.0, False), (1.0, 1.0, True)],
)
def test_passes_gate_means_at_least_the_gate(accuracy, gate, expected):
    assert passes_gate(accuracy, gate) is expected


def test_pr_curve_counts_on_a_hand_computed_example():
    scores = np.array([0.9, 0.6, 0.3, 0.1])
    positive = np.array([True, False, True, False])
    c = pr_curve_counts(scores, positive, thresholds=3)  # cuts 0, 0.5, 1
    np.testing.assert_array_equal(c["tp"], [2, 1, 0])
    np.testing.assert_array_equal(c["fp"], [2, 1, 0])
    np.testing.assert_array_equal(c["tn"], [0, 1, 2])
    np.testing.assert_array_equal(c["fn"], [0, 1, 2])
    np.testing.assert_allclose(c["recall"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(c["precision"][:2], [0.5, 0.5])
    assert np.isfinite(c["precision"]).all() and 0 <= c["precision"][2] <= 1  # nothing predicted: no NaN


def test_pr_curve_counts_always_partition_the_images():
    rng = np.random.default_rng(3)
    scores, positive = rng.random(57), rng.random(57) < 0.3
    c = pr_curve_counts(scores, positive)
    assert len(c["tp"]) == 101
    np.testing.assert_array_equal(c["tp"] + c["fp"] + c["tn"] + c["fn"], 57)
    np.testing.assert_array_equal(c["tp"] + c["fn"], positive.sum())
    assert (np.diff(c["tp"]) <= 0).all() and (np.diff(c["fp"]) <= 0).all()  # stricter cut, fewer positives


# --- a tiny trained model --------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return learnable_splits(seed=0)


@pytest.fixture(scope="module")
def logreg_dir(splits, tmp_path_factory):
    return train_tiny("logreg", splits, tmp_path_factory.mktemp("models") / "logreg")


@pytest.fixture(scope="module")
def logreg(logreg_dir):
    return artifacts.read_model(logreg_dir)


@pytest.fixture(scope="module")
def ev(logreg, splits):
    return evaluate_model(logreg, splits["test"], gate=0.5, batch_size=64)


def test_evaluate_model_scores_its_own_predictions(ev, logreg, splits):
    model = logreg
    test = splits["test"]
    m = ev.metrics
    assert set(m) == METRIC_KEYS
    assert len(test.y) == 200
    assert m["accuracy"] == pytest.approx(float((ev.predictions == test.y).mean()), abs=1e-6)
    assert 0.2 < m["accuracy"] < 1.0, "the fixture model should be useful but imperfect"
    # The predictions are the model's own argmax, the probabilities a softmax of its logits.
    logits = model.predict(test.x.astype(np.float32), verbose=0)
    np.testing.assert_array_equal(ev.predictions, logits.argmax(axis=1))
    assert ev.probabilities.shape == (200, 10)
    np.testing.assert_allclose(ev.probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(ev.probabilities.argmax(axis=1), ev.predictions)
    np.testing.assert_array_equal(ev.confusion, confusion_matrix(test.y, ev.predictions))
    assert m["loss"] > 0


def test_the_loss_is_what_model_evaluate_reports_weight_penalty_included(splits):
    """One pass over the test set: the loss comes from the predicted logits, with the L2 penalty that
    model.evaluate adds (pattern_deep and lenet have one)."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(0.05)),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    test = splits["test"]
    expected = model.evaluate(test.x.astype(np.float32), test.y.astype(np.int32), verbose=0, return_dict=True)["loss"]
    penalty = float(sum(model.losses))
    assert penalty > 0.1 * expected  # large enough that leaving it out would show
    assert evaluate_model(model, test, gate=0.5, batch_size=64).metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_model_keeps_timings_out_of_the_metrics(ev, logreg, splits):
    """The throughput goes to `timings`; the metrics of two evaluations of the same model are equal."""
    assert set(ev.timings) == TIMING_KEYS
    assert ev.timings["eval_seconds"] > 0
    per_s, seconds = ev.timings["eval_images_per_s"], ev.timings["eval_seconds"]
    assert abs(per_s * seconds - 200) <= per_s * 0.0005 + 1  # 200 images; seconds rounded to 3 decimals
    assert not TIMING_KEYS & set(ev.metrics)
    again = evaluate_model(logreg, splits["test"], gate=0.5, batch_size=64)
    assert again.metrics == ev.metrics


def test_gate_blesses_exactly_the_models_at_or_above_it(ev, logreg, splits):
    accuracy = ev.metrics["accuracy"]
    results = {gate: evaluate_model(logreg, splits["test"], gate=gate, batch_size=1000).metrics for gate in (0.0, accuracy, 1.0)}
    assert results[0.0]["blessed"] is True
    assert results[accuracy]["blessed"] is True  # "at least the gate"
    assert results[1.0]["blessed"] is False  # the model is imperfect
    assert all(r["gate"] == g for g, r in results.items())
    assert {r["accuracy"] for r in results.values()} == {accuracy}  # the batch size changes no result


def test_write_evaluation_writes_metrics_timings_predictions_and_per_class(ev, splits, tmp_path):
    test = splits["test"]
    artifacts.write_evaluation(tmp_path, "logreg", ev.metrics, ev.timings, test.y, ev.predictions, ev.per_class)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"logreg": ev.metrics}  # DVC shows logreg.accuracy, ...
    assert artifacts.read_metrics(tmp_path) == ev.metrics
    assert json.loads((tmp_path / artifacts.TIMINGS_FILE).read_text()) == ev.timings
    assert artifacts.read_timings(tmp_path, "evaluate") == ev.timings

    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["actual", "predicted"]
    assert len(rows) == 1 + len(test.y)
    assert [(int(a), int(p)) for a, p in rows[1:]] == list(zip(test.y.tolist(), ev.predictions.tolist()))
    np.testing.assert_array_equal(read_predictions(tmp_path), ev.predictions)

    with open(tmp_path / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [r["digit"] for r in per_class] == [str(d) for d in range(10)]
    for key in ("precision", "recall", "f1", "accuracy"):
        np.testing.assert_allclose([float(r[key]) for r in per_class], ev.per_class[key], atol=1e-6)
    read_back = artifacts.read_per_class(tmp_path)
    np.testing.assert_array_equal(read_back["digit"], np.arange(10))
    for key in ("precision", "recall", "f1", "accuracy"):
        np.testing.assert_allclose(read_back[key], ev.per_class[key], atol=1e-6)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("content", [{"logreg": {"accuracy": 0.9}, "mlp": {"accuracy": 0.8}}, {}, [0.9]])
def test_read_metrics_wants_one_model_under_its_name(tmp_path, content):
    (tmp_path / artifacts.METRICS_FILE).write_text(json.dumps(content))
    with pytest.raises(DataError, match="one model's metrics under its name") as info:
        artifacts.read_metrics(tmp_path)
    assert str(tmp_path / artifacts.METRICS_FILE) in str(info.value)


def test_read_timings_of_a_missing_or_broken_file_names_it_and_its_stage(tmp_path):
    with pytest.raises(DataError, match="run the evaluate stage first") as info:
        artifacts.read_timings(tmp_path, "evaluate")
    assert str(tmp_path / artifacts.TIMINGS_FILE) in str(info.value)
    (tmp_path / artifacts.TIMINGS_FILE).write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        artifacts.read_timings(tmp_path, "evaluate")


def test_read_predictions_of_a_single_image(tmp_path):
    (tmp_path / "predictions.csv").write_text("actual,predicted\n3,7\n")
    np.testing.assert_array_equal(read_predictions(tmp_path), [7])


def test_write_report_pictures_draws_confusion_and_curves(ev, splits, logreg_dir, tmp_path):
    drawn = pictures.write_report_pictures(ev, splits["test"], tiny_live(logreg_dir), "logreg", tmp_path, grid=20)
    assert (tmp_path / "confusion.png").read_bytes() == drawn.confusion
    assert (tmp_path / "curves.png").read_bytes() == drawn.curves
    for png in (drawn.confusion, drawn.curves, drawn.misclassified):
        assert png[:8] == PNG_MAGIC


def test_the_misclassified_picture_shows_the_first_mistakes_in_rows_of_ten(ev, splits):
    wrong = np.flatnonzero(ev.predictions != splits["test"].y)
    assert len(wrong) > 10
    fig = pictures.misclassified_figure(splits["test"], ev, count=12)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == [f"true {splits['test'].y[i]} / pred {ev.predictions[i]}" for i in wrong[:12]]
    canvas = fig.axes[0].images[0].get_array()
    assert canvas.shape[0] == 2 * (10 + 28 + 8)  # two rows: a label, a digit, a gap
    first = splits["test"].x[wrong[0]]
    assert np.array_equal(canvas[10 : 10 + 28, 4 : 4 + 28], first)


def test_read_history_gives_every_epoch_of_dvclives_files_and_names_a_missing_folder(logreg_dir, tmp_path):
    history = artifacts.read_history(tiny_live(logreg_dir))
    assert history["epoch"].tolist() == [1.0, 2.0, 3.0]  # TINY["logreg"]: 3 epochs
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.dtype.names)
    assert np.all((history["val_accuracy"] > 0) & (history["val_accuracy"] <= 1))
    with pytest.raises(DataError, match=r"no per-epoch metrics in .*plots/metrics: run the model's train stage"):
        artifacts.read_history(tmp_path / "no-live")


# --- TensorBoard -----------------------------------------------------------------------


def load_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    return acc


def plugin(acc, tag) -> str:
    return acc.SummaryMetadata(tag).plugin_data.plugin_name


def tensor(acc, tag) -> np.ndarray:
    from tensorboard.util import tensor_util

    events = acc.Tensors(tag)
    assert len(events) == 1, tag
    return tensor_util.make_ndarray(events[0].tensor_proto)


def image_pngs(acc, tag) -> list[bytes]:
    assert plugin(acc, tag) == "images", tag
    value = tensor(acc, tag)  # [width, height, png, ...]
    pngs = list(value[2:])
    assert pngs and all(p[:8] == PNG_MAGIC for p in pngs), tag
    return pngs


EMBEDDING_SAMPLE = 50


@pytest.fixture(scope="module")
def logreg_summaries(logreg, ev, splits, logreg_dir, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb") / "logreg"
    drawn = pictures.write_report_pictures(ev, splits["test"], tiny_live(logreg_dir), "logreg", logdir.parent, grid=20)
    write_summaries(logreg, ev, splits["test"], drawn, "logreg", logdir, sample=EMBEDDING_SAMPLE)
    return logdir


@pytest.fixture(scope="module")
def cnn(splits, tmp_path_factory):
    model_dir = train_tiny("cnn", splits, tmp_path_factory.mktemp("models") / "cnn")
    model = artifacts.read_model(model_dir)
    cnn_ev = evaluate_model(model, splits["test"], gate=0.5, batch_size=1000)
    logdir = tmp_path_factory.mktemp("tb") / "cnn"
    drawn = pictures.write_report_pictures(cnn_ev, splits["test"], tiny_live(model_dir), "cnn", logdir.parent, grid=20)
    write_summaries(model, cnn_ev, splits["test"], drawn, "cnn", logdir, sample=EMBEDDING_SAMPLE)
    return model, cnn_ev, logdir


def test_summaries_hold_accuracy_per_class_accuracy_and_pictures(logreg_summaries, ev):
    acc = load_events(logreg_summaries)
    tags = set(acc.Tags()["tensors"])
    assert plugin(acc, "test/accuracy") == "scalars"
    assert float(tensor(acc, "test/accuracy")) == pytest.approx(ev.metrics["accuracy"], abs=1e-6)
    assert float(tensor(acc, "test/loss")) == pytest.approx(ev.metrics["loss"], abs=1e-5)
    for d in range(10):
        tag = f"per_class_accuracy/{d}"
        assert tag in tags and plugin(acc, tag) == "scalars"
        assert float(tensor(acc, tag)) == pytest.approx(ev.per_class["accuracy"][d], abs=1e-6)
    image_pngs(acc, "confusion_matrix")
    image_pngs(acc, "misclassified")
    assert plugin(acc, "per_class") == "text"
    assert not any(t.startswith(("filters/", "feature_maps/")) for t in tags)  # logreg has no convolution


def test_summaries_hold_one_pr_curve_per_digit(logreg_summaries, ev, splits):
    acc = load_events(logreg_summaries)
    y = splits["test"].y
    tags = set(acc.Tags()["tensors"])
    for d in range(10):
        # raw_data_pb suffixes the tag with "/pr_curves" and keeps pr_curve/digit_<d> as display name
        name = f"pr_curve/digit_{d}"
        found = tags & {name, f"{name}/pr_curves"}
        assert len(found) == 1, f"no PR curve for digit {d} in {sorted(tags)}"
        tag = found.pop()
        assert plugin(acc, tag) == "pr_curves", tag
        assert acc.SummaryMetadata(tag).display_name in ("", name)
        data = tensor(acc, tag)  # rows: TP, FP, TN, FN, precision, recall
        assert data.shape == (6, 101)
        expected = pr_curve_counts(ev.probabilities[:, d], y == d)
        for row, key in enumerate(("tp", "fp", "tn", "fn", "precision", "recall")):
            np.testing.assert_allclose(data[row], expected[key], rtol=1e-6, err_msg=f"{tag} {key}")
        assert data[0, 0] == (y == d).sum()  # at threshold 0 every image of d is a true positive


def test_cnn_summaries_show_filters_and_feature_maps(cnn, splits):
    _, _, logdir = cnn
    acc = load_events(logdir)
    tags = set(acc.Tags()["tensors"])
    assert "filters/conv1" in tags
    image_pngs(acc, "filters/conv1")
    maps = sorted(t for t in tags if t.startswith("feature_maps/conv1/"))
    y = splits["test"].y
    assert maps == sorted(f"feature_maps/conv1/test_image_{i}_digit_{y[i]}" for i in range(4))
    for tag in maps:
        image_pngs(acc, tag)
    assert "test/accuracy" in tags and any(t.startswith("pr_curve/digit_9") for t in tags)


def read_projector_config(logdir):
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    return text_format.Parse((logdir / "projector_config.pbtxt").read_text(), projector_config_pb2.ProjectorConfig())


@pytest.mark.parametrize("which", ["logreg", "cnn"])
def test_projector_files_are_consistent(which, logreg_summaries, cnn, logreg, splits):
    import tensorflow as tf

    logdir, width = (logreg_summaries, 10) if which == "logreg" else (cnn[2], 16)  # logits; cnn's dense layer
    config = read_projector_config(logdir)
    assert len(config.embeddings) == 1
    emb = config.embeddings[0]
    assert (emb.tensor_path, emb.metadata_path, emb.sprite.image_path) == ("embedding.tsv", "labels.tsv", "sprite.png")
    assert list(emb.sprite.single_image_dim) == [28, 28]

    vectors = np.loadtxt(logdir / emb.tensor_path, delimiter="\t", ndmin=2)
    labels = (logdir / emb.metadata_path).read_text().splitlines()
    assert vectors.shape == (EMBEDDING_SAMPLE, width)
    assert len(labels) == EMBEDDING_SAMPLE
    assert labels == [str(v) for v in splits["test"].y[:EMBEDDING_SAMPLE]]

    sprite = tf.io.decode_png((logdir / emb.sprite.image_path).read_bytes()).numpy()[:, :, 0]
    side = int(np.ceil(np.sqrt(EMBEDDING_SAMPLE)))
    assert sprite.shape == (side * 28, side * 28)
    x = splits["test"].x
    np.testing.assert_array_equal(sprite[:28, :28], 255 - x[0])  # cell i = image i, inverted
    np.testing.assert_array_equal(sprite[:28, 28:56], 255 - x[1])
    np.testing.assert_array_equal(sprite[28:56, :28], 255 - x[side])

    if which == "logreg":  # the embedding of a logreg is its logits
        logits = logreg.predict(x[:EMBEDDING_SAMPLE].astype(np.float32), verbose=0)
        np.testing.assert_allclose(vectors, logits, rtol=1e-3, atol=1e-3)


# --- the flow, as the DVC stage runs it --------------------------------------------------


@pytest.mark.services
def test_evaluate_flow_writes_every_declared_output(splits, logreg_dir, tmp_path):
    evaluate_flow = load_stage("evaluate").evaluate_flow
    data = tmp_path / "prepared"
    save_prepared(data, splits)
    out, tb = tmp_path / "evaluate" / "logreg", tmp_path / "tensorboard" / "evaluate" / "logreg"
    tb.mkdir(parents=True)
    (tb / "stale.tfevents").write_text("an earlier run")  # a re-run replaces the TensorBoard run
    params = load_test_params()
    with prefect_settings():
        evaluate_flow(
            params=params, model="logreg", model_dir=logreg_dir, live=tiny_live(logreg_dir), data=data, out=out, tensorboard=tb
        )
    for name in ("metrics.json", "timings.json", "predictions.csv", "per_class.csv"):
        assert (out / name).is_file(), name
    for name in ("confusion.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert list(json.loads((out / "metrics.json").read_text())) == ["logreg"]
    metrics = artifacts.read_metrics(out)
    assert set(metrics) == METRIC_KEYS
    assert set(artifacts.read_timings(out, "evaluate")) == TIMING_KEYS
    assert metrics["gate"] == params.gates["logreg"]
    assert metrics["blessed"] == (metrics["accuracy"] >= params.gates["logreg"])
    assert not (tb / "stale.tfevents").exists()
    assert (tb / "projector_config.pbtxt").is_file()
    assert "test/accuracy" in load_events(tb).Tags()["tensors"]
