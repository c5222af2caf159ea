"""A pipeline run on the Prefect dashboard, in a real browser: one flow run with its stages nested."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from conftest import REPO, SmallRun
from system import needs
from test_browser import ARGS, CHROMIUM

pytestmark = needs("chromium")
SCREENSHOT = REPO / "docs" / "prefect-run-graph.png"


def test_the_pipeline_run_page_nests_every_stage_run(small_run: SmallRun, prefect_api: str, tmp_path: Path) -> None:
    """The small run (a bare `dvc repro`) has one flow run page; its subflow runs are the stages that ran.
    With MNIST_DOCS_SCREENSHOTS=1 the page's picture also goes to docs/prefect-run-graph.png."""
    from playwright.sync_api import sync_playwright

    with get_client(sync_client=True) as client:
        (parent,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[small_run.run_id])))
    ui = prefect_api.removesuffix("/api")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{ui}/runs/flow-run/{parent.id}", wait_until="domcontentloaded")
        page.get_by_text(small_run.run_id).first.wait_for(timeout=60_000)
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / SCREENSHOT.name))
        if os.environ.get("MNIST_DOCS_SCREENSHOTS"):
            shutil.copy(tmp_path / SCREENSHOT.name, SCREENSHOT)
        page.get_by_text("Subflow Runs", exact=True).first.click()
        page.get_by_text("report", exact=True).first.wait_for(timeout=60_000)  # the newest subflows come first
        search = page.get_by_placeholder("Search by run name")
        for name in ("train-cnn", "evaluate-cnn", "export-cnn", "fetch"):
            search.fill(name)
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        browser.close()
