"""Model cards: one Markdown page per exported model, beside its SavedModel (data/export/<model>/card.md,
and a Prefect artifact of the export stage's flow run).

A card says what the model is, what it was trained and tested on, how well it does (test accuracy
with a 95 % Wilson interval, per digit, the pairs it confuses most), how fast it answers on the CPU
that measured it, and where it came from: the git commit and the md5 of its inputs as dvc.lock lists
them. It is written by the export stage from that stage's inputs alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import tables

Z_95 = 1.959964  # the normal quantile of a two-sided 95 % interval
INTENDED_USE = (
    "Classifying 28x28 grey-scale images of single handwritten digits, centred and scaled as MNIST's are "
    "(uint8, white digit on black). A teaching and benchmarking model: it has seen only MNIST."
)
LIMITS = (
    "Not for digits in other styles (house numbers, printed fonts), other sizes or inverted colours, nor for "
    "images that are not digits: the model always answers one of 0-9, with no 'none of these'. Its accuracy "
    "is measured on MNIST's test set only; the interval above covers sampling error on that set, not a shift "
    "in the data."
)


@dataclass(frozen=True)
class Source:
    """Where a model came from: the git commit of the workspace, and the md5 of its inputs (as dvc.lock has them)."""

    commit: str
    dirty: bool
    md5: dict[str, str]


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct` / `total` (95 % by default)."""
    if total <= 0:
        raise ValueError("an interval needs at least one trial")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def per_class_accuracy(actual: np.ndarray, predicted: np.ndarray, classes: int = 10) -> list[tuple[int, int, float]]:
    """(digit, test images of it, share of them predicted right) for each digit."""
    rows = []
    for digit in range(classes):
        mask = actual == digit
        count = int(mask.sum())
        rows.append((digit, count, float((predicted[mask] == digit).mean()) if count else float("nan")))
    return rows


def confused_pairs(actual: np.ndarray, predicted: np.ndarray, top: int = 5) -> list[tuple[int, int, int]]:
    """The `top` (true digit, predicted digit, count) pairs of wrong answers, most frequent first."""
    wrong = actual != predicted
    pairs, counts = np.unique(np.stack([actual[wrong], predicted[wrong]], axis=1), axis=0, return_counts=True)
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], tuple(pairs[i])))
    return [(int(pairs[i][0]), int(pairs[i][1]), int(counts[i])) for i in order[:top]]


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: what dvc.lock lists for a file output of DVC 3."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What a run itself rewrites in git's files, so not a sign of uncommitted changes: DVC's lock and the outputs kept in git.
WRITTEN_BY_RUNS = ("dvc.lock", "data")


def git_source(cwd: Path, inputs: dict[str, Path]) -> Source:
    """The workspace's commit (or "none" outside git), whether tracked files other than WRITTEN_BY_RUNS differ
    from it (code, params.yaml, dvc.yaml), and the md5 of `inputs`."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or "none"
    excluded = [f":(top,exclude){path}" for path in WRITTEN_BY_RUNS]
    dirty = commit != "none" and bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded))
    return Source(commit, dirty, {name: file_md5(path) for name, path in inputs.items()})


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def model_card(
    model: str,
    description: str,
    params: dict[str, Any],
    split: dict[str, int],
    seed: int,
    metrics: dict[str, Any],
    actual: np.ndarray,
    predicted: np.ndarray,
    latency: dict[str, float],
    source: Source,
) -> str:
    """The card of an exported model, as Markdown."""
    correct, total = int((actual == predicted).sum()), len(actual)
    low, high = wilson_interval(correct, total)
    per_class = per_class_accuracy(actual, predicted)
    pairs = confused_pairs(actual, predicted)
    latencies = sorted((int(key.rsplit("_", 1)[1]), value) for key, value in latency.items())
    state = " (with uncommitted changes to its code, params or dvc.yaml)" if source.dirty else ""
    lines = [
        f"# Model card: {model}",
        "",
        f"**What it is.** `{model}`: {description}. A Keras model exported as a TensorFlow SavedModel "
        "(`saved_model/`, signature `serving_default`: `images`, a batch of uint8 28x28 images, in; `probabilities` "
        "and `class`, the predicted digit, out).",
        "",
        f"**Data.** MNIST: {split['train']:,} training images, {split['val']:,} validation images (held out from "
        f"MNIST's training file, seed {seed}), tested on {total:,} images of MNIST's test set.",
        "",
        f"**Test accuracy.** {correct / total:.2%} ({correct:,} of {total:,}), 95 % interval {low:.2%} to {high:.2%} "
        f"(Wilson); gate {metrics['gate']:.2%}: {'passed' if metrics['accuracy'] >= metrics['gate'] else 'missed'}.",
        "",
        "Per digit:",
        "",
        tables.markdown(["digit", "test images", "accuracy"], [(d, f"{n:,}", f"{a:.2%}") for d, n, a in per_class]),
        "",
        "Most confused (true digit, predicted as, count):",
        "",
        tables.markdown(["true", "predicted", "count"], pairs) if pairs else "none: every test image right.",
        "",
        f"**Latency** on {cpu_name()} ({platform.machine()}), median of the export stage's timed calls in a fresh "
        "process: " + ", ".join(f"{ms:.2f} ms for a batch of {batch}" for batch, ms in latencies) + ".",
        "",
        "**Parameters** (params.yaml `models." + model + "`):",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True),
        "```",
        "",
        f"**Source.** git commit `{source.commit}`{state}; md5 of its inputs, as dvc.lock lists them:",
        "",
        tables.markdown(["input", "md5"], sorted(source.md5.items())),
        "",
        f"**Intended use.** {INTENDED_USE}",
        "",
        f"**Limits.** {LIMITS}",
    ]
    return "\n".join(lines) + "\n"
