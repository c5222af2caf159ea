"""Take the README's screenshots after a full run: TensorBoard's HParams table and the Prefect runs page.

    python docs/screenshots.py        # needs Debian's chromium and Playwright (in requirements/test.lock)

TensorBoard is started here over data/tensorboard; the Prefect page is taken from the
server on 127.0.0.1:4200 (started here if none answers, on Prefect's default database).
"""

from __future__ import annotations

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


if __name__ == "__main__":
    main()
