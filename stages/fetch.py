"""DVC stage `fetch`: download the four MNIST files, verified, into --out."""

from __future__ import annotations

from pathlib import Path

# pipeline.stage first: it stops on a bad PREFECT_* setting, naming it, before Prefect's flows load.
from pipeline.stage import as_task, run_stage

# isort: split

from prefect import flow, get_run_logger
from prefect.tasks import exponential_backoff

from pipeline import fetch
from pipeline.config import Params
from pipeline.data import remove_leftovers
from pipeline.errors import redact_url
from pipeline.mnist import FILES


@flow(name="fetch")
def fetch_flow(params: Params, out: Path, tensorboard: Path) -> None:
    """Fetch the four MNIST files from the first mirror that serves each one verified.

    Args:
        params: params.yaml, validated
        out: folder for the decompressed IDX files
        tensorboard: TensorBoard run folder
    """
    mirrors = fetch.mirrors_to_try(params.fetch)
    get_run_logger().info("mirrors, in order: %s", ", ".join(map(redact_url, mirrors)))
    pool = fetch.http_pool(params.fetch)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    backoff = exponential_backoff(backoff_factor=params.fetch.backoff_s) if params.fetch.backoff_s else 0
    fetched = [
        as_task(fetch.fetch_file, f"fetch {name}", retries=params.fetch.retries, retry_delay_seconds=backoff)(
            name, mirrors, out, pool
        )
        for name in FILES
    ]
    as_task(fetch.write_summaries, "tensorboard")(fetched, tensorboard)


if __name__ == "__main__":
    run_stage(fetch_flow)
