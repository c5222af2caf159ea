"""The breakdown benchmark (benchmarks/breakdown.py) on the small run's records in the session's Prefect database."""

from __future__ import annotations

import sqlite3

import pytest

from benchmarks.breakdown import CATEGORIES, breakdown, category, database, read_run, totals
from conftest import SmallRun


def test_tasks_fall_in_their_categories() -> None:
    assert category("train", "fit cnn") == "training"
    assert category("evaluate", "predict test set") == "evaluation"
    assert category("evaluate", "tensorboard") == "summaries"
    assert category("evaluate", "draw pictures") == "summaries"
    assert category("export", "verify in fresh process") == "export"
    assert category("preprocess", "check and report") == "data"
    assert category("train", "save model") == "other tasks"


def test_the_small_runs_wall_time_is_split_without_a_gap_or_an_overlap(small_run: SmallRun) -> None:
    """Every second from the first launch to the last flow's end is in exactly one category; each stage
    logged its start-up, cold or warm (the small run has a warm server, ready after its first stages)."""
    with sqlite3.connect(f"file:{database()}?mode=ro", uri=True) as con:
        run_id, flows = read_run(con, small_run.run_id)
    assert run_id == small_run.run_id
    assert len(flows) == 3 + 3 * len(small_run.models()) + 1
    kinds = {flow["name"]: flow["start_up"] and flow["start_up"][1] for flow in flows}
    assert set(kinds.values()) == {"cold", "warm"}, kinds
    table, wall = breakdown(flows)
    assert sum(totals(table).values()) == pytest.approx(wall, abs=1e-3)
    assert totals(table)["between flows"] == 0
    for name, row in table.items():
        assert (row["training"] > 0) == name.startswith("train-"), name
        if kinds[name] == "cold":
            assert row["start-up"] > 0.5, name  # a cold start imports TensorFlow or Prefect
        assert row["dvc"] > 0 or name == "fetch", name
        assert all(row[c] >= 0 for c in CATEGORIES), (name, row)
