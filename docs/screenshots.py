"""Take the README's screenshots: after a full run, TensorBoard's HParams table and the Prefect runs page;
after a queued sweep (README, "Experiments"), its `dvc exp show`, TensorBoard over it and the Prefect dashboard.

    python docs/screenshots.py              # needs Debian's chromium and Playwright (in requirements/test.lock)
    python docs/screenshots.py sweep EXP    # in the sweep's project, after `mnist compare --no-serve`; EXP: one experiment's name
    python docs/screenshots.py plugins      # in a project after a run with cnn: each TensorBoard plugin, as `mnist dashboards` shows it

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
from urllib.parse import quote

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
    shown = subprocess.run(
        ["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", columns],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "120"},
    ).stdout
    page_html = Path("data/exp-show.html").resolve()
    page_html.write_text(
        f"<pre style='font: 14px monospace; padding: 12px'>$ dvc exp show --drop '.*' --keep '{columns}'\n{html.escape(shown)}</pre>"
    )
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


MODEL = "cnn"  # whose runs the plugin pictures show: a conv net, with filters, feature maps and a graph of layers
# TensorBoard's older dashboards (all but Time Series) select no run where more than 40 match, as in a full run's 43
OF_MODEL = quote(f"^(train|evaluate)/{MODEL}(/train)?$", safe="")  # so this regex selects MODEL's
PICTURES = {  # picture: (URL tail, a text its page shows once the data is in)
    "tensorboard-accuracy.png": ("?runFilter=train/&tagFilter=^epoch_(accuracy|loss)$#timeseries", "epoch_accuracy"),
    "tensorboard-images.png": (f"#images&regexInput={OF_MODEL}", "tag: confusion_matrix"),
    "tensorboard-histograms.png": (f"#histograms&regexInput={OF_MODEL}&tagFilter=kernel", "Tags matching"),
    "tensorboard-pr-curves.png": (f"#pr_curves&regexInput={OF_MODEL}", "pr_curve/digit_0"),
    "tensorboard-graphs.png": ("#graphs", "Main Graph"),
}


def plugins() -> None:
    """A picture of each TensorBoard plugin with data (docs/tensorboard-*.png), TensorBoard serving the project
    in the working directory, after a run with `MODEL` in it, as `mnist dashboards` does (one --logdir of links)."""
    with servers.tensorboard_server(Path("data/tensorboard"), port=6016, live=Path("data/resume")) as tb:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            for picture, (tail, shown) in PICTURES.items():
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(f"{tb}/{tail}", wait_until="domcontentloaded")
                page.get_by_text(shown).filter(visible=True).first.wait_for(timeout=60_000)
                if picture == "tensorboard-accuracy.png":
                    page.get_by_label("Close side pane").click()
                if picture == "tensorboard-graphs.png":  # open the model's node: its layers
                    page.locator("g.node").filter(has_text=MODEL).first.dblclick()
                page.wait_for_timeout(5000)
                page.screenshot(path=str(DOCS / picture))
                page.close()
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{tb}/#projector", wait_until="domcontentloaded")
            projector = page.frame_locator("iframe").frame_locator("iframe")  # plugin_entry.html, projector_binary.html
            projector.get_by_text("Points:").first.wait_for(timeout=90_000)
            runs = projector.locator("paper-dropdown-menu").filter(has_text="runs found").first
            if runs.locator("input").input_value() != f"evaluate/{MODEL}":
                runs.click()
                projector.get_by_role("option", name=f"evaluate/{MODEL}").first.click()
            page.wait_for_timeout(8000)
            page.screenshot(path=str(DOCS / "tensorboard-projector.png"))
            browser.close()
    print("wrote", ", ".join(f"docs/{name}" for name in [*PICTURES, "tensorboard-projector.png"]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        sweep(sys.argv[2])
    elif sys.argv[1:2] == ["plugins"]:
        plugins()
    else:
        main()
