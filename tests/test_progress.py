"""`mnist run`'s progress lines (pipeline/progress.py), fed with DVC's own output."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO
from pipeline import dag, progress


def make(planned: list[str], previous: dict[str, float] | None = None):
    lines: list[str] = []
    ticks = iter(range(0, 1000, 5))
    return progress.Progress(planned, previous or {}, out=lines.append, clock=lambda: float(next(ticks))), lines


DVC_OUTPUT = [
    "Stage 'fetch' didn't change, skipping\n",
    "Stage 'preprocess' is cached - skipping run, checking out outputs\n",
    "Running stage 'train@cnn':\n",
    "> python -m pipeline.warm stages/train.py cnn --data data/prepared --out data/models/cnn\n",
    "epoch 1/6 ...\n",
    "Updating lock file 'dvc.lock'\n",
    "Running stage 'evaluate@cnn':\n",
    "> python -m pipeline.warm stages/evaluate.py cnn\n",
    "error in stage evaluate@cnn: the SavedModel is missing\n",
    "ERROR: failed to reproduce 'evaluate@cnn': failed to run: python -m pipeline.warm ..., exited with 1\n",
]


def test_each_stage_gets_one_line_as_it_ends_with_its_position_outcome_and_time_left() -> None:
    tracker, lines = make(
        ["fetch", "preprocess", "train@cnn", "evaluate@cnn", "export@cnn"],
        previous={"train@cnn": 60.0, "evaluate@cnn": 4.0, "export@cnn": 6.0},
    )
    shown = [line for line in DVC_OUTPUT if tracker.feed(line)]
    tracker.close()
    assert lines == [
        "[1/5] fetch: up to date, 0.0 s  (about 70 s left)",
        "[2/5] preprocess: restored from the run-cache, 0.0 s  (about 70 s left)",
        "[3/5] train@cnn: ran, 5.0 s  (about 10 s left)",
        "[4/5] evaluate@cnn: failed, 5.0 s  (about 6 s left)",
    ]
    assert tracker.errors == {"evaluate@cnn": "the SavedModel is missing"}
    assert not any(line.startswith(("Running stage", "> python -m pipeline.warm")) for line in shown)
    assert "epoch 1/6 ...\n" in shown and DVC_OUTPUT[-1] in shown
    assert tracker.times() == {"train@cnn": 5.0, "evaluate@cnn": 4.0, "export@cnn": 6.0}


def test_without_a_previous_run_no_estimate_is_made() -> None:
    tracker, lines = make(["fetch"])
    tracker.feed("Running stage 'fetch':\n")
    tracker.close()
    assert lines == ["[1/1] fetch: ran, 5.0 s"]


def test_the_planned_stages_follow_the_targets_and_their_dependencies() -> None:
    everything = dag.planned_stages(REPO, [], single_item=False)
    assert everything[:2] == ["fetch", "preprocess"] and everything[-1] == "publish" and len(everything) == len(set(everything))
    assert dag.planned_stages(REPO, ["train@cnn"], single_item=False) == ["fetch", "preprocess", "train@cnn"]
    assert dag.planned_stages(REPO, ["train@cnn"], single_item=True) == ["train@cnn"]
    assert set(dag.planned_stages(REPO, ["evaluate"], single_item=True)) == {s for s in everything if s.startswith("evaluate@")}


def test_times_survive_a_run(tmp_path: Path) -> None:
    path = tmp_path / ".dvc" / "tmp" / "times.json"
    path.parent.mkdir(parents=True)
    progress.save_times({"train@cnn": 61.234}, path)
    assert progress.load_times(path) == {"train@cnn": 61.23}
    assert progress.load_times(tmp_path / "missing.json") == {}
