"""pipeline.summaries: events written without TensorFlow read back as tf.summary's do (same tags,
plugins, tensor dtypes, shapes and values), and the fetch, preprocess and report stages write
theirs without importing TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.util import tensor_util

from helpers import MIRROR, REPO, random_images, write_raw
from pipeline import summaries
from pipeline.mnist import FILES


def load(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def hparams_protos() -> tuple:
    """The same HParams experiment and trial, with fixed times, for both writers."""
    hparams = [hp.HParam("model", hp.Discrete(["cnn", "mlp"])), hp.HParam("learning_rate", hp.RealInterval(0.0, 10.0))]
    config = hp.hparams_config_pb(
        hparams=hparams, metrics=[hp.Metric("test/accuracy", display_name="test accuracy")], time_created_secs=1.5e9
    )
    trial = hp.hparams_pb({"model": "cnn", "learning_rate": 0.01}, trial_id="cnn", start_time_secs=1.5e9)
    return config, trial


def test_each_summary_reads_back_as_tf_summary_writes_it(tmp_path: Path) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=257).astype(np.int32)
    grid = summaries.digit_grid(random_images(rng, 23))
    text = "| split | 0 |\n|---|---|\n| train | 5,923 |"
    config, trial = hparams_protos()
    with tf.summary.create_file_writer(str(tmp_path / "tf")).as_default():
        tf.summary.scalar("float", 0.130655, step=0)
        tf.summary.scalar("int", 47_040_016, step=0)
        tf.summary.text("text", text, step=0)
        tf.summary.histogram("histogram", labels, step=0, buckets=10)
        tf.summary.image("image", grid, step=0)
        tf.summary.experimental.write_raw_pb(config.SerializeToString(), step=0)
        tf.summary.experimental.write_raw_pb(trial.SerializeToString(), step=0)
    with summaries.EventWriter(tmp_path / "ours") as events:
        events.scalar("float", 0.130655)
        events.scalar("int", 47_040_016)
        events.text("text", text)
        events.histogram("histogram", labels, buckets=10)
        events.image("image", grid)
        events.add(config)
        events.add(trial)

    theirs, ours = load(tmp_path / "tf"), load(tmp_path / "ours")
    tags = ["float", "int", "text", "histogram", "image", "_hparams_/experiment", "_hparams_/session_start_info"]
    assert sorted(ours.Tags()["tensors"]) == sorted(theirs.Tags()["tensors"]) == sorted(tags)
    for tag in tags:
        assert ours.SummaryMetadata(tag) == theirs.SummaryMetadata(tag), tag  # plugin name and content
        (mine,), (tfs,) = ours.Tensors(tag), theirs.Tensors(tag)
        assert mine.step == tfs.step == 0
        a, b = mine.tensor_proto, tfs.tensor_proto
        assert (a.dtype, a.tensor_shape) == (b.dtype, b.tensor_shape), tag
        got, want = tensor_util.make_ndarray(a), tensor_util.make_ndarray(b)
        if tag == "image":  # [width, height, png]: the same pixels, whatever the PNG encoder's choices
            assert list(got[:2]) == list(want[:2]) == [str(grid.shape[2]).encode(), str(grid.shape[1]).encode()]
            np.testing.assert_array_equal(tf.io.decode_png(got[2]).numpy(), tf.io.decode_png(want[2]).numpy())
            np.testing.assert_array_equal(tf.io.decode_png(got[2]).numpy(), grid[0])
        elif tag == "histogram":  # bucket edges from numpy's linspace and TensorFlow's: equal to rounding
            np.testing.assert_allclose(got, want, rtol=1e-12)
        else:
            np.testing.assert_array_equal(got, want)
    assert float(tensor_util.make_ndarray(ours.Tensors("int")[0].tensor_proto)) == 47_040_016


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_holds_the_pixels(channels: int) -> None:
    import tensorflow as tf

    pixels = np.random.default_rng(channels).integers(0, 256, size=(7, 5, channels), dtype=np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(summaries.png(pixels)).numpy(), pixels)


def test_event_writer_closes_a_complete_file(tmp_path: Path) -> None:
    """Every event is on disk once the writer's block ends; two writers in one folder keep two files."""
    with summaries.EventWriter(tmp_path) as events:
        events.scalar("a", 1.0)
    with summaries.EventWriter(tmp_path) as events:
        events.scalar("b", 2.0, step=3)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    acc = load(tmp_path)
    assert [e.step for e in acc.Tensors("a")] == [0] and [e.step for e in acc.Tensors("b")] == [3]


# --- the stages import no TensorFlow ----------------------------------------------------------


def imported_tensorflow(stderr: str) -> list[str]:
    """The TensorFlow and Keras modules that a `python -X importtime` run imported."""
    names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return [n for n in names if n.split(".")[0] in ("tensorflow", "keras", "tf_keras")]


def run_stage_cold(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python stages/<script> ARGS` as DVC runs it without the warm server, listing its imports."""
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_WARM_SOCKET"}
    env["MNIST_MIRROR"] = str(MIRROR)
    return subprocess.run(
        [sys.executable, "-X", "importtime", f"stages/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fetch_stage_imports_no_tensorflow(tmp_path: Path) -> None:
    """The whole stage, cold: its imports, its work and its TensorBoard run."""
    if not MIRROR.is_dir():
        pytest.skip(f"no MNIST at {MIRROR}")
    done = run_stage_cold("fetch.py", "--out", str(tmp_path / "raw"), "--tensorboard", str(tmp_path / "tb"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert imported_tensorflow(done.stderr) == []
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES)
    assert set(load(tmp_path / "tb").Tags()["tensors"]) >= {"fetch/files", "bytes/train-images-idx3-ubyte"}


def test_preprocess_stage_imports_no_tensorflow(tmp_path: Path) -> None:
    """The whole stage, cold, on 5,100 synthetic training images (params.yaml splits off 5,000)."""
    rng = np.random.default_rng(1)
    raw = write_raw(
        tmp_path / "raw", random_images(rng, 5_100), np.arange(5_100) % 10, random_images(rng, 50), np.arange(50) % 10
    )
    done = run_stage_cold(
        "preprocess.py",
        "--raw",
        str(raw),
        "--out",
        str(tmp_path / "prepared"),
        "--report",
        str(tmp_path / "data_report.json"),
        "--tensorboard",
        str(tmp_path / "tb"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert imported_tensorflow(done.stderr) == []
    assert set(load(tmp_path / "tb").Tags()["tensors"]) >= {"classes/train", "samples/train_per_class", "checks"}


REPORT_CODE = """
import sys
from pathlib import Path
from pipeline import report
from pipeline.config import ModelParams

out = Path(sys.argv[1])
p = ModelParams(epochs=2, batch_size=64, optimizer="adam", learning_rate=0.01, lr_schedule="constant",
                init="glorot", l2=0.0, precision="float32")
row = {"model": "cnn", "accuracy": 0.99, "gate": 0.98, "blessed": True, "loss": 0.03, "macro_precision": 0.99,
       "macro_recall": 0.99, "macro_f1": 0.99, "parameters": 1000, "epochs": 2, "val_accuracy": 0.98,
       "train_seconds": 3.0, "eval_images_per_s": 5000.0}
splits = {name: {"images": 100} for name in ("train", "val", "test")}
report.write_outputs([row], {"splits": splits}, 7, out / "leaderboard.json", out / "report.md")
report.write_hparams([row], {"cnn": p}, out / "tb")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")))
"""


def test_report_writes_its_outputs_and_hparams_without_tensorflow(tmp_path: Path) -> None:
    """pipeline.report, in a fresh process: the leaderboard, report.md and the HParams runs."""
    done = subprocess.run(
        [sys.executable, "-c", REPORT_CODE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    assert "TensorFlow 2." in (tmp_path / "report.md").read_text()
    assert load(tmp_path / "tb").SummaryMetadata("_hparams_/experiment").plugin_data.plugin_name == "hparams"
    assert set(load(tmp_path / "tb" / "cnn").Tags()["tensors"]) >= {"_hparams_/session_start_info", "test/accuracy"}
