"""The dashboards in a real browser: Debian's headless chromium, driven by Playwright."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from conftest import SmallRun, free_port
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
