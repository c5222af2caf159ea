"""pipeline.report on hand-written stage outputs for three models: leaderboard, report.md, HParams.

Each model has what the train stage writes (meta.json, timings.json) and what the evaluate
stage writes (metrics.json, per_class.csv, timings.json); the report merges them into one row per model.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import load_stage, load_test_params, prefect_settings
from pipeline import artifacts, report
from pipeline.errors import DataError

# Written in an order that is not the accuracy order; mlp is under its gate.
METRICS = {
    "logreg": {"accuracy": 0.9251, "gate": 0.92, "blessed": True, "loss": 0.2712},
    "mlp": {"accuracy": 0.9712, "gate": 0.98, "blessed": False, "loss": 0.0981},
    "cnn": {"accuracy": 0.9935, "gate": 0.993, "blessed": True, "loss": 0.0207},
}
META = {  # what the report takes from meta.json
    "logreg": {"parameters": 7850, "epochs": 20, "val_accuracy": 0.9302},
    "mlp": {"parameters": 497_260, "epochs": 30, "val_accuracy": 0.9733},
    "cnn": {"parameters": 1_475_306, "epochs": 8, "val_accuracy": 0.9941},
}
MACRO = {  # per_class.csv's mean precision, recall and F1 (the fixture's F1 column is its precision column)
    "logreg": {"macro_precision": 0.9243, "macro_recall": 0.9248, "macro_f1": 0.9243},
    "mlp": {"macro_precision": 0.9714, "macro_recall": 0.9709, "macro_f1": 0.9714},
    "cnn": {"macro_precision": 0.9936, "macro_recall": 0.9934, "macro_f1": 0.9936},
}
TRAIN_TIMINGS = {
    "logreg": {"train_seconds": 41.7, "epoch_seconds": [2.1] * 20, "epochs_resumed": 0},
    "mlp": {"train_seconds": 250.4, "epoch_seconds": [8.3] * 30, "epochs_resumed": 12},
    "cnn": {"train_seconds": 1312.0, "epoch_seconds": [164.0] * 8, "epochs_resumed": 0},
}
EVAL_TIMINGS = {
    "logreg": {"eval_seconds": 10.983, "eval_images_per_s": 910.7},
    "mlp": {"eval_seconds": 15.625, "eval_images_per_s": 640.0},
    "cnn": {"eval_seconds": 82.988, "eval_images_per_s": 120.5},
}
BEST_FIRST = ["cnn", "mlp", "logreg"]
# 9,876 test images: a number that appears nowhere else, so the report must take it from here
DATA_REPORT = {"splits": {"train": {"images": 55_000}, "val": {"images": 5_000}, "test": {"images": 9_876}}}


def metrics(name: str) -> dict:
    """A model's metrics as the evaluate stage writes them: quality figures only."""
    return dict(METRICS[name])


def meta_file(name: str) -> dict:
    """meta.json as the train stage writes it (the report reads parameters, epochs and val_accuracy)."""
    return {"model": name, "optimizer": "adam", **META[name], "tensorflow": "2.x"}


def per_class(name: str) -> dict[str, np.ndarray]:
    """Per-digit scores whose means are MACRO's; digit d is off the mean by (d - 4.5) / 1000."""
    spread = (np.arange(10) - 4.5) / 1000
    scores = {
        "precision": MACRO[name]["macro_precision"] + spread,
        "recall": MACRO[name]["macro_recall"] - spread,
    }
    return {**scores, "f1": scores["precision"], "accuracy": scores["recall"]}


def expected_row(name: str) -> dict:
    return {"model": name, **metrics(name), **MACRO[name], **META[name], **TRAIN_TIMINGS[name], **EVAL_TIMINGS[name]}


@pytest.fixture
def stage_outputs(tmp_path):
    """data/models/<m>/ and data/evaluate/<m>/ of the three models, as the train and evaluate stages leave them."""
    models, evaluate = tmp_path / "models", tmp_path / "evaluate"
    for name in METRICS:
        (models / name).mkdir(parents=True)
        (models / name / artifacts.META_FILE).write_text(json.dumps(meta_file(name), indent=2))
        artifacts.write_timings(models / name, TRAIN_TIMINGS[name])
        labels = np.arange(20) % 10
        artifacts.write_evaluation(evaluate / name, name, metrics(name), EVAL_TIMINGS[name], labels, labels, per_class(name))
    return models, evaluate


@pytest.fixture
def rows(stage_outputs):
    return report.read_rows(*stage_outputs, list(METRICS))


@pytest.fixture(scope="module")
def params():
    """params.yaml with only the three models of this test."""
    p = load_test_params()
    return p.model_copy(update={"models": {m: p.models[m] for m in METRICS}, "gates": {m: METRICS[m]["gate"] for m in METRICS}})


def table(markdown: str) -> tuple[list[str], list[list[str]]]:
    """The leaderboard table's header and body rows, as cells (whatever the padding)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1]), f"the second table line is the separator: {lines[1]!r}"
    header, *body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]
    return header, body


def test_read_rows_merges_metrics_per_class_meta_and_timings_best_accuracy_first(rows):
    assert [r["model"] for r in rows] == BEST_FIRST
    for row in rows:
        expected = expected_row(row["model"])
        macro = {k: row.pop(k) for k in ("macro_precision", "macro_recall", "macro_f1")}  # means of 6-decimal CSV values
        assert macro == pytest.approx({k: expected.pop(k) for k in macro}, abs=1e-9), row["model"]
        assert row == expected
    assert rows[1]["val_accuracy"] == 0.9733 and rows[1]["epochs_resumed"] == 12 and rows[1]["eval_seconds"] == 15.625


def test_read_rows_reads_only_the_models_asked_for(stage_outputs):
    assert [r["model"] for r in report.read_rows(*stage_outputs, ["logreg", "mlp"])] == ["mlp", "logreg"]


@pytest.mark.parametrize("missing, stage", [("models", "train"), ("evaluate", "evaluate")])
def test_read_rows_names_a_missing_timings_file_and_its_stage(stage_outputs, missing, stage):
    models, evaluate = stage_outputs
    gone = (models if missing == "models" else evaluate) / "mlp" / artifacts.TIMINGS_FILE
    gone.unlink()
    with pytest.raises(DataError, match=f"run the {stage} stage first") as info:
        report.read_rows(models, evaluate, list(METRICS))
    assert str(gone) in str(info.value)


def test_leaderboard_json_holds_only_the_test_accuracy(rows):
    board = report.leaderboard_json(rows)
    assert board == {"accuracy": {"cnn": 0.9935, "mlp": 0.9712, "logreg": 0.9251}}  # DVC names them accuracy.cnn, ...
    assert list(board["accuracy"]) == BEST_FIRST
    assert report.LEADERBOARD_KEYS == ("accuracy",)
    json.dumps(board)  # a valid DVC metrics file


def test_report_markdown_table_and_sections(rows, params):
    md = report.report_markdown(rows, DATA_REPORT, params.seed)
    header, body = table(md)
    assert header[:4] == ["model", "test accuracy", "gate", "gate passed"]
    assert len(body) == 3 and all(len(r) == len(header) for r in body)
    assert [r[0] for r in body] == BEST_FIRST
    by_model = {r[0]: dict(zip(header, r)) for r in body}
    assert by_model["mlp"]["gate passed"] == "**no**"
    assert by_model["cnn"]["gate passed"] == "yes" and by_model["logreg"]["gate passed"] == "yes"
    assert md.count("**no**") == 1
    assert by_model["mlp"]["test accuracy"] == "97.12%" and by_model["mlp"]["gate"] == "98.00%"
    assert by_model["cnn"]["test accuracy"] == "99.35%" and by_model["cnn"]["gate"] == "99.30%"
    assert by_model["cnn"]["parameters"] == "1,475,306"
    assert by_model["mlp"]["epochs"] == "30" and by_model["mlp"]["training s"] == "250.4"
    assert by_model["logreg"]["eval images/s"] == "911"
    assert "Test accuracy on the 9,876 MNIST test images" in md
    assert "55,000" in md and "5,000" in md and f"seed {params.seed}" in md
    for name in METRICS:
        assert f"## {name}" in md
        assert f"(evaluate/{name}/confusion.png)" in md and f"(evaluate/{name}/curves.png)" in md
    mlp_section = md.split("## mlp")[1].split("## ")[0]
    assert "NOT passed, not exported" in mlp_section
    assert "macro precision 0.9714, recall 0.9709, F1 0.9714" in mlp_section  # per_class.csv's means
    assert md.index("## cnn") < md.index("## mlp") < md.index("## logreg")


@pytest.mark.parametrize(
    "model, drop, expected",
    [
        ("logreg", {}, 0.0),  # no dropout knob at all
        ("deep_mlp", {"input_drop": 0.2, "hidden_drop": 0.5}, 0.5),
        ("deep_mlp", {"input_drop": 0.3, "hidden_drop": 0.1}, 0.3),
        ("cnn", {"conv_drop": 0.25, "dense_drop": 0.1}, 0.25),
        ("pattern_small", {"dropout": 0.35}, 0.35),
    ],
)
def test_dropout_is_the_largest_drop_rate(model, drop, expected):
    block = load_test_params().model(model).model_copy(update={"learning_rate": 0.9, **drop})
    assert report.dropout(block) == expected


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("accuracy", 0.99354, "99.35%"),
        ("gate", 0.98, "98.00%"),
        ("blessed", True, "yes"),
        ("blessed", False, "**no**"),
        ("parameters", 1_475_306, "1,475,306"),
        ("eval_images_per_s", 1234.4, "1,234"),
        ("loss", 0.0207123, "0.02071"),
        ("epochs", 8, "8"),
    ],
)
def test_cell_formats_each_leaderboard_value(key, value, shown):
    assert report.cell(key, value) == shown


def test_leaderboard_table_has_one_row_per_model_in_order(rows):
    shown = report.leaderboard_table(rows)
    assert [r["model"] for r in shown] == BEST_FIRST
    assert list(shown[0])[:4] == ["model", "test accuracy", "gate", "gate passed"]
    assert shown[1]["gate passed"] == "**no**" and shown[1]["test accuracy"] == "97.12%"


# --- TensorBoard HParams --------------------------------------------------------------------


def load_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    return acc


def hparams_data(acc, tag):
    from tensorboard.plugins.hparams import plugin_data_pb2

    meta = acc.SummaryMetadata(tag)
    assert meta.plugin_data.plugin_name == "hparams", tag
    return plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)


def test_write_hparams_writes_one_session_per_model(rows, params, tmp_path):
    from tensorboard.util import tensor_util

    logdir = tmp_path / "tb"
    report.write_hparams(rows, params.models, logdir)

    experiment = hparams_data(load_events(logdir), "_hparams_/experiment").experiment
    assert {h.name for h in experiment.hparam_infos} >= {"model", "optimizer", "learning_rate", "batch_size", "epochs", "dropout"}
    assert {m.name.tag for m in experiment.metric_infos} >= {"test/accuracy", "test/loss"}

    assert sorted(p.name for p in logdir.iterdir() if p.is_dir()) == sorted(METRICS)
    for name in METRICS:
        acc = load_events(logdir / name)
        start = hparams_data(acc, "_hparams_/session_start_info").session_start_info
        hp = start.hparams
        assert hp["model"].string_value == name
        block = params.model(name)
        assert hp["optimizer"].string_value == block.optimizer
        assert hp["learning_rate"].number_value == pytest.approx(block.learning_rate)
        assert hp["batch_size"].number_value == block.batch_size
        assert hp["epochs"].number_value == block.epochs
        assert hp["parameters"].number_value == META[name]["parameters"]
        assert hp["dropout"].number_value == pytest.approx(report.dropout(block))
        for tag, value in (
            ("test/accuracy", METRICS[name]["accuracy"]),
            ("test/loss", METRICS[name]["loss"]),
            ("validation/accuracy", META[name]["val_accuracy"]),
            ("train/seconds", TRAIN_TIMINGS[name]["train_seconds"]),
        ):
            (event,) = acc.Tensors(tag)
            assert float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(value, rel=1e-6), (name, tag)
    assert hparams_data(load_events(logdir / "cnn"), "_hparams_/session_start_info").session_start_info.hparams[
        "dropout"
    ].number_value == pytest.approx(0.5)


# --- the flow, as the DVC stage runs it --------------------------------------------------


@pytest.mark.services
def test_report_flow_writes_leaderboard_report_and_hparams(stage_outputs, params, tmp_path):
    report_flow = load_stage("report").report_flow
    data_report = tmp_path / "data_report.json"
    data_report.write_text(json.dumps(DATA_REPORT))
    leaderboard, out, tb = tmp_path / "leaderboard.json", tmp_path / "report.md", tmp_path / "tb" / "report"
    tb.mkdir(parents=True)
    (tb / "stale").mkdir()  # an earlier run's session: replaced, not mixed in
    models, evaluations = stage_outputs
    with prefect_settings():
        report_flow(
            params=params,
            models=models,
            evaluations=evaluations,
            data_report=data_report,
            leaderboard=leaderboard,
            out=out,
            tensorboard=tb,
        )
    assert json.loads(leaderboard.read_text()) == report.leaderboard_json(report.read_rows(models, evaluations, list(METRICS)))
    assert set(json.loads(leaderboard.read_text())) == {"accuracy"}
    md = out.read_text()
    assert [r[0] for r in table(md)[1]] == BEST_FIRST and md.count("**no**") == 1
    assert "9,876 MNIST test images" in md
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == sorted(METRICS)
    assert "test/accuracy" in load_events(tb / "cnn").Tags()["tensors"]
