"""TensorBoard: every stage's event files read back with TensorBoard's own reader after a small run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SmallRun

RELU_MODELS = {"deep_mlp", "cnn", "pattern_small", "pattern_deep"}
CONV_MODELS = {"cnn", "pattern_small", "pattern_deep", "lenet"}


def load(run: Path) -> EventAccumulator:
    assert run.is_dir(), f"no TensorBoard run at {run}"
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0, "images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def tags(acc: EventAccumulator) -> dict[str, str]:
    """Every tag of a run with the plugin that displays it (TF2 writes all summaries as tensors)."""
    return {tag: acc.SummaryMetadata(tag).plugin_data.plugin_name for tag in acc.Tags()["tensors"]}


def test_fetch_and_preprocess_runs(small_run: SmallRun) -> None:
    tb = small_run.project / "data" / "tensorboard"
    fetch = tags(load(tb / "fetch" / "mnist"))
    assert fetch["bytes/train-images-idx3-ubyte"] == "scalars"
    assert fetch["seconds/t10k-labels-idx1-ubyte"] == "scalars"
    assert fetch["fetch/files"] == "text"
    pre = tags(load(tb / "preprocess" / "mnist"))
    for split in ("train", "val", "test"):
        assert pre[f"classes/{split}"] == "histograms"
        assert pre[f"pixels/{split}/mean"] == "scalars"
        assert pre[f"pixels/{split}/std"] == "scalars"
    assert pre["samples/train_per_class"] == "images"
    assert pre["class_counts"] == "text"


@pytest.mark.parametrize("part", ["train", "validation"])
def test_train_runs(small_run: SmallRun, part: str) -> None:
    for model in small_run.models():
        acc = load(small_run.project / "data" / "tensorboard" / "train" / model / part)
        found = tags(acc)
        assert found["epoch_loss"] == "scalars", model
        assert found["epoch_accuracy"] == "scalars", model
        if part == "train":
            assert found["epoch_learning_rate"] == "scalars", model
            assert "histograms" in found.values(), model  # weight histograms
            assert found["model/layers"] == "text" and found["model/params"] == "text", model
            assert acc.Tags()["graph"], f"{model}: no model graph"
            dead = [t for t in found if t.startswith("dead_relu/")]
            assert bool(dead) == (model in RELU_MODELS), (model, dead)


def test_evaluate_runs(small_run: SmallRun) -> None:
    for model in small_run.models():
        run = small_run.project / "data" / "tensorboard" / "evaluate" / model
        found = tags(load(run))
        assert found["test/accuracy"] == "scalars"
        assert found["confusion_matrix"] == "images"
        assert found["misclassified"] == "images"
        for d in range(10):
            assert found[f"per_class_accuracy/{d}"] == "scalars"
            assert found[f"pr_curve/digit_{d}"] == "pr_curves"
        if model in CONV_MODELS:
            assert any(t.startswith("filters/") for t in found), model
            assert any(t.startswith("feature_maps/") for t in found), model
        config = (run / "projector_config.pbtxt").read_text()
        assert "embedding.tsv" in config and "labels.tsv" in config and "sprite.png" in config
        rows = (run / "embedding.tsv").read_text().strip().splitlines()
        labels = (run / "labels.tsv").read_text().strip().splitlines()
        assert len(rows) == len(labels) > 0


def test_export_runs(small_run: SmallRun) -> None:
    for model in small_run.models():
        found = tags(load(small_run.project / "data" / "tensorboard" / "export" / model))
        if small_run.metrics(model)["blessed"]:
            assert found["export/signature"] == "text"
            assert found["export/size_bytes"] == "scalars"
            assert found["export/latency_ms_batch_1"] == "scalars"
            assert found["export/latency_ms_batch_256"] == "scalars"
        else:
            assert found["export/status"] == "text"


def test_report_hparams_lists_every_model(small_run: SmallRun) -> None:
    root = small_run.project / "data" / "tensorboard" / "report"
    assert tags(load(root))["_hparams_/experiment"] == "hparams"
    for model in small_run.models():
        found = tags(load(root / model))
        assert found["_hparams_/session_start_info"] == "hparams"
        assert found["test/accuracy"] == "scalars"
        assert found["validation/accuracy"] == "scalars"
