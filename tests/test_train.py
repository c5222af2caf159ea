"""pipeline.train on small synthetic data: determinism, resume after SIGKILL, the NaN guard,
dead-ReLU and TensorBoard summaries, and the course's tutorials.

Runs that compare weights bit for bit run in subprocesses (tests/helpers.py as a
script): seed_everything switches on TF op determinism for the whole process, and the
resume test SIGKILLs its trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorflow.python.framework import config as tf_config

from helpers import (
    PYTHON,
    REPO,
    SMALL_CNN,
    edited_raw,
    finish_worker,
    load_arrays,
    params_with,
    start_worker,
    write_data,
)
from pipeline import artifacts, tutorials
from pipeline.artifacts import CHECKPOINT_STATE, LIVE_METRICS, LIVE_TENSORBOARD, META_FILE, MODEL_FILE
from pipeline.data import Split
from pipeline.errors import TrainingDiverged
from pipeline.models import registry
from pipeline.models.linear import LinearParams
from pipeline.train import loop, precision
from pipeline.train.callbacks import dead_fraction
from pipeline.train.inputs import shifted, training_batches
from pipeline.train.loop import DEAD_RELU_PROBE, keras_seeds_from, train_model
from pipeline.train.optimizers import make_optimizer

EPOCHS = SMALL_CNN["epochs"]
SHIFTED_CNN = {**SMALL_CNN, "shift": 2}  # the determinism and resume runs move their images too


@pytest.fixture(autouse=True)
def _no_op_determinism_left_behind():
    """Training in this process switches TF op determinism on for good; switch it off after each test."""
    yield
    tf_config.disable_op_determinism()  # TF has no public switch back


LIVE_TSV = [("eval", "accuracy"), ("eval", "loss"), ("train", "accuracy"), ("train", "learning_rate"), ("train", "loss")]


def live_files(folder: Path) -> dict[str, bytes]:
    """Every file of a DVCLive folder, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


def assert_same_arrays(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, i
        assert np.array_equal(x, y), f"array {i} differs: max |diff| {np.max(np.abs(x.astype(np.float64) - y)):.3g}"


# --- subprocess runs: determinism and resume -----------------------------------------------


class Run:
    """One worker job (tests/helpers.py) and where it writes."""

    def __init__(
        self,
        base: Path,
        tag: str,
        data: Path,
        resume: Path | None = None,
        tensorboard: Path | None = None,
        live: Path | None = None,
        **job,
    ):
        self.folder = base / tag
        self.folder.mkdir(parents=True)
        self.job_file = self.folder / "job.json"
        self.job = {
            "model": "cnn",
            "overrides": dict(SHIFTED_CNN),
            "data": str(data),
            "resume": str(resume or self.folder / "resume"),
            "tensorboard": str(tensorboard or self.folder / "tensorboard"),
            "live": str(live or self.folder / "live"),
            "weights": str(self.folder / "weights.npz"),
            "optimizer": str(self.folder / "optimizer.npz"),
            "result": str(self.folder / "result.json"),
            "out": str(self.folder / "out"),
            **job,
        }
        self.rc: int | None = None
        self.stderr = ""

    @property
    def resume(self) -> Path:
        return Path(self.job["resume"])

    @property
    def out(self) -> Path:
        return Path(self.job["out"])

    @property
    def live(self) -> Path:
        return Path(self.job["live"])

    def start(self) -> subprocess.Popen:
        return start_worker(self.job, self.job_file)

    def finish(self, proc: subprocess.Popen) -> Run:
        self.rc, self.stderr = finish_worker(proc, self.job_file)
        return self

    def weights(self) -> list[np.ndarray]:
        return load_arrays(Path(self.job["weights"]))

    def optimizer(self) -> list[np.ndarray]:
        return load_arrays(Path(self.job["optimizer"]))

    def result(self) -> dict:
        return json.loads(Path(self.job["result"]).read_text())

    def tail(self) -> str:
        return f"exit {self.rc}; stderr:\n{self.stderr[-3000:]}"


def run_all(*runs: Run) -> None:
    """Run the workers side by side (each spends most of its time importing TensorFlow)."""
    procs = [run.start() for run in runs]
    for run, proc in zip(runs, procs):
        run.finish(proc)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    write_data(folder)
    return folder


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, data_dir) -> dict[str, Run]:
    """Two uninterrupted 3-epoch runs of a small cnn with dropout, and one SIGKILLed after epoch 1."""
    base = tmp_path_factory.mktemp("runs")
    runs = {
        "a": Run(base, "a", data_dir),
        "b": Run(base, "b", data_dir),
        "killed": Run(base, "killed", data_dir, kill_after_epoch=0),
    }
    run_all(*runs.values())
    return runs


@pytest.fixture(scope="module")
def second_runs(tmp_path_factory, data_dir, first_runs) -> dict[str, Run]:
    """On copies of the killed run's folders: the same config again, one with another learning rate, and
    the same config on a copy whose checkpoint was damaged since (its model file cut in half)."""
    killed = first_runs["killed"]
    assert killed.rc == -signal.SIGKILL, killed.tail()
    base = tmp_path_factory.mktemp("again")
    runs = {}
    for tag, overrides in (
        ("resumed", dict(SHIFTED_CNN)),
        ("other_lr", {**SHIFTED_CNN, "learning_rate": 0.002}),
        ("damaged", dict(SHIFTED_CNN)),
    ):
        resume, tensorboard, live = base / tag / "resume", base / tag / "tensorboard", base / tag / "live"
        shutil.copytree(killed.resume, resume)  # its checkpoint and the TensorBoard events of epoch 1
        shutil.copytree(killed.live, live)  # DVCLive's files of epoch 1, and a row of an epoch 2 killed after DVCLive wrote it:
        with open(live / LIVE_METRICS / "train" / "loss.tsv", "a") as tsv:
            tsv.write("1\t0.5\n")
        if tag == "damaged":
            model_file = resume / "epoch-0001" / MODEL_FILE
            model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
        # other_lr writes no final outputs, so its resume folder (deleted once they are written) can be inspected
        out = {"out": None} if tag == "other_lr" else {}
        runs[tag] = Run(
            base, f"{tag}-run", data_dir, resume=resume, tensorboard=tensorboard, live=live, overrides=overrides, **out
        )
    run_all(*runs.values())
    return runs


def test_two_fresh_runs_give_identical_weights_and_history(first_runs):
    a, b = first_runs["a"], first_runs["b"]
    assert a.rc == 0, a.tail()
    assert b.rc == 0, b.tail()
    assert_same_arrays(a.weights(), b.weights())
    assert_same_arrays(a.optimizer(), b.optimizer())
    ha, hb = a.result()["history"], b.result()["history"]
    assert len(ha["loss"]) == EPOCHS
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(ha)
    assert without_seconds(ha) == without_seconds(hb)
    assert a.result()["epochs_resumed"] == b.result()["epochs_resumed"] == 0


def test_killed_run_leaves_the_epoch_1_checkpoint_and_no_final_outputs(first_runs):
    killed = first_runs["killed"]
    assert killed.rc == -signal.SIGKILL, killed.tail()
    assert sorted(p.name for p in killed.resume.iterdir()) == ["epoch-0001", LIVE_TENSORBOARD]
    ckpt = killed.resume / "epoch-0001"
    assert (ckpt / MODEL_FILE).is_file()
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    assert state["epochs_done"] == 1
    assert len(state["history"]["loss"]) == 1
    assert not killed.out.exists()
    assert not Path(killed.job["weights"]).exists()
    assert not Path(killed.job["tensorboard"]).exists()  # the TensorBoard output appears only with the model
    # DVCLive writes as the epochs end: epoch 1 is there, as a row of each metric and in metrics.json
    assert json.loads((killed.live / "metrics.json").read_text())["step"] == 0
    assert (killed.live / LIVE_METRICS / "eval" / "accuracy.tsv").read_text().splitlines()[1:] == [
        f"0\t{state['history']['val_accuracy'][0]}"
    ]


def test_resumed_run_continues_after_epoch_1_and_ends_as_the_uninterrupted_run(first_runs, second_runs):
    a, resumed = first_runs["a"], second_runs["resumed"]
    assert resumed.rc == 0, resumed.tail()
    assert resumed.result()["epochs_resumed"] == 1
    assert "resuming after epoch 1" in resumed.stderr
    assert_same_arrays(a.weights(), resumed.weights())
    assert_same_arrays(a.optimizer(), resumed.optimizer())
    assert without_seconds(resumed.result()["history"]) == without_seconds(a.result()["history"])
    # the final outputs exist only now: the same bytes as the uninterrupted run's, the resume in timings.json alone
    for name in (MODEL_FILE, META_FILE):
        assert (resumed.out / name).read_bytes() == (a.out / name).read_bytes(), name
    # DVCLive's files: those of the uninterrupted run, byte for byte (epoch 1 written again from the checkpoint,
    # the stray epoch-2 row left by the kill gone), with no seconds (they differ between identical runs)
    assert live_files(resumed.live) == live_files(a.live)
    assert live_files(a.live) == live_files(first_runs["b"].live)
    assert sorted(live_files(a.live)) == ["metrics.json", *(f"{LIVE_METRICS}/{split}/{name}.tsv" for split, name in LIVE_TSV)]
    assert json.loads((a.live / "metrics.json").read_text())["step"] == EPOCHS - 1
    for split, name in LIVE_TSV:
        rows = (a.live / LIVE_METRICS / split / f"{name}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{name}" and [r.split("\t")[0] for r in rows[1:]] == [str(e) for e in range(EPOCHS)]
    assert artifacts.read_timings(resumed.out, "train")["epochs_resumed"] == 1
    assert len(artifacts.read_timings(resumed.out, "train")["epoch_seconds"]) == EPOCHS
    assert json.loads((resumed.out / META_FILE).read_text())["epochs"] == EPOCHS
    saved = keras.models.load_model(resumed.out / MODEL_FILE)
    assert_same_arrays(a.weights(), [np.asarray(w) for w in saved.get_weights()])
    assert artifacts.read_history(resumed.live)["val_accuracy"].tolist() == a.result()["history"]["val_accuracy"]
    # the TensorBoard run holds every epoch once: the killed run's epoch 1 and the resumed epochs
    loss_steps = sorted(e.step for e in accumulator(Path(resumed.job["tensorboard"]) / "train").Tensors("epoch_loss"))
    assert loss_steps == list(range(EPOCHS))
    # with the final outputs written, nothing is left to resume: the checkpoints are gone
    assert not resumed.resume.exists()
    assert not a.resume.exists()


def test_checkpoint_made_with_other_params_is_discarded(first_runs, second_runs):
    a, other = first_runs["a"], second_runs["other_lr"]
    assert other.rc == 0, other.tail()
    assert other.result()["epochs_resumed"] == 0
    assert "discarding checkpoint" in other.stderr
    assert "resuming" not in other.stderr
    assert len(other.result()["history"]["loss"]) == EPOCHS
    assert sorted(p.name for p in other.resume.iterdir()) == [f"epoch-{EPOCHS:04d}", LIVE_TENSORBOARD]
    assert json.loads((other.resume / f"epoch-{EPOCHS:04d}" / CHECKPOINT_STATE).read_text())["epochs_done"] == EPOCHS
    # trained from scratch at the other rate: not the weights of the learning rate 0.001 run
    assert not all(np.array_equal(x, y) for x, y in zip(a.weights(), other.weights()))


def test_a_damaged_checkpoint_is_discarded_and_the_run_ends_as_the_uninterrupted_one(first_runs, second_runs):
    a, damaged = first_runs["a"], second_runs["damaged"]
    assert damaged.rc == 0, damaged.tail()
    assert "discarding checkpoint" in damaged.stderr and "resuming" not in damaged.stderr
    assert damaged.result()["epochs_resumed"] == 0  # trained from the start, never from the damaged file
    assert_same_arrays(a.weights(), damaged.weights())
    for name in (MODEL_FILE, META_FILE):
        assert (damaged.out / name).read_bytes() == (a.out / name).read_bytes(), name
    assert live_files(damaged.live) == live_files(a.live)


# --- the NaN guard ----------------------------------------------------------------------------

# The config caps learning_rate at 10; plain SGD at 10 on least squares over 784 inputs blows up in a few steps.
# (Plain SGD has no `momentum` knob: the config allows it only for optimizer momentum.)
DIVERGING = {"optimizer": "sgd", "learning_rate": 10.0, "lr_schedule": "constant", "batch_size": 16, "epochs": 2}


def test_nan_guard_raises_training_diverged_naming_model_epoch_and_learning_rate(tmp_path):
    splits = write_data(tmp_path / "data")
    params = params_with("linear", **DIVERGING)
    with pytest.raises(TrainingDiverged) as err:
        train_model(
            "linear",
            params.model("linear"),
            params.seed,
            params.train,
            splits,
            tmp_path / "data",
            tmp_path / "resume",
        )
    message = str(err.value)
    assert "model 'linear' diverged" in message
    assert "in epoch 1" in message
    assert "models.linear.learning_rate" in message and "10.0" in message
    assert not list((tmp_path / "resume").glob("epoch-*"))  # no checkpoint of a diverged epoch


def stage_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # a temporary server's telemetry can log a sqlite-locked traceback
    # a running server if the test run has one (given, or started by the session), else Prefect's temporary one
    api = os.environ.get("TEST_PREFECT_API_URL") or os.environ.get("PREFECT_API_URL")
    if api:
        env["PREFECT_API_URL"] = api
    return env


@pytest.fixture(scope="module")
def diverging_stage(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """stages/train.py run as DVC runs it, in a project whose params.yaml makes linear diverge."""
    tmp = tmp_path_factory.mktemp("stage")
    project = tmp / "project"
    write_data(project / "data" / "prepared")
    (project / "params.yaml").write_text(yaml.safe_dump(edited_raw("linear", **DIVERGING), sort_keys=False))
    result = subprocess.run(
        [
            str(PYTHON),
            str(REPO / "stages" / "train.py"),
            "linear",
            "--data",
            "data/prepared",
            "--out",
            "data/models/linear",
            "--live",
            "data/live/linear",
            "--resume",
            "data/resume/linear",
            "--tensorboard",
            "data/tensorboard/train/linear",
        ],
        cwd=project,
        env=stage_env(tmp),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return project, result


@pytest.mark.services
def test_train_stage_exits_1_with_the_divergence_message_and_writes_no_model(diverging_stage):
    project, result = diverging_stage
    assert result.returncode == 1, result.stderr[-4000:]
    assert "error in stage train@linear" in result.stderr
    assert "model 'linear' diverged" in result.stderr and "in epoch 1" in result.stderr
    assert "models.linear.learning_rate" in result.stderr
    assert not (project / "data" / "models" / "linear" / MODEL_FILE).exists()
    assert not (project / "data" / "models" / "linear").exists()


@pytest.mark.services
def test_train_stage_prints_no_traceback_for_a_divergence(diverging_stage):
    _, result = diverging_stage
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


# --- initial weights with another thread drawing from Python's random --------------------------


def built_weights(seed: int, private: bool, drawn: int = 0) -> bytes:
    """The small cnn's initial weights, built as train_model builds it (with or without keras_seeds_from),
    after `drawn` draws from Python's global `random` between the seeding and the build."""
    keras.utils.set_random_seed(seed)
    for _ in range(drawn):
        random.getrandbits(32)  # what another thread may draw meanwhile
    with keras_seeds_from(seed) if private else contextlib.nullcontext():
        model = registry.build("cnn", params_with("cnn", **SMALL_CNN).model("cnn"))
    return b"".join(w.tobytes() for w in model.get_weights())


def test_the_initial_weights_do_not_depend_on_other_threads_drawing_from_random():
    """Prefect's events client draws from Python's global `random` in a thread of its own (the
    CNN of a full run got other initial weights that way); the build must not see those draws."""
    undisturbed = built_weights(1337, private=False)
    assert built_weights(1337, private=True) == undisturbed  # the same weights as before the fix
    assert built_weights(7, private=True) != undisturbed
    # one draw from elsewhere changes a plain build (the hazard, made certain), not one under keras_seeds_from
    assert built_weights(1337, private=False, drawn=1) != undisturbed
    assert built_weights(1337, private=True, drawn=1) == undisturbed
    # a thread drawing all through the builds, as Prefect's does
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.getrandbits(32)
            time.sleep(0)  # let the builder run between draws

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        kept = [built_weights(1337, private=True) for _ in range(3)]
    finally:
        stop.set()
        drawer.join()
    assert all(w == undisturbed for w in kept)


# --- mixed precision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, flags, expected",
    [
        ("auto", {"avx512_bf16", "avx2"}, "mixed_bfloat16"),
        ("auto", {"amx_bf16"}, "mixed_bfloat16"),
        ("auto", {"avx2", "avx512f"}, "float32"),
        ("float32", {"avx512_bf16"}, "float32"),
        ("bf16", set(), "mixed_bfloat16"),
        ("fp16", set(), "mixed_float16"),
    ],
)
def test_training_policy_is_bf16_on_auto_only_with_bf16_instructions(monkeypatch, setting, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert precision.training_policy(setting) == expected


def test_a_bf16_training_gives_a_float32_model_with_its_weights(tmp_path):
    splits = write_data(tmp_path / "data")
    params = params_with("cnn", **{**SMALL_CNN, "epochs": 1, "precision": "bf16"})
    result = train_model("cnn", params.model("cnn"), params.seed, params.train, splits, tmp_path / "data", tmp_path / "resume")
    assert result.precision == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is back
    assert {layer.dtype_policy.name for layer in result.model.layers} == {"float32"}
    assert result.model.optimizer.iterations.numpy() > 0  # the optimizer state came along
    loop.save_trained(result, "cnn", params.model("cnn"), params.seed, tmp_path / "out", tmp_path / "resume", tmp_path / "tb")
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["precision"] == "mixed_bfloat16" and meta["device"] == result.device
    saved = artifacts.read_model(tmp_path / "out")
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    assert_same_arrays([np.asarray(w) for w in saved.get_weights()], [np.asarray(w) for w in result.model.get_weights()])


def test_a_gpu_expected_but_missing_is_a_warning_naming_the_fix(monkeypatch, caplog):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("TensorFlow sees a GPU here")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    train = params_with("linear").train
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        assert loop.training_device(train) == "CPU"
        assert not caplog.records  # none expected: no warning
        assert loop.training_device(train.model_copy(update={"strategy": "mirrored"})) == "CPU"
    (record,) = caplog.records
    assert "a GPU was expected (train.strategy mirrored" in record.message and "make setup-gpu" in record.message


# --- shifted training images ------------------------------------------------------------------


def test_shifted_moves_each_image_by_its_own_offsets_filling_with_background():
    images = np.zeros((3, 5, 5), np.uint8)
    images[:, 2, 2] = 9
    moved = shifted(tf.constant(images), tf.constant([[1, 1], [0, 2], [2, 0]]), 1).numpy()
    # offset 1 is no move; 0 moves the image down (right), 2 moves it up (left)
    assert [np.argwhere(m).tolist() for m in moved] == [[[2, 2]], [[3, 1]], [[1, 3]]]
    edge = np.zeros((1, 5, 5), np.uint8)
    edge[0, 0, :] = 7
    assert shifted(tf.constant(edge), tf.constant([[2, 1]]), 1).numpy()[0, 4].tolist() == [0] * 5  # nothing wraps round


def batches_of(split: Split, first_epoch: int, shift: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in training_batches(split, 16, 7, first_epoch, 3, shift)]


def test_shifted_batches_are_keyed_by_seed_and_epoch_and_shift_0_is_the_plain_images():
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40, dtype=np.uint8))
    plain, moved = batches_of(split, 0, 0), batches_of(split, 0, 2)
    assert len(plain) == len(moved) == 9  # 3 epochs of 3 batches (16, 16, 8)
    for (x, y), (xm, ym) in zip(plain, moved):
        assert np.array_equal(y, ym)  # the same order of images
        order = [int(np.flatnonzero((split.x == image).all(axis=(1, 2)))[0]) for image in x.astype(np.uint8)]
        assert np.array_equal(split.y[order], y)  # shift 0: the images themselves
        assert not np.array_equal(x, xm)
        assert xm.shape == x.shape and xm.dtype == np.float32
    resumed = batches_of(split, 1, 2)  # epochs 1 and 2 alone, as a resumed run asks for them
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(moved[3:], resumed, strict=True))


# --- dead ReLU units ------------------------------------------------------------------------


def test_dead_fraction_of_dense_activations():
    acts = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 2.0, 0.0, 0.0]])
    assert dead_fraction(acts) == 0.5  # units 0 and 2 are 0 for every sample
    assert dead_fraction(np.ones((4, 3))) == 0.0
    assert dead_fraction(np.zeros((4, 3))) == 1.0


def test_dead_fraction_of_conv_activations_counts_channels():
    acts = np.zeros((2, 5, 5, 4), dtype=np.float32)  # [n, h, w, c]: the units are the 4 channels
    acts[1, 4, 0, 1] = 0.5  # channel 1 fires once, at one position of one sample
    acts[:, :, :, 3] = 1.0  # channel 3 fires everywhere
    assert dead_fraction(acts) == 0.5
    acts[0, 0, 0, 2] = 1e-6
    assert dead_fraction(acts) == 0.25


# --- TensorBoard from training (one short cnn run in this process) ----------------------------

TB_EPOCHS = 2
KILLED_UNITS = 4  # conv2 units whose bias the test drives to -1e4 at the very last batch: dead at the last summary


class KillConv2Units(keras.callbacks.Callback):
    """After the last batch (before pipeline.train's epoch-end callbacks) make some conv2 units dead."""

    def __init__(self, last_batch: int):
        super().__init__()
        self.last_batch, self.epoch = last_batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == TB_EPOCHS - 1 and batch == self.last_batch:
            bias = self.model.get_layer("conv2").bias
            value = np.asarray(bias).copy()
            value[:KILLED_UNITS] = -1e4
            bias.assign(value)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb_run")
    splits = write_data(tmp / "data")
    overrides = {**SMALL_CNN, "epochs": TB_EPOCHS}
    # float32: the dead-ReLU test counts again on the returned float32 model; a run trained in bf16 (auto on a
    # CPU with bf16 instructions) counts in bf16, where a unit whose output is near 0 can land on either side
    params = params_with("cnn", **overrides, precision="float32")
    steps = -(-len(splits["train"].y) // overrides["batch_size"])
    try:
        result = train_model(
            "cnn",
            params.model("cnn"),
            params.seed,
            params.train,
            splits,
            tmp / "data",
            tmp / "resume",
            callbacks=[KillConv2Units(steps - 1)],
        )
    finally:
        tf_config.disable_op_determinism()
    return artifacts.live_tensorboard(tmp / "resume"), result, splits, params


def accumulator(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def tags_of(acc: EventAccumulator, plugin: str) -> set[str]:
    return {tag for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == plugin}


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def test_tensorboard_has_epoch_loss_accuracy_and_learning_rate(tb_run):
    tb, result, _, _ = tb_run
    train, val = accumulator(tb / "train"), accumulator(tb / "validation")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= tags_of(train, "scalars")
    assert {"epoch_loss", "epoch_accuracy"} <= tags_of(val, "scalars")
    history = result.history
    for acc, prefix in ((train, ""), (val, "val_")):
        for metric in ("loss", "accuracy"):
            logged = scalars(acc, f"epoch_{metric}")
            assert sorted(logged) == list(range(TB_EPOCHS))
            assert [logged[s] for s in range(TB_EPOCHS)] == pytest.approx(history[prefix + metric], rel=1e-5)
    rates = scalars(train, "epoch_learning_rate")
    assert [rates[s] for s in range(TB_EPOCHS)] == pytest.approx(history["learning_rate"], rel=1e-5)
    assert rates[1] < rates[0]  # the cnn's cosine schedule


def test_tensorboard_has_weight_histograms_of_every_layer(tb_run):
    tb, result, _, _ = tb_run
    histograms = tags_of(accumulator(tb / "train"), "histograms")
    for layer in ("conv1", "conv2", "conv3", "dense", "logits"):
        for weight in ("kernel", "bias"):
            assert any(f"{layer}/{weight}" in tag for tag in histograms), (layer, weight, sorted(histograms))
    assert len(histograms) >= len(result.model.trainable_weights)
    acc = accumulator(tb / "train")
    assert all(len(acc.Tensors(tag)) == TB_EPOCHS for tag in histograms)  # one per epoch


def markdown_rows(table: str) -> dict[str, str]:
    """A two-column markdown table (header, rule, rows) as {first cell: second cell}, cells stripped."""
    lines = table.strip().splitlines()
    assert len(lines) > 2 and set(lines[1]) <= set("|-: "), table
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == 2 for row in cells), table
    return dict(cells)


def test_tensorboard_has_the_model_text(tb_run):
    tb, result, _, params = tb_run
    acc = accumulator(tb / "train")
    assert {"model/layers", "model/params"} <= tags_of(acc, "text")
    layers_md = tf.make_ndarray(acc.Tensors("model/layers")[0].tensor_proto).item().decode()
    params_md = tf.make_ndarray(acc.Tensors("model/params")[0].tensor_proto).item().decode()
    assert f"{result.model.count_params():,}" in layers_md
    assert "conv1" in layers_md and "logits" in layers_md
    table = markdown_rows(params_md)
    assert table["learning_rate"] == str(params.model("cnn").learning_rate) == "0.0015"
    assert table["filters"] == str(params.model("cnn").filters) == str(SMALL_CNN["filters"])
    assert table["optimizer"] == "rmsprop" and table["rho"] == "0.9"
    assert set(table) == set(params.model("cnn").model_dump())  # every knob of the block, and only those


def test_tensorboard_has_dead_relu_fractions_of_every_relu_layer(tb_run):
    tb, result, splits, _ = tb_run
    acc = accumulator(tb / "train")
    relu_layers = ["conv1", "conv2", "conv3", "dense"]
    assert {f"dead_relu/{name}" for name in relu_layers} <= tags_of(acc, "scalars")
    # the last summary matches the final model, counted here on the same probe images
    model = result.model
    probe = keras.Model(model.inputs[0], [model.get_layer(name).output for name in relu_layers])
    outputs = probe(splits["val"].x[:DEAD_RELU_PROBE].astype(np.float32), training=False)
    for name, out in zip(relu_layers, outputs):
        logged = scalars(acc, f"dead_relu/{name}")
        assert sorted(logged) == list(range(TB_EPOCHS))
        assert all(0.0 <= v <= 1.0 for v in logged.values())
        out = np.asarray(out)
        per_unit = out.reshape(-1, out.shape[-1]).max(axis=0)
        assert logged[TB_EPOCHS - 1] == pytest.approx(float((per_unit <= 0).mean()))
    conv2 = scalars(acc, "dead_relu/conv2")
    filters = SMALL_CNN["filters"][1]
    assert conv2[TB_EPOCHS - 1] >= KILLED_UNITS / filters  # the units killed before the last summary count
    assert conv2[0] < KILLED_UNITS / filters


# --- the course's tutorials ----------------------------------------------------------------------


def test_multiply():
    assert float(tutorials.multiply(tf.constant(1.0), tf.constant(2.0))) == 2.0
    assert float(tutorials.multiply(tf.constant(3.0), tf.constant(3.0))) == 9.0


def test_fit_line_recovers_the_slope():
    x, y = tutorials.noisy_line()
    p = LinearParams(
        optimizer="sgd",
        learning_rate=0.01,
        batch_size=1,
        epochs=20,
        lr_schedule="constant",
        init="normal",
        l2=0.0,
        precision="float32",
    )
    w = tutorials.fit_line(x, y, p, seed=1337)
    least_squares = float(np.dot(x, y) / np.dot(x, x))
    assert abs(w - 2.0) < 0.1
    assert abs(w - least_squares) < 0.05


# --- the optimizer and its own knob ------------------------------------------------------------


def test_each_optimizer_gets_its_own_knob():
    cnn = params_with("cnn").model("cnn")
    rmsprop = make_optimizer(cnn, steps_per_epoch=10)
    assert isinstance(rmsprop, keras.optimizers.RMSprop) and rmsprop.rho == pytest.approx(0.9)
    assert make_optimizer(cnn.model_copy(update={"rho": 0.5}), 10).rho == pytest.approx(0.5)
    momentum = make_optimizer(params_with("mlp", optimizer="momentum", momentum=0.7).model("mlp"), 10)
    assert type(momentum) is keras.optimizers.SGD and momentum.momentum == pytest.approx(0.7)
    sgd = make_optimizer(params_with("mlp", optimizer="sgd").model("mlp"), 10)
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0.0
    assert isinstance(make_optimizer(params_with("mlp").model("mlp"), 10), keras.optimizers.Adam)
