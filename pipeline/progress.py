"""Where a run is: one line per stage as it ends, and at the end a table of the models.

`mnist run` passes DVC's output through `Progress.feed`, which recognises DVC's own lines about
each stage (running, restored from the run-cache, unchanged, failed) and prints, as each stage
ends, its position in the run, what happened, its seconds and an estimate of the time left
from the previous run's stage times (kept in `.dvc/tmp/mnist-stage-seconds.json`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import artifacts

TIMES_FILE = Path(".dvc/tmp/mnist-stage-seconds.json")  # DVC's scratch folder: git-ignored, never tracked
RAN, RESTORED, UP_TO_DATE, FAILED = "ran", "restored from the run-cache", "up to date", "failed"

RUNNING = "running"  # what DVC says as a stage's command starts; it ends as RAN or FAILED

# DVC's printed messages about a stage (dvc/stage/run.py, dvc/stage/cache.py, dvc/stage/__init__.py,
# dvc/repo/reproduce.py). `dvc repro` has no structured output and DVC's Python API does not tell a
# stage that ran from one restored from the run-cache: stage_event is the one reader of these lines,
# and tests/test_compat.py pins them against the real dvc.
_STAGE_LINES = (
    (re.compile(r"Running stage '(?P<stage>[^']+)':"), RUNNING),
    (re.compile(r"Stage '(?P<stage>[^']+)' is cached - skipping run"), RESTORED),
    (re.compile(r"Stage '(?P<stage>[^']+)' didn't change, skipping"), UP_TO_DATE),
    (re.compile(r"ERROR: failed to reproduce '(?P<stage>[^']+)'"), FAILED),
)
_COMMAND_ECHO = re.compile(r"^> .*\bpipeline\.warm\b")  # DVC echoes each stage's command: long, and said by our line
_STAGE_ERROR = re.compile(r"^error(?: in stage \S+)?: (?P<message>.+)")


def stage_event(line: str) -> tuple[str, str] | None:
    """What a line of `dvc repro`'s output says about a stage: (stage, RUNNING, RESTORED, UP_TO_DATE or FAILED), or None."""
    for pattern, event in _STAGE_LINES:
        if match := pattern.search(line):  # anywhere: a stage's last output may lack its newline
            return match["stage"], event
    return None


def repro_outcomes(output: str) -> dict[str, str]:
    """What `dvc repro` did to each stage its `output` names: RAN, RESTORED, UP_TO_DATE or FAILED, in DVC's order."""
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        if found := stage_event(line):
            stage, event = found
            outcomes[stage] = RAN if event == RUNNING else event
    return outcomes


@dataclass
class Progress:
    """Follows DVC's output; prints a line for each stage as it ends."""

    planned: list[str]
    previous: dict[str, float] = field(default_factory=dict)  # seconds per stage that ran in the last run
    out: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    on_end: Callable[[str, str, float], None] | None = None  # called with (stage, what happened, seconds)
    ended: dict[str, tuple[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _running: str | None = None
    _since: float = 0.0
    _last_error: str | None = None

    def feed(self, line: str) -> bool:
        """Take one line of DVC's output; whether to show it as it is (DVC's stage lines are said by ours)."""
        text = line.rstrip("\n")
        found = stage_event(text)
        if found is None:
            if match := _STAGE_ERROR.match(text):
                self._last_error = self._last_error or match["message"]
            return not _COMMAND_ECHO.match(text)
        stage, event = found
        if event == FAILED:
            if self._running == stage:
                self._running = None
            self.errors[stage] = self._last_error or text.split(": ", 2)[-1]
            self._end(stage, FAILED, self.clock() - self._since if self._since else 0.0)
            return True
        self._end_running(RAN)
        if event == RUNNING:
            self._running, self._since, self._last_error = stage, self.clock(), None
        else:
            self._end(stage, event, 0.0)
        return False

    def close(self) -> None:
        """DVC has ended: the stage that ran last has ended too."""
        self._end_running(RAN)

    def _end_running(self, what: str) -> None:
        if self._running is not None:
            stage, self._running = self._running, None
            self._end(stage, what, self.clock() - self._since)

    def _end(self, stage: str, what: str, seconds: float) -> None:
        if stage in self.ended:
            return
        self.ended[stage] = (what, seconds)
        if self.on_end:
            self.on_end(stage, what, seconds)
        total = len(self.planned) or len(self.ended)
        position = f"[{len(self.ended)}/{max(total, len(self.ended))}]"
        left = self.time_left()
        eta = f"  (about {_duration(left)} left)" if left is not None else ""
        self.out(f"{position} {stage}: {what}, {seconds:.1f} s{eta}")

    def time_left(self) -> float | None:
        """Seconds the stages still to come took when they last ran; None without a previous run."""
        if not self.previous:
            return None
        return sum(self.previous.get(s, 0.0) for s in self.planned if s not in self.ended)

    def times(self) -> dict[str, float]:
        """Seconds per stage for the next run's estimate: this run's where a stage ran, else the last known."""
        return {**self.previous, **{s: sec for s, (what, sec) in self.ended.items() if what == RAN}}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def load_times(path: Path = TIMES_FILE) -> dict[str, float]:
    try:
        raw = json.loads(path.read_text())
        return {str(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def save_times(times: dict[str, float], path: Path = TIMES_FILE) -> None:
    if path.parent.is_dir():
        artifacts.write_json(path, {k: round(v, 2) for k, v in sorted(times.items())})


def models_table(root: Path, serving_base: Path, models: list[str]) -> str:
    """Each model's test accuracy, gate, whether it passed, and the version that serves it, as a text table."""
    from tabulate import tabulate

    from pipeline import serving

    rows = []
    for model in models:
        try:
            metrics = artifacts.read_metrics(root / "data" / "evaluate" / model)
            accuracy, gate = f"{metrics['accuracy']:.4f}", metrics["gate"]
            passed = "yes" if metrics["accuracy"] >= gate else "no"
            gate = f"{gate:.4f}"
        except Exception:  # noqa: BLE001 - a model not evaluated (yet) is a row of dashes, not an error
            accuracy, gate, passed = "-", "-", "-"
        newest = serving.newest(serving_base / model)
        rows.append([model, accuracy, gate, passed, newest.name if newest else "-"])
    return tabulate(rows, headers=["model", "test accuracy", "gate", "passed", "serving version"], disable_numparse=True)
