"""Take the README's screenshots: after a full run, TensorBoard's HParams table and the Prefect runs page;
after a queued sweep (README, "Experiments"), its `dvc exp show`, TensorBoard over it and the Prefect dashboard.

    python docs/screenshots.py              # needs Debian's chromium and Playwright (in requirements/test.lock)
    python docs/screenshots.py sweep EXP    # in the sweep's project, after `mnist compare --no-serve`; EXP: one experiment's name

TensorBoard is started here (over data/tensorboard, or data/compare for the sweep); the Prefect
pages are taken from the server on 127.0.0.1:4200 (started here if none answers, on Prefect's
default database).
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from pipeline import servers

DOCS = Path(__file__).resolve().parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def main() -> None:
    with servers.tensorboard_server(Path("data/tensorboard"), port=6016) as tb, servers.prefect_server() as api:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1700, "height": 900})
            page.goto(f"{tb}/#hparams", wait_until="domcontentloaded")
            page.get_by_text("test accuracy").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(DOCS / "hparams.png"))
            page.goto(f"{tb}/?runFilter=train#timeseries", wait_until="domcontentloaded")
            page.get_by_text("epoch_accuracy").first.wait_for(timeout=60_000)
            page.wait_for_timeout(5000)
            page.screenshot(path=str(DOCS / "tensorboard-scalars.png"))
            page.goto(api.removesuffix("/api") + "/runs", wait_until="domcontentloaded")
            page.get_by_text("train-cnn", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(DOCS / "prefect-runs.png"))
            browser.close()
    print("wrote", ", ".join(str(p.relative_to(DOCS.parent)) for p in sorted(DOCS.glob("*.png"))))


def sweep(experiment: str) -> None:
    """The sweep's three screenshots, from the project in the working directory."""
    columns = "Experiment|Created|State|cnn.accuracy|cnn.loss|models.cnn.learning_rate"
    shown = subprocess.run(["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", columns],
                           capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    page_html = Path("data/exp-show.html").resolve()
    page_html.write_text(f"<pre style='font: 14px monospace; padding: 12px'>$ dvc exp show --drop '.*' --keep '{columns}'\n{html.escape(shown)}</pre>")
    with servers.tensorboard_server(Path("data/compare"), port=6016) as tb, servers.prefect_server() as api:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 330})
            page.goto(page_html.as_uri())
            page.screenshot(path=str(DOCS / "sweep-exp-show.png"))
            page = browser.new_page(viewport={"width": 1700, "height": 900})
            page.goto(f"{tb}/#hparams", wait_until="domcontentloaded")
            page.get_by_text(f"{experiment}/cnn").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(DOCS / "sweep-tensorboard.png"))
            page.goto(api.removesuffix("/api") + f"/runs?tag=experiment:{experiment}", wait_until="domcontentloaded")
            page.get_by_text(f"pipeline-run:exp-{experiment}").first.wait_for(timeout=60_000)
            page.wait_for_timeout(5000)
            page.screenshot(path=str(DOCS / "sweep-prefect.png"))
            browser.close()
    page_html.unlink()
    print("wrote", ", ".join(f"docs/sweep-{name}.png" for name in ("exp-show", "tensorboard", "prefect")))


if __name__ == "__main__":
    sweep(sys.argv[2]) if sys.argv[1:2] == ["sweep"] else main()
