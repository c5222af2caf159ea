"""TensorBoard: every stage's event files read back with TensorBoard's own reader after a small run,
and the server that shows training runs in progress beside the finished ones."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from conftest import SmallRun, free_port
from helpers import REPO
from pipeline import artifacts, cli, servers

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


def scalar(acc: EventAccumulator, tag: str) -> float:
    (event,) = acc.Tensors(tag)
    return float(tensor_util.make_ndarray(event.tensor_proto))


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


def test_train_events_moved_out_of_the_resume_folder(small_run: SmallRun) -> None:
    """A completed train stage leaves nothing in data/resume/<model>: its live events moved into place."""
    resume = small_run.project / "data" / "resume"
    for model in small_run.models():
        assert not (resume / model).exists(), f"{model}: {sorted(p.name for p in (resume / model).iterdir())}"
        assert not artifacts.live_tensorboard(resume / model).exists()
        run = small_run.project / "data" / "tensorboard" / "train" / model
        assert sorted(p.name for p in run.iterdir()) == ["train", "validation"], model


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
        acc = load(small_run.project / "data" / "tensorboard" / "export" / model)
        found = tags(acc)
        if small_run.metrics(model)["blessed"]:
            out = small_run.project / "data" / "export" / model
            assert found["export/signature"] == "text"
            assert found["export/size_bytes"] == "scalars"
            assert scalar(acc, "export/size_bytes") == artifacts.read_export_record(out)["bytes"]
            timings = artifacts.read_timings(out, "export")
            assert set(timings) == {"latency_ms_batch_1", "latency_ms_batch_256"}
            for key, value in timings.items():  # from timings.json, not export.json
                assert found[f"export/{key}"] == "scalars"
                assert scalar(acc, f"export/{key}") == pytest.approx(value, rel=1e-6)
        else:
            assert set(found) == {"export/status"}


def test_report_hparams_lists_every_model(small_run: SmallRun) -> None:
    root = small_run.project / "data" / "tensorboard" / "report"
    assert tags(load(root))["_hparams_/experiment"] == "hparams"
    for model in small_run.models():
        found = tags(load(root / model))
        assert found["_hparams_/session_start_info"] == "hparams"
        assert found["test/accuracy"] == "scalars"
        assert found["validation/accuracy"] == "scalars"


# --- the TensorBoard server: finished runs and training runs in progress -----------------------


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def write_run(folder: Path, loss: float) -> None:
    import tensorflow as tf

    with tf.summary.create_file_writer(str(folder)).as_default():
        tf.summary.scalar("epoch_loss", loss, step=0)


def runs_when(url: str, done, timeout: float = 60) -> list[str]:
    """Poll the server's run list until done(runs) holds (TensorBoard reloads every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = get_json(f"{url}/data/runs")
        if done(runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def test_tensorboard_server_shows_live_training_runs_as_training(tmp_path: Path) -> None:
    """live=: a run in progress shows as training/..., and under its own name once moved into the logdir."""
    logdir, resume = tmp_path / "tensorboard", tmp_path / "resume"
    write_run(logdir / "train" / "cnn" / "train", 0.5)  # a finished run
    live = artifacts.live_tensorboard(resume / "mlp")
    write_run(live / "train", 2.0)  # a run in progress
    with servers.tensorboard_server(logdir, "127.0.0.1", free_port(), log=tmp_path / "tb.log", live=resume) as url:
        in_progress = "training/mlp/tensorboard/train"
        runs = runs_when(url, lambda r: len(r) >= 2)
        assert sorted(runs) == ["train/cnn/train", in_progress]
        scalars = get_json(f"{url}/data/plugin/scalars/scalars?run={in_progress}&tag=epoch_loss")
        assert [value for _, _, value in scalars] == [2.0]

        live.rename(logdir / "train" / "mlp")  # what the train stage does when it completes
        runs = runs_when(url, lambda r: in_progress not in r and "train/mlp/train" in r)
        assert sorted(runs) == ["train/cnn/train", "train/mlp/train"]


def test_dashboards_serve_the_train_stage_resume_folder_as_live() -> None:
    """The CLI's live folder is where dvc.yaml's train stage keeps its run in progress."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["cmd"].split()
    resume = Path(cmd[cmd.index("--resume") + 1])
    assert resume == Path("data/resume/${key}")
    assert resume.parent == cli.TRAINING_NOW
    assert cli.TENSORBOARD_LOGDIR == Path(cmd[cmd.index("--tensorboard") + 1]).parents[1]


def test_tensorboard_server_shows_runs_written_without_tensorflow(tmp_path: Path) -> None:
    """pipeline.summaries.EventWriter's run through TensorBoard's plugins: scalars, text, histograms, images."""
    import numpy as np

    from pipeline import summaries

    grid = summaries.digit_grid(np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8))
    with summaries.EventWriter(tmp_path / "tensorboard" / "preprocess" / "mnist") as events:
        events.scalar("pixels/train/mean", 0.130655)
        events.text("checks", "| split | checks passed |\n|---|---|\n| train | no blank images |")
        events.histogram("classes/train", np.arange(100) % 10, buckets=10)
        events.image("samples/train_per_class", grid)
    with servers.tensorboard_server(tmp_path / "tensorboard", "127.0.0.1", free_port(), log=tmp_path / "tb.log") as url:
        run = "preprocess/mnist"
        assert runs_when(url, lambda r: run in r) == [run]
        [[_, step, value]] = get_json(f"{url}/data/plugin/scalars/scalars?run={run}&tag=pixels/train/mean")
        assert (step, value) == (0, pytest.approx(0.130655))
        [text] = get_json(f"{url}/data/plugin/text/text?run={run}&tag=checks")
        assert "no blank images" in text["text"] and "<table>" in text["text"]
        [[_, _, buckets]] = get_json(f"{url}/data/plugin/histograms/histograms?run={run}&tag=classes/train")
        assert [count for _, _, count in buckets] == [10] * 10
        [image] = get_json(f"{url}/data/plugin/images/images?run={run}&tag=samples/train_per_class&sample=0")
        with urllib.request.urlopen(f"{url}/data/plugin/images/individualImage?{image['query']}", timeout=30) as response:
            png = response.read()
        assert png.startswith(b"\x89PNG") and png == summaries.png(grid[0])
