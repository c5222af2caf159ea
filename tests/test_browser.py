"""The dashboards in a real browser: Debian's headless chromium, driven by Playwright."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest

from conftest import BIN, SmallRun, free_port, project_env
from system import needs

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

pytestmark = needs("chromium")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def test_prefect_dashboard_lists_the_stage_runs(small_run: SmallRun, prefect_api: str, browser) -> None:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(prefect_api.removesuffix("/api") + "/runs", wait_until="domcontentloaded")
    for name in ("report", "export-cnn", "evaluate-cnn", "train-cnn"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    page.close()


def test_tensorboard_shows_every_model_and_the_hparams_table(small_run: SmallRun, browser) -> None:
    from pipeline.servers import tensorboard_server

    logdir = small_run.project / "data" / "tensorboard"
    with tensorboard_server(logdir, "127.0.0.1", free_port(), log=small_run.project.parent / "tensorboard.log") as url:
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(f"{url}/?runFilter=train#timeseries", wait_until="domcontentloaded")
        for model in small_run.models():
            page.get_by_text(f"train/{model}/validation", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("epoch_accuracy").first.wait_for(timeout=60_000)  # a scalar chart card

        page.goto(f"{url}/#hparams", wait_until="domcontentloaded")
        page.get_by_text("test accuracy").first.wait_for(timeout=60_000)  # a metric column of the table
        deadline = time.monotonic() + 60  # the table fills in after the filters
        for model in small_run.models():
            # the model filter, and in the table the trial id and the `model` hparam of its row
            cell = page.get_by_text(model, exact=True)
            while cell.count() < 3 and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            assert cell.count() >= 3, (model, cell.count())
        page.close()


# --- every TensorBoard plugin the pipeline writes for, in `mnist dashboards` and `mnist compare` ------------

PLUGINS = (
    "timeseries",
    "scalars",
    "images",
    "histograms",
    "distributions",
    "graphs",
    "text",
    "pr_curves",
    "hparams",
    "projector",
)


def serve(command: list[str], cwd: Path, log: Path, ready: str, env: dict | None = None) -> subprocess.Popen:
    """Start `command` in `cwd` (the project copy's `pipeline`), its output in `log`; return once it printed `ready`."""
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, cwd=cwd, env={**(env or project_env()), "PYTHONPATH": str(cwd)}, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 300
    while ready not in log.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            server.terminate()
            raise AssertionError(f"{' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return server


def ended(server: subprocess.Popen, log: Path) -> None:
    server.terminate()
    assert server.wait(timeout=60) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def dashboards(small_run: SmallRun, prefect_api: str, tmp_path_factory: pytest.TempPathFactory):
    """`mnist dashboards` in the small run's project: the URL of its TensorBoard. It shares the session's Prefect
    server (this project's, so recorded under PREFECT_HOME), or, where a developer gave another one, starts its own."""
    from pipeline import localserver

    env, prefect_port = project_env(), urlsplit(prefect_api).port
    if localserver.ours(prefect_port) is None:
        env["PREFECT_HOME"], prefect_port = str(tmp_path_factory.mktemp("prefect-home")), free_port()
        env.pop("PREFECT_API_URL", None)
    port = free_port()
    log = small_run.project.parent / "dashboards.log"
    server = serve(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "dashboards",
            "--prefect-port",
            str(prefect_port),
            "--tensorboard-port",
            str(port),
        ],
        small_run.project,
        log,
        "Ctrl-C stops both.",
        env,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ended(server, log)


@pytest.fixture(scope="module")
def compared(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory):
    """`mnist compare HEAD` of the small run, committed in a clone of its project that reads the project's DVC
    cache: the URL of its TensorBoard and the run names' prefix."""
    clone = tmp_path_factory.mktemp("compared") / "project"
    subprocess.run(["git", "clone", "-q", str(small_run.project), str(clone)], check=True)
    for name in ("dvc.lock", "params.yaml"):
        shutil.copy2(small_run.project / name, clone / name)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "the small run"], cwd=clone, check=True)
    subprocess.run(
        [str(BIN / "dvc"), "cache", "dir", "--local", str(small_run.project / ".dvc" / "cache")], cwd=clone, check=True
    )
    port, log = free_port(), clone.parent / "compare.log"
    server = serve([str(BIN / "mnist"), "compare", "HEAD", "--port", str(port)], clone, log, "Ctrl-C stops it")
    try:
        yield f"http://127.0.0.1:{port}", "HEAD/"
    finally:
        ended(server, log)


def active_plugins(url: str, timeout_s: float = 90) -> dict[str, bool]:
    """/data/plugins_listing's `enabled`, polled until every plugin of PLUGINS is (the projector finds out
    in a thread of its own, started by the first listing) or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        listing = {name: entry["enabled"] for name, entry in httpx.get(f"{url}/data/plugins_listing").json().items()}
        if all(listing.get(name) for name in PLUGINS) or time.monotonic() > deadline:
            return listing
        time.sleep(1)


def assert_every_plugin_active(url: str) -> None:
    listing = active_plugins(url)
    assert {name: listing.get(name) for name in PLUGINS} == dict.fromkeys(PLUGINS, True), listing


class Responses:
    """The responses a page got from one of TensorBoard's data routes."""

    def __init__(self, page, route: str):
        self.page, self.seen, self.checked = page, [], 0
        page.on("response", lambda r: self.seen.append(r) if route in r.url else None)

    def wait_for(self, run: str, timeout_s: float = 90) -> bytes:
        """The body of the first successful response with data that names `run` (in its URL, form or body)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in self.seen[self.checked :]:
                self.checked += 1
                body = r.body() if r.ok else b""
                if body.strip() in (b"", b"[]", b"{}"):
                    continue
                if run in unquote(r.url) + (r.request.post_data or "") + body.decode("utf-8", "replace"):
                    return body
            self.page.wait_for_timeout(200)  # lets the page's events in while waiting
        raise AssertionError(f"no data for {run} among {[unquote(r.url) for r in self.seen]}")


def visible_text(page, text: str, timeout_ms: float = 60_000) -> None:
    page.get_by_text(text, exact=True).filter(visible=True).first.wait_for(timeout=timeout_ms)


def embedding(small_run: SmallRun, model: str) -> tuple[str, int, int]:
    """The tensor name in the evaluate stage's projector config of `model`, and its points and dimension."""
    run = small_run.project / "data" / "tensorboard" / "evaluate" / model
    name = re.search(r'tensor_name: "([^"]+)"', (run / "projector_config.pbtxt").read_text()).group(1)
    rows = (run / "embedding.tsv").read_text().splitlines()
    return name, len(rows), len(rows[0].split("\t"))


def check_projector(browser, url: str, small_run: SmallRun, prefix: str = "") -> None:
    """Every model's evaluate run has an embedding; the page shows the first one's (its number of points and
    dimension, its tensor) and loads its vectors."""
    runs = httpx.get(f"{url}/data/plugin/projector/runs").json()
    assert sorted(runs) == sorted(f"{prefix}evaluate/{model}" for model in small_run.models()), f"projector runs: {runs}"
    tensor, points, dimension = embedding(small_run, runs[0].removeprefix(f"{prefix}evaluate/"))
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    vectors = Responses(page, "/data/plugin/projector/tensor")
    page.goto(f"{url}/#projector", wait_until="domcontentloaded")
    projector = page.frame_locator("iframe").frame_locator("iframe")  # plugin_entry.html, then projector_binary.html
    for text in (f"Points: {points}", f"Dimension: {dimension}", f"{len(runs)} runs found", "1 tensor found"):
        projector.get_by_text(text, exact=True).first.wait_for(timeout=90_000)
    projector.get_by_text(tensor).first.wait_for(state="attached")  # the tensor menu's item
    assert len(vectors.wait_for(f"run={runs[0]}&name={tensor}")) == points * dimension * 4  # float32
    page.close()


def plugin_pages(url: str, model: str, prefix: str = "") -> dict[str, tuple[str, str, str, list[str]]]:
    """Each plugin's page for `model`'s runs: the URL's tail (the dashboards other than Time Series select
    no run of the 40 and more by default, so a regex selects the model's), the route the page then reads
    data from, the run it must name, and texts the page shows with the data."""
    train, evaluate = f"{prefix}train/{model}/train", f"{prefix}evaluate/{model}"
    weights = sorted(tag for tag in httpx.get(f"{url}/data/plugin/histograms/tags").json()[train] if "kernel" in tag)[0]

    def legacy(plugin: str, run: str, tag: str) -> str:
        return f"#{plugin}&regexInput={quote(re.escape(run), safe='')}&tagFilter={quote(re.escape(tag), safe='')}"

    return {
        "timeseries": (
            f"?runFilter={quote(train)}&tagFilter=epoch_accuracy#timeseries",
            "/timeseries/timeSeries",
            train,
            ["epoch_accuracy", "Value"],
        ),
        "scalars": (legacy("scalars", train, "epoch_accuracy"), "/scalars/scalars_multirun", train, ["tag: epoch_accuracy"]),
        "images": (legacy("images", evaluate, "confusion_matrix"), "/images/images", evaluate, ["tag: confusion_matrix"]),
        "histograms": (legacy("histograms", train, weights), "/histograms/histograms", train, [f"tag: {weights}"]),
        "distributions": (legacy("distributions", train, weights), "/distributions/distributions", train, [f"tag: {weights}"]),
        "graphs": ("#graphs", "/graphs/graph", f"{prefix}train/", ["Main Graph"]),  # the first model's graph
        "text": (legacy("text", evaluate, "per_class"), "/text/text", evaluate, ["tag: per_class", "precision"]),
        "pr_curves": (legacy("pr_curves", evaluate, "pr_curve/digit_0"), "/pr_curves/pr_curves", evaluate, ["pr_curve/digit_0"]),
        "hparams": ("#hparams", "/hparams/session_groups", f"{prefix}{model}" if prefix else model, ["test accuracy"]),
    }


def check_plugin_pages(browser, url: str, small_run: SmallRun, prefix: str = "") -> None:
    """Each plugin's page, in a page of its own, reads the model's data and shows it."""
    for plugin, (tail, route, run, texts) in plugin_pages(url, small_run.models()[0], prefix).items():
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        data = Responses(page, route)
        page.goto(f"{url}/{tail}", wait_until="domcontentloaded")
        try:
            data.wait_for(run)
            for text in texts:
                visible_text(page, text)
        except Exception as e:
            raise AssertionError(f"{plugin}: {e}") from e
        finally:
            page.close()


def test_dashboards_tensorboard_links_runs_made_after_its_start_and_is_not_shared(tmp_path: Path) -> None:
    """The dashboards' TensorBoard serves one folder of links (the projector reads --logdir only): a stage's
    first run and a training's live folder made after it started show up; a second server on the same
    port's links is refused, and the links are gone once it stops."""
    from pipeline import artifacts
    from pipeline.errors import PipelineError
    from pipeline.servers import tensorboard_server
    from test_tensorboard import runs_when, write_run

    logdir, resume, port = tmp_path / "data" / "tensorboard", tmp_path / "data" / "resume", free_port()
    write_run(logdir / "train" / "cnn" / "train", 0.5)
    with tensorboard_server(logdir, "127.0.0.1", port, live=resume) as url:
        write_run(logdir / "report" / "cnn", 1.0)
        write_run(artifacts.live_tensorboard(resume / "mlp") / "train", 2.0)
        runs = runs_when(url, lambda r: len(r) >= 3)
        assert sorted(runs) == ["report/cnn", "train/cnn/train", "training/mlp/tensorboard/train"]
        with pytest.raises(PipelineError, match="Another command of this project serves TensorBoard from"):
            with tensorboard_server(logdir, "127.0.0.1", port, live=resume):
                pass
        assert url.endswith(f":{port}") and httpx.get(f"{url}/data/runs").json()  # still served
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_symlink()]


def test_dashboards_tensorboard_has_every_plugin_active(dashboards: str) -> None:
    """`mnist dashboards`: scalars, images, histograms, graphs, text, PR curves, HParams and the projector
    (inactive under --logdir_spec, which the live training runs were served with) all have data."""
    assert_every_plugin_active(dashboards)


def test_dashboards_projector_shows_the_test_embeddings(small_run: SmallRun, dashboards: str, browser) -> None:
    active_plugins(dashboards)
    check_projector(browser, dashboards, small_run)


def test_dashboards_every_plugin_page_shows_the_runs_data(small_run: SmallRun, dashboards: str, browser) -> None:
    check_plugin_pages(browser, dashboards, small_run)


def test_compare_tensorboard_has_every_plugin_and_the_projector_shows_the_embeddings(
    small_run: SmallRun, compared: tuple[str, str], browser
) -> None:
    """`mnist compare` lays the runs out under one --logdir: the projector finds them there too."""
    url, prefix = compared
    assert_every_plugin_active(url)
    check_projector(browser, url, small_run, prefix)
    check_plugin_pages(browser, url, small_run, prefix)
