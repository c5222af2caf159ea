"""`mnist predict` and newest_saved_model: classify PNG and IDX files with an exported SavedModel."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import PYTHON, REPO, learnable_splits, raw_params, train_tiny
from pipeline import artifacts, cli, export, serving
from pipeline.data import write_idx
from pipeline.errors import PipelineError

LINE = re.compile(r"^(?P<label>.+): (?P<digit>\d) \(probability (?P<p>[01]\.\d{4})\)$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A SavedModel of a tiny logreg, as the export stage writes it, and `other`: the same model
    with its classes shifted by one, so that every prediction of the two differs."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("cli")
    splits = learnable_splits(seed=0)
    model = artifacts.read_model(train_tiny("logreg", splits, root / "models" / "logreg"))
    saved_model = root / "export" / artifacts.SAVED_MODEL
    export.save_servable(model, saved_model)
    model.set_weights([np.roll(w, 1, axis=-1) if w.shape[-1:] == (10,) else w for w in model.get_weights()])
    other = root / "other"
    export.save_servable(model, other)
    return {
        "saved_model": saved_model,
        "loaded": tf.saved_model.load(str(saved_model)),
        "other": other,
        "loaded_other": tf.saved_model.load(str(other)),
        "test": splits["test"],
    }


def make_project(root, exported, serving_base: str = "data/serving"):
    """A project folder: params.yaml (serving.base edited) and data/export/logreg/saved_model/."""
    root.mkdir(parents=True)
    raw = raw_params()
    raw["serving"]["base"] = serving_base
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(exported["saved_model"], root / "data" / "export" / "logreg" / artifacts.SAVED_MODEL)
    return root


def write_png(path, image: np.ndarray):
    import tensorflow as tf

    path.write_bytes(tf.io.encode_png(image[:, :, None]).numpy())
    return path


def expected_line(loaded, image: np.ndarray) -> tuple[int, float]:
    """The SavedModel's own digit and probability for one image."""
    out = export.predict(loaded, image)
    digit = int(out["class"][0])
    return digit, float(out["probabilities"][0, digit])


def parse(stdout: str) -> list[tuple[str, int, float]]:
    parsed = []
    for line in stdout.strip().splitlines():
        m = LINE.match(line)
        assert m, f"not '<file>: <digit> (probability p)': {line!r}"
        parsed.append((m["label"], int(m["digit"]), float(m["p"])))
    return parsed


def predict(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def smooth_digit() -> np.ndarray:
    """A ring, blurred: a 28x28 image that survives a 2x up- and down-scaling almost unchanged."""
    yy, xx = np.mgrid[0:28, 0:28]
    r = np.hypot(yy - 14, xx - 13)
    return (255 * np.exp(-(((r - 7) / 2.5) ** 2))).astype(np.uint8)


def test_predict_a_28x28_png(exported, capsys, tmp_path):
    image = exported["test"].x[0]
    png = write_png(tmp_path / "digit.png", image)
    code, out, err = predict(capsys, str(png), "--saved-model", str(exported["saved_model"]))
    assert code == 0, err
    digit, p = expected_line(exported["loaded"], image)
    assert out == f"{png}: {digit} (probability {p:.4f})\n"
    assert parse(out) == [(str(png), digit, pytest.approx(p, abs=1e-4))]


def test_predict_resizes_a_56x56_png(exported, capsys, tmp_path):
    small = smooth_digit()
    png = write_png(tmp_path / "big.png", np.kron(small, np.ones((2, 2), dtype=np.uint8)))
    read = cli.read_images(png, invert=False)
    assert read.shape == (1, 28, 28) and read.dtype == np.uint8
    assert np.abs(read[0].astype(int) - small.astype(int)).mean() < 8  # the same picture, at 28x28
    code, out, err = predict(capsys, str(png), "--saved-model", str(exported["saved_model"]))
    assert code == 0, err
    digit, p = expected_line(exported["loaded"], read[0])
    assert out == f"{png}: {digit} (probability {p:.4f})\n"


def test_predict_inverts_dark_on_light_digits(exported, capsys, tmp_path):
    image = exported["test"].x[1]
    png = write_png(tmp_path / "dark.png", 255 - image)
    code, out, err = predict(capsys, str(png), "--invert", "--saved-model", str(exported["saved_model"]))
    assert code == 0, err
    digit, p = expected_line(exported["loaded"], image)
    assert out == f"{png}: {digit} (probability {p:.4f})\n"


def test_predict_an_idx_file_prints_one_line_per_image(exported, capsys, tmp_path):
    images = exported["test"].x[:3]
    idx = tmp_path / "three-images-idx3-ubyte"
    idx.write_bytes(write_idx(images))
    code, out, err = predict(capsys, str(idx), "--saved-model", str(exported["saved_model"]))
    assert code == 0, err
    expected = export.predict(exported["loaded"], images)
    lines = parse(out)
    assert len(lines) == 3
    for i, (label, digit, p) in enumerate(lines):
        assert label == f"{idx}[{i}]"
        assert digit == expected["class"][i]
        assert p == pytest.approx(expected["probabilities"][i, digit], abs=1e-4)


def test_predict_several_files_in_order(exported, capsys, tmp_path):
    a = write_png(tmp_path / "a.png", exported["test"].x[2])
    b = write_png(tmp_path / "b.png", exported["test"].x[3])
    code, out, err = predict(capsys, str(a), str(b), "--saved-model", str(exported["saved_model"]))
    assert code == 0, err
    assert [label for label, _, _ in parse(out)] == [str(a), str(b)]


def test_predict_uses_the_export_then_the_newest_published_version(exported, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path / "project", exported))  # params.yaml and data/ are relative to it
    image = exported["test"].x[4]
    png = write_png(tmp_path / "d.png", image)
    mine, others = expected_line(exported["loaded"], image), expected_line(exported["loaded_other"], image)
    assert mine[0] != others[0]

    code, out, err = predict(capsys, str(png), "--model", "logreg")  # nothing published yet: the export
    assert code == 0, err
    assert out == f"{png}: {mine[0]} (probability {mine[1]:.4f})\n"

    serving.publish("logreg", exported["other"], tmp_path / "project" / "data" / "serving" / "logreg", keep=3)
    code, out, err = predict(capsys, str(png), "--model", "logreg")  # data/serving/logreg/1
    assert code == 0, err
    assert out == f"{png}: {others[0]} (probability {others[1]:.4f})\n"

    code, out, err = predict(capsys, str(png), "--model", "cnn")  # nothing exported for cnn here
    assert code == 1 and out == ""
    assert err.startswith("error: No SavedModel of cnn in data/serving/cnn/ or data/export/cnn/saved_model/")


def test_predict_reads_the_serving_folder_from_params(exported, capsys, tmp_path, monkeypatch):
    """--params: its serving.base, not the project's, is where the versions are."""
    published = tmp_path / "elsewhere" / "models"
    serving.publish("logreg", exported["other"], published / "logreg", keep=3)
    other_params = make_project(tmp_path / "other-params", exported, serving_base=str(published)) / "params.yaml"
    monkeypatch.chdir(make_project(tmp_path / "project", exported))
    image = exported["test"].x[6]
    png = write_png(tmp_path / "e.png", image)

    code, out, err = predict(capsys, str(png), "--model", "logreg")  # ./params.yaml: data/serving, empty
    assert code == 0, err
    digit, p = expected_line(exported["loaded"], image)
    assert out == f"{png}: {digit} (probability {p:.4f})\n"

    code, out, err = predict(capsys, str(png), "--model", "logreg", "--params", str(other_params))
    assert code == 0, err
    digit, p = expected_line(exported["loaded_other"], image)
    assert out == f"{png}: {digit} (probability {p:.4f})\n"


def test_predict_with_a_missing_params_file_is_one_error_line(exported, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    png = write_png(tmp_path / "f.png", exported["test"].x[7])
    code, out, err = predict(capsys, str(png), "--model", "logreg")
    assert code == 1 and out == ""
    assert err.startswith("error: params.yaml not found") and "Traceback" not in err
    code, out, err = predict(capsys, str(png), "--model", "logreg", "--params", "other.yaml")
    assert code == 1 and err.startswith("error: other.yaml not found")

    code, out, err = predict(capsys, str(png), "--saved-model", str(exported["saved_model"]))  # needs no params
    assert code == 0, err
    digit, p = expected_line(exported["loaded"], exported["test"].x[7])
    assert out == f"{png}: {digit} (probability {p:.4f})\n"


def test_predict_in_a_subprocess_prints_then_stops_at_a_missing_file(exported, tmp_path):
    """As a user runs it: a line for the good PNG, then one error line and status 1 for the missing one."""
    image = exported["test"].x[5]
    png = write_png(tmp_path / "five.png", image)
    missing = tmp_path / "nothing.png"
    done = subprocess.run(
        [str(PYTHON), "-m", "pipeline.cli", "predict", str(png), str(missing), "--saved-model", str(exported["saved_model"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    digit, p = expected_line(exported["loaded"], image)
    assert done.stdout == f"{png}: {digit} (probability {p:.4f})\n", done.stderr[-3000:]
    assert done.returncode == 1
    assert f"error: {missing} does not exist." in done.stderr
    assert "Traceback" not in done.stderr


# --- mistakes: one line, exit status 1, no traceback -------------------------------------------


def bad_inputs(tmp_path) -> dict:
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "labels-idx1-ubyte").write_bytes(write_idx(np.arange(5, dtype=np.uint8)))
    (tmp_path / "small-idx3-ubyte").write_bytes(write_idx(np.ones((2, 20, 20), dtype=np.uint8)))
    return {
        "missing": (tmp_path / "missing.png", "does not exist"),
        "text": (tmp_path / "notes.txt", "is neither a PNG nor an IDX image file"),
        "label IDX": (tmp_path / "labels-idx1-ubyte", "not an IDX file of 3-dimensional unsigned bytes"),
        "20x20 IDX": (tmp_path / "small-idx3-ubyte", "shape [batch, 28, 28], not [2, 20, 20]"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "label IDX", "20x20 IDX"])
def test_predict_reports_a_bad_file_in_one_line(exported, capsys, tmp_path, case):
    path, message = bad_inputs(tmp_path)[case]
    code, out, err = predict(capsys, str(path), "--saved-model", str(exported["saved_model"]))
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert path.name in err


def test_predict_names_the_file_whose_images_are_not_28x28(exported, capsys, tmp_path):
    path, _ = bad_inputs(tmp_path)["20x20 IDX"]
    code, _, err = predict(capsys, str(path), "--saved-model", str(exported["saved_model"]))
    assert code == 1 and path.name in err


def test_predict_reports_a_corrupt_png_in_one_line(exported, capsys, tmp_path):
    import tensorflow as tf

    png = tmp_path / "cut.png"
    png.write_bytes(tf.io.encode_png(exported["test"].x[0][:, :, None]).numpy()[:40])  # the PNG signature, then garbage
    code, out, err = predict(capsys, str(png), "--saved-model", str(exported["saved_model"]))
    assert code == 1 and out == ""
    assert err.startswith("error: ") and "cut.png" in err


PNG_CAP_BYTES, PNG_CAP_PIXELS = 32 << 20, 1 << 25  # cli.MAX_PNG_BYTES and MAX_PNG_PIXELS: a digit at 8192x4096 fits


def test_predict_refuses_a_png_of_more_pixels_than_it_decodes_from_its_header(exported, capsys, tmp_path):
    """6000x6000 pixels (36 MP, under TensorFlow's own 2^29 but over 2^25): refused from the IHDR header, before
    TensorFlow decodes 36 MB and resizes 144 MB of floats; the other files of the command are not read either."""
    big = write_png(tmp_path / "poster.png", np.zeros((6000, 6000), dtype=np.uint8))
    assert big.stat().st_size < PNG_CAP_BYTES  # zeros compress: the pixel count alone is over
    code, out, err = predict(capsys, str(big), "--saved-model", str(exported["saved_model"]))
    assert code == 1 and out == "", out
    assert err == (
        f"error: {big} is a PNG of 6000x6000 pixels; `mnist predict` decodes up to {PNG_CAP_PIXELS:,} pixels: "
        "scale the image down (the model sees 28x28 pixels).\n"
    ), err


def test_predict_refuses_a_png_file_larger_than_it_reads(exported, capsys, tmp_path):
    """A 28x28 PNG padded past 32 MiB after its end (decoders ignore what follows IEND): refused by its size."""
    png = write_png(tmp_path / "padded.png", exported["test"].x[0])
    with open(png, "r+b") as f:
        f.truncate(PNG_CAP_BYTES + 1)  # sparse: nothing is written to the disk
    code, out, err = predict(capsys, str(png), "--saved-model", str(exported["saved_model"]))
    assert code == 1 and out == "", out
    assert (
        f"error: {png} is a PNG of {PNG_CAP_BYTES + 1:,} bytes; `mnist predict` reads PNGs of up to {PNG_CAP_BYTES:,} bytes"
        in err
    ), err
    assert "Traceback" not in err


# --- newest_saved_model: the newest published version, else the export, else an error -----------


def serving_and_exports(tmp_path, model: str, setup: str):
    """A serving base and an export root; the serving folder of `model` as `setup` says, with no version in it."""
    base, exports = tmp_path / "serving", tmp_path / "export"
    if setup != "no folder":
        (base / model).mkdir(parents=True)
    if setup == "only leftovers":
        (base / model / ".tmp-4").mkdir()  # a version being copied in
        (base / model / ".tmp-old-2").mkdir()  # a version being deleted
        (base / model / "3").write_text("a file, not a version")
    return base, exports


def test_newest_saved_model_is_the_highest_published_version(tmp_path):
    base, exports = tmp_path / "serving", tmp_path / "export"
    for name in ("9", "10", "100", ".tmp-101", ".tmp-old-8", "latest", "99a"):
        (base / "cnn" / name).mkdir(parents=True)
    (base / "cnn" / "200").write_text("a file, not a version")
    (exports / "cnn" / artifacts.SAVED_MODEL).mkdir(parents=True)  # published versions come first
    assert cli.newest_saved_model("cnn", base, exports) == base / "cnn" / "100"  # numerically ("9" > "100" as text)
    (base / "cnn" / "100").rmdir()
    assert cli.newest_saved_model("cnn", base, exports) == base / "cnn" / "10"


@pytest.mark.parametrize("setup", ["no folder", "empty folder", "only leftovers"])
def test_newest_saved_model_without_a_version_is_the_export(tmp_path, setup):
    base, exports = serving_and_exports(tmp_path, "cnn", setup)
    (exports / "cnn" / artifacts.SAVED_MODEL).mkdir(parents=True)
    (exports / "cnn" / ".tmp-saved_model").mkdir()  # an interrupted export is never taken
    assert cli.newest_saved_model("cnn", base, exports) == exports / "cnn" / artifacts.SAVED_MODEL


@pytest.mark.parametrize("setup", ["no folder", "empty folder", "only leftovers"])
def test_newest_saved_model_without_either_is_a_clear_error(tmp_path, setup):
    base, exports = serving_and_exports(tmp_path, "mlp", setup)
    (exports / "mlp" / ".tmp-saved_model").mkdir(parents=True)  # an interrupted export is no SavedModel
    artifacts.write_export_record(exports / "mlp", {"model": "mlp", "blessed": False})
    with pytest.raises(PipelineError) as info:
        cli.newest_saved_model("mlp", base, exports)
    message = str(info.value)
    assert f"No SavedModel of mlp in {base / 'mlp'}/ or {exports / 'mlp' / artifacts.SAVED_MODEL}/" in message
    assert f"{exports / 'mlp' / artifacts.EXPORT_RECORD}" in message and "quality gate" in message
    assert "dvc pull" in message


def test_newest_saved_model_defaults_to_the_export_stage_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "export" / "cnn" / artifacts.SAVED_MODEL).mkdir(parents=True)
    assert cli.EXPORT_ROOT == Path("data/export")
    assert cli.newest_saved_model("cnn", tmp_path / "serving") == Path("data/export/cnn/saved_model")


@pytest.mark.parametrize(
    "argv, dvc_cmd",
    [
        (["run"], ["dvc", "repro"]),
        (["run", "--force"], ["dvc", "repro", "--force"]),
        (["run", "-f", "train@cnn"], ["dvc", "repro", "-f", "train@cnn"]),
        (["run", "train@cnn", "--force"], ["dvc", "repro", "train@cnn", "--force"]),
        (["run", "--cold", "--force"], ["dvc", "repro", "--force"]),
        (["run", "--force", "--cold"], ["dvc", "repro", "--force"]),
    ],
)
def test_run_passes_its_arguments_to_dvc_repro(monkeypatch: pytest.MonkeyPatch, argv: list[str], dvc_cmd: list[str]) -> None:
    called = []
    monkeypatch.setattr(cli, "_run_with_prefect", lambda cmd, warm_starts, progress=None: called.append((cmd, warm_starts)) or 0)
    assert cli.main(argv) == 0
    assert called == [(dvc_cmd, "--cold" not in argv)]


def test_unknown_options_of_other_commands_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["describe", "--bogus"])
    assert exit_info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_dashboards_beyond_loopback_need_the_auth_string(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, host: str
) -> None:
    started = []
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    monkeypatch.setattr(cli.servers, "prefect_server", lambda *a, **k: started.append(a))
    assert cli.main(["dashboards", "--host", host]) == 1
    assert "PREFECT_SERVER_API_AUTH_STRING" in capsys.readouterr().err
    assert not started, "a server was started without authentication beyond loopback"


def test_dashboards_beyond_loopback_keep_tensorboard_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the Prefect server, which asks for the auth string, is reachable from other machines."""
    hosts: dict[str, str] = {}

    @contextlib.contextmanager
    def prefect_server(host, port, **options):
        hosts["prefect"] = host
        yield f"http://{host}:{port}/api"

    def tensorboard_server(logdir, host, port, **options):
        hosts["tensorboard"] = host
        raise PipelineError("stopped here: nothing is started in this test")

    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "mnist:a-long-secret")
    monkeypatch.setattr(cli.servers, "prefect_server", prefect_server)
    monkeypatch.setattr(cli.servers, "tensorboard_server", tensorboard_server)
    assert cli.main(["dashboards", "--host", "0.0.0.0"]) == 1
    assert hosts == {"prefect": "0.0.0.0", "tensorboard": "127.0.0.1"}


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.5", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("build-host", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert cli.servers.is_loopback(host) is loopback


def test_flow_on_a_work_pool_needs_a_prefect_server(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    called = []
    monkeypatch.setattr(cli, "check_prefect_api", lambda: None)
    monkeypatch.setattr(cli, "_run_with_prefect", lambda cmd: called.append(cmd) or 0)
    assert cli.main(["flow", "--work-pool", "pool"]) == 1
    assert "PREFECT_API_URL" in capsys.readouterr().err and not called


def test_dashboards_refuse_a_database_password_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    started = []
    monkeypatch.setattr(cli.servers, "prefect_server", lambda *a, **k: started.append(a))
    assert cli.main(["dashboards", "--database-url", "postgresql+asyncpg://prefect:s3cret@db:5432/prefect"]) == 1
    err = capsys.readouterr().err
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" in err and "s3cret" not in err and "Traceback" not in err
    assert not started


def test_run_checks_params_before_dvc_builds_a_stage_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """dvc.yaml puts each model's name into a shell command: `mnist run` refuses a bad one before DVC starts."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["models"]["cnn; touch pwned"] = raw["models"].pop("cnn")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(cli, "_run_with_prefect", lambda *a, **k: started.append(a) or 0)
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert "cnn; touch pwned" in err and "Traceback" not in err and not started
