"""Model cards (pipeline/card.py): the interval, the per-digit and confusion tables, the source."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import card


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = card.wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    assert card.wilson_interval(0, 10)[0] == 0.0 and card.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    low, high = card.wilson_interval(9937, 10000)
    assert low < 0.9937 < high and high - low < 0.004
    with pytest.raises(ValueError):
        card.wilson_interval(0, 0)


def test_per_digit_accuracy_and_the_most_confused_pairs() -> None:
    actual = np.array([4, 4, 4, 9, 9, 7, 1, 1])
    predicted = np.array([9, 9, 4, 4, 9, 1, 1, 1])
    rows = card.per_class_accuracy(actual, predicted)
    assert rows[4] == (4, 3, pytest.approx(1 / 3)) and rows[1] == (1, 2, 1.0) and rows[7] == (7, 1, 0.0)
    assert rows[0][1] == 0 and np.isnan(rows[0][2])
    assert card.confused_pairs(actual, predicted) == [(4, 9, 2), (7, 1, 1), (9, 4, 1)]
    assert card.confused_pairs(actual, actual) == []


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True)


def test_the_source_is_the_commit_its_state_and_each_inputs_md5(tmp_path: Path) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights")
    outside = card.git_source(tmp_path, {"m": model})
    assert (outside.commit, outside.dirty) == ("none", False)
    assert outside.md5 == {"m": hashlib.md5(b"weights").hexdigest()}
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "model.keras")
    git(tmp_path, "commit", "-qm", "m")
    clean = card.git_source(tmp_path, {})
    assert len(clean.commit) == 40 and not clean.dirty
    (tmp_path / "untracked").write_text("not the model's")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "report.md").write_text("a report")
    (tmp_path / "dvc.lock").write_text("stages: {}")
    git(tmp_path, "add", "data/report.md", "dvc.lock")
    git(tmp_path, "commit", "-qm", "outputs kept in git")
    (tmp_path / "data" / "report.md").write_text("the run's report")
    (tmp_path / "dvc.lock").write_text("stages: {train: {}}")  # what a run rewrites does not count
    assert not card.git_source(tmp_path, {}).dirty
    model.write_bytes(b"other weights")
    assert card.git_source(tmp_path, {}).dirty


def test_a_card_shows_the_figures_it_is_given() -> None:
    actual = np.repeat(np.arange(10), 10)
    predicted = actual.copy()
    predicted[:3] = 6  # three zeros read as six
    source = card.Source("a" * 40, True, {"data/models/m/model.keras": "b" * 32})
    text = card.model_card(
        "m",
        "a test model",
        {"epochs": 2},
        {"train": 900, "val": 100, "test": 100},
        7,
        {"accuracy": 0.97, "gate": 0.98},
        actual,
        predicted,
        {"latency_ms_batch_256": 4.5, "latency_ms_batch_1": 0.25},
        source,
    )
    low, high = card.wilson_interval(97, 100)
    assert f"97.00% (97 of 100), 95 % interval {low:.2%} to {high:.2%} (Wilson); gate 98.00%: missed." in text
    assert "900 training images, 100 validation images" in text and "seed 7" in text
    assert "| 0       | 10            | 70.00%     |" in text
    assert "| 0      | 6           | 3       |" in text
    assert "0.25 ms for a batch of 1, 4.50 ms for a batch of 256" in text
    assert f"git commit `{'a' * 40}` (with uncommitted changes to its code, params or dvc.yaml)" in text
    assert '"epochs": 2' in text and "Intended use" in text and "Limits" in text
