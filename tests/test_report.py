"""pipeline.report on hand-written metrics.json files for three models: leaderboard, report.md, HParams."""

from __future__ import annotations

import json
import re

import pytest

from helpers import load_stage, load_test_params, prefect_settings
from pipeline import artifacts, report

# Written in an order that is not the accuracy order; mlp is under its gate.
METRICS = {
    "logreg": {"accuracy": 0.9251, "gate": 0.92, "blessed": True, "loss": 0.2712, "parameters": 7850, "epochs": 20,
               "train_seconds": 41.7, "eval_images_per_s": 910.5, "val_accuracy": 0.9302},
    "mlp": {"accuracy": 0.9712, "gate": 0.98, "blessed": False, "loss": 0.0981, "parameters": 497_260, "epochs": 30,
            "train_seconds": 250.25, "eval_images_per_s": 640.0, "val_accuracy": 0.9733},
    "cnn": {"accuracy": 0.9935, "gate": 0.993, "blessed": True, "loss": 0.0207, "parameters": 1_475_306, "epochs": 8,
            "train_seconds": 1312.0, "eval_images_per_s": 120.5, "val_accuracy": 0.9941},
}
BEST_FIRST = ["cnn", "mlp", "logreg"]
DATA_REPORT = {"splits": {"train": {"images": 55_000}, "val": {"images": 5_000}, "test": {"images": 10_000}}}


def metrics_file(name: str) -> dict:
    m = {"model": name, **METRICS[name], "test_images": 10_000}
    m.update(macro_precision=round(m["accuracy"] - 0.001, 6), macro_recall=m["accuracy"], macro_f1=round(m["accuracy"] - 0.002, 6))
    return m


@pytest.fixture
def evaluations(tmp_path):
    root = tmp_path / "evaluate"
    for name in METRICS:
        (root / name).mkdir(parents=True)
        (root / name / artifacts.METRICS_FILE).write_text(json.dumps(metrics_file(name), indent=2))
    return root


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


def test_read_metrics_sorts_best_accuracy_first(evaluations):
    rows = report.read_metrics(evaluations, ["logreg", "mlp", "cnn"])
    assert [r["model"] for r in rows] == BEST_FIRST
    assert rows[0] == metrics_file("cnn")


def test_read_metrics_reads_only_the_models_asked_for(evaluations):
    assert [r["model"] for r in report.read_metrics(evaluations, ["logreg", "mlp"])] == ["mlp", "logreg"]


def test_leaderboard_json_has_one_entry_per_model(evaluations):
    board = report.leaderboard_json(report.read_metrics(evaluations, list(METRICS)))
    assert list(board["models"]) == BEST_FIRST
    for name, entry in board["models"].items():
        assert "model" not in entry
        for key in ("accuracy", "gate", "blessed", "loss", "macro_f1", "parameters", "epochs"):
            assert entry[key] == metrics_file(name)[key], (name, key)
    json.dumps(board)  # a valid DVC metrics file


def test_report_markdown_table_and_sections(evaluations, params):
    rows = report.read_metrics(evaluations, list(METRICS))
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
    assert "10,000" in md and "55,000" in md and "5,000" in md and f"seed {params.seed}" in md
    for name in METRICS:
        assert f"## {name}" in md
        assert f"(evaluate/{name}/confusion.png)" in md and f"(evaluate/{name}/curves.png)" in md
    mlp_section = md.split("## mlp")[1].split("## ")[0]
    assert "NOT passed, not exported" in mlp_section
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


def test_leaderboard_table_has_one_row_per_model_in_order(evaluations):
    rows = report.read_metrics(evaluations, list(METRICS))
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


def test_write_hparams_writes_one_session_per_model(evaluations, params, tmp_path):
    from tensorboard.util import tensor_util

    rows = report.read_metrics(evaluations, list(METRICS))
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
        assert hp["parameters"].number_value == METRICS[name]["parameters"]
        assert hp["dropout"].number_value == pytest.approx(report.dropout(block))
        for tag, key in (("test/accuracy", "accuracy"), ("test/loss", "loss"), ("validation/accuracy", "val_accuracy")):
            (event,) = acc.Tensors(tag)
            assert float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(METRICS[name][key], abs=1e-6)
    assert hparams_data(load_events(logdir / "cnn"), "_hparams_/session_start_info").session_start_info.hparams["dropout"].number_value == pytest.approx(0.5)


# --- the flow, as the DVC stage runs it --------------------------------------------------


def test_report_flow_writes_leaderboard_report_and_hparams(evaluations, params, tmp_path):
    report_flow = load_stage("report").report_flow
    data_report = tmp_path / "data_report.json"
    data_report.write_text(json.dumps(DATA_REPORT))
    leaderboard, out, tb = tmp_path / "leaderboard.json", tmp_path / "report.md", tmp_path / "tb" / "report"
    tb.mkdir(parents=True)
    (tb / "stale").mkdir()  # an earlier run's session: replaced, not mixed in
    with prefect_settings():
        report_flow(params=params, evaluations=evaluations, data_report=data_report, leaderboard=leaderboard, out=out, tensorboard=tb)
    rows = report.read_metrics(evaluations, list(METRICS))
    assert json.loads(leaderboard.read_text()) == report.leaderboard_json(rows)
    md = out.read_text()
    assert [r[0] for r in table(md)[1]] == BEST_FIRST and md.count("**no**") == 1
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == sorted(METRICS)
    assert "test/accuracy" in load_events(tb / "cnn").Tags()["tensors"]
