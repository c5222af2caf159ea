"""A queued sweep and `mnist compare`: two DVC experiments of a small project, queued and run by two
queue workers (`dvc queue start -j 2`) that report to the session's Prefect server, then laid side by side
for TensorBoard from the DVC cache (neither is checked out), read back with TensorBoard's event reader
and shown in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from conftest import BIN, copy_project, dvc, edit_params, free_port, project_env
from sweep import LIVE_METRICS, RATES, Sweep
from system import needs
from test_faults import only_logreg
from test_prefect import flow_runs

MARKER = ".mnist-compare"  # what mnist compare writes into a logdir it lays out (pipeline/compare.py)


def compare(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mnist"), "compare", *args],
        cwd=project,
        env={**project_env(), "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hparams(run: Path, tag: str) -> plugin_data_pb2.HParamsPluginData:
    acc = EventAccumulator(str(run))
    acc.Reload()
    meta = acc.SummaryMetadata(tag)
    assert meta.plugin_data.plugin_name == "hparams", tag
    return plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)


def test_both_experiments_are_in_dvc_exp_show_with_their_metrics(sweep: Sweep) -> None:
    epochs = yaml.safe_load((sweep.project / "params.yaml").read_text())["models"]["logreg"]["epochs"]
    rows = json.loads(dvc(sweep.project, "exp", "show", "--json").stdout)
    found = {exp["name"]: exp for row in rows for exp in (row.get("experiments") or []) for exp in exp["revs"]}
    assert set(found) == set(RATES)
    for name, rate in RATES.items():
        data = found[name]["data"]
        assert data["params"]["params.yaml"]["data"]["models"]["logreg"]["learning_rate"] == rate
        assert data["metrics"]["data/evaluate/logreg/metrics.json"]["data"]["logreg"]["accuracy"] > 0.3
        live = data["metrics"][LIVE_METRICS]["data"]  # DVCLive's values after the last epoch
        assert live["step"] == epochs - 1 and 0.3 < live["eval"]["accuracy"] <= 1, live
        assert live["train"]["learning_rate"] == pytest.approx(rate), live


def test_dvc_exp_show_shows_dvclives_values_while_an_experiment_runs(sweep: Sweep) -> None:
    """Polled while the queue ran: at least one experiment was seen running with its DVCLive metrics.json read
    from its workspace (an experiment runs on for tens of seconds after its training, the polls come every few)."""
    assert sweep.live, "no running experiment showed data/live/logreg/metrics.json in dvc exp show"
    assert set(sweep.live) <= set(RATES) and all(step >= 0 for step in sweep.live.values()), sweep.live


def test_each_queued_experiments_stages_report_to_the_server_tagged_with_its_name(sweep: Sweep) -> None:
    """Both experiments ran at once (-j 2), each stage a flow run on the one server, grouped by the experiment.
    The stages both share (fetch, preprocess) may have been restored from the run-cache the other one had just
    filled: a restored stage runs no flow."""
    shared = {"fetch", "preprocess"}
    stages = {*shared, "train-logreg", "evaluate-logreg", "export-logreg", "report", "publish"}
    spans = {}
    for name in RATES:
        runs = [run for run, _flow in flow_runs(f"experiment:{name}")]
        assert stages - shared <= {r.name for r in runs} <= stages, (name, [r.name for r in runs])
        assert all(f"pipeline-run:exp-{name}" in r.tags and r.state_name == "Completed" for r in runs), name
        spans[name] = (min(r.start_time for r in runs), max(r.end_time for r in runs))
    (start_a, end_a), (start_b, end_b) = spans.values()
    assert start_a < end_b and start_b < end_a, spans  # the two workers overlapped


def test_dvc_plots_diff_overlays_both_experiments_curves(sweep: Sweep) -> None:
    """The train stage's plot and the top-level one over every model (here logreg alone) hold both experiments' points."""
    data = json.loads(dvc(sweep.project, "plots", "diff", *RATES, "--json").stdout)["data"]
    for plot in ("validation-accuracy", "data/live/logreg/plots/metrics/eval/accuracy.tsv"):
        (chart,) = data[plot]
        assert sorted(chart["revisions"]) == sorted(RATES), (plot, chart["revisions"])
        assert {v["rev"] for v in chart["content"]["data"]["values"]} == set(RATES), plot


def test_compare_lays_out_each_experiments_runs_and_one_trial_per_experiment_and_model(sweep: Sweep) -> None:
    done = compare(sweep.project, "--no-serve")
    assert done.returncode == 0, done.stderr[-3000:]
    logdir = sweep.project / "data" / "compare"
    assert sorted(p.name for p in logdir.iterdir() if p.is_dir()) == sorted(RATES)
    assert (logdir / MARKER).is_file()  # laid out by mnist compare: the next one may replace it
    assert [p.name.split(".")[1] for p in logdir.iterdir() if p.is_file() and p.name != MARKER] == ["out"]  # HParams' table
    assert not list(sweep.project.glob("data/.tmp-*"))
    config = hparams(logdir, "_hparams_/experiment").experiment
    experiment = next(h for h in config.hparam_infos if h.name == "experiment")
    assert sorted(v.string_value for v in experiment.domain_discrete.values) == sorted(RATES)
    accuracies = {}
    for name, rate in RATES.items():
        for stage in (
            "fetch/mnist",
            "preprocess/mnist",
            "train/logreg/train",
            "train/logreg/validation",
            "evaluate/logreg",
            "export/logreg",
        ):
            assert list((logdir / name / stage).glob("events.out.tfevents.*")), (name, stage)
        train = EventAccumulator(str(logdir / name / "train" / "logreg" / "validation"))
        train.Reload()
        assert "epoch_accuracy" in train.Tags()["tensors"], train.Tags()
        start = hparams(logdir / name / "report" / "logreg", "_hparams_/session_start_info").session_start_info
        assert start.group_name == f"{name}/logreg"
        assert start.hparams["experiment"].string_value == name
        assert start.hparams["learning_rate"].number_value == pytest.approx(rate)
        trial = EventAccumulator(str(logdir / name / "report" / "logreg"))
        trial.Reload()
        (event,) = trial.Tensors("test/accuracy")
        accuracies[name] = float(tensor_util.make_ndarray(event.tensor_proto))
        shown = json.loads(dvc(sweep.project, "exp", "show", "--json").stdout)
        metrics = next(
            exp["data"]["metrics"]
            for row in shown
            for exp in (row.get("experiments") or [])
            for exp in exp["revs"]
            if exp["name"] == name
        )
        assert accuracies[name] == pytest.approx(
            metrics["data/evaluate/logreg/metrics.json"]["data"]["logreg"]["accuracy"], abs=1e-6
        )
    # the workspace was never switched to an experiment
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=sweep.project, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert head == sweep.baseline


def test_compare_names_an_unknown_experiment_and_keeps_the_logdir_it_had(sweep: Sweep) -> None:
    logdir = sweep.project / "data" / "compare-unknown"
    logdir.mkdir()
    (logdir / MARKER).write_text("")  # as an earlier `mnist compare` left it
    (logdir / "kept").write_text("")
    done = compare(sweep.project, "lr-low", "no-such-exp", "--no-serve", "--logdir", str(logdir))
    assert done.returncode == 1
    assert "no DVC experiment or git revision named no-such-exp" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in logdir.iterdir()) == sorted([MARKER, "kept"])
    shutil.rmtree(logdir)


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A logreg-only small run with its dvc.lock committed: HEAD then names outputs that are in its cache."""
    project = copy_project(tmp_path_factory.mktemp("committed"))
    edit_params(project, only_logreg)
    dvc(project, "repro")
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "the small run"], cwd=project, check=True
    )
    return project


@pytest.mark.parametrize("logdir", ["keepme", "data/serving"])
def test_compare_refuses_a_logdir_it_did_not_lay_out_and_deletes_nothing(committed_run: Path, logdir: str) -> None:
    """`--logdir` naming a folder of the user's own (or the published models) stops with its name; nothing is removed."""
    folder = committed_run / logdir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    done = compare(committed_run, "HEAD", "--no-serve", "--logdir", logdir)
    assert done.returncode != 0, (
        f"exit {done.returncode}; {folder} now holds {sorted(p.name for p in folder.iterdir()) if folder.exists() else 'nothing'}"
    )
    assert f"{logdir} already exists and `mnist compare` did not lay it out (it has no {MARKER} file)" in done.stderr, (
        done.stderr[-2000:]
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert (folder / "notes.txt").read_text() == "mine"


def test_compare_replaces_the_logdir_it_laid_out(committed_run: Path) -> None:
    first = compare(committed_run, "HEAD", "--no-serve", "--logdir", "cmp")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (committed_run / "cmp" / MARKER).is_file() and (committed_run / "cmp" / "HEAD" / "train").is_dir()
    again = compare(committed_run, "HEAD", "--no-serve", "--logdir", "cmp")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (committed_run / "cmp" / MARKER).is_file() and (committed_run / "cmp" / "HEAD" / "train").is_dir()
    assert not list(committed_run.glob(".tmp-cmp-*"))


@needs("chromium")
def test_compare_serves_both_experiments_to_a_browser(sweep: Sweep) -> None:
    """`mnist compare` (serving) in a real browser: both experiments' runs in the run list, both in HParams."""
    from playwright.sync_api import sync_playwright

    from test_browser import ARGS, CHROMIUM

    port = free_port()
    log = sweep.project.parent / "compare.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "mnist"), "compare", "--port", str(port)],
            cwd=sweep.project,
            env={**project_env(), "PYTHONPATH": str(sweep.project)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops it" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/?runFilter=logreg/validation#timeseries", wait_until="domcontentloaded")
            for name in RATES:
                page.get_by_text(f"{name}/train/logreg/validation", exact=True).first.wait_for(timeout=60_000)
            page.goto(f"http://127.0.0.1:{port}/#hparams", wait_until="domcontentloaded")
            for name in RATES:
                page.get_by_text(f"{name}/logreg", exact=True).first.wait_for(timeout=60_000)  # the trial's row
            browser.close()
    finally:
        server.terminate()
        code = server.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "build-host"])
def test_compare_refuses_to_serve_tensorboard_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, host: str
) -> None:
    """TensorBoard has no authentication: `mnist compare --host` takes a loopback address only (servers.is_loopback,
    as `mnist dashboards` keeps its TensorBoard), and says so before laying anything out."""
    from pipeline import cli, compare as compare_module

    calls: list[str] = []

    def tensorboard_server(logdir, host, port, **options):
        calls.append(f"tensorboard on {host}")
        raise cli.PipelineError("stopped here: nothing is started in this test")

    monkeypatch.setattr(compare_module, "gather", lambda *a: calls.append("gather") or {})
    monkeypatch.setattr(cli.servers, "tensorboard_server", tensorboard_server)
    assert cli.main(["compare", "--host", host, "--port", "6123"]) == 1
    err = capsys.readouterr().err
    assert f"--host {host} would let other machines reach TensorBoard, which has no authentication" in err, err
    assert "ssh -L 6123:127.0.0.1:6123" in err and "Traceback" not in err
    assert calls == [], calls
