"""Turn the raw IDX files into checked, split arrays of raw uint8 pixels, and a data report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import summaries, tables
from pipeline.config import DataParams
from pipeline.data import Split, read_images, read_labels
from pipeline.errors import DataError
from pipeline.mnist import IMAGE_SHAPE, NUM_CLASSES, SPLIT_FILES


def load_raw(raw_dir: Path) -> dict[str, Split]:
    """Read the four IDX files into a train and a test split, checking that they pair up."""
    splits = {}
    for split, (images, labels) in SPLIT_FILES.items():
        x = read_images(raw_dir / images)
        y = read_labels(raw_dir / labels)
        if len(x) != len(y):
            raise DataError(f"{split}: {len(x)} images in {images} but {len(y)} labels in {labels}. Fetch the files again.")
        splits[split] = Split(x, y)
    return splits


def split_validation(train: Split, params: DataParams, seed: int) -> tuple[Split, Split]:
    """Keep the first `limit` training images, then split a seeded random validation set off them.

    Both parts keep the original order of the training file.
    """
    n = min(params.limit or len(train.y), len(train.y))
    if params.val_size >= n:
        raise DataError(f"data.val_size = {params.val_size} is not smaller than the {n} training images available.")
    val_idx = np.sort(np.random.default_rng(seed).permutation(n)[: params.val_size])
    keep = np.ones(n, dtype=bool)
    keep[val_idx] = False
    x, y = train.x[:n], train.y[:n]
    return Split(x[keep], y[keep]), Split(x[val_idx], y[val_idx])


def check_split(name: str, split: Split) -> list[str]:
    """Check one split; raise DataError on a failure, return the names of the checks passed."""
    shape = "x".join(map(str, IMAGE_SHAPE))
    if split.x.shape[1:] != IMAGE_SHAPE or split.x.dtype != np.uint8:
        raise DataError(f"{name}: images are {split.x.shape[1:]} {split.x.dtype}, expected {shape} uint8.")
    if split.y.size and split.y.max() >= NUM_CLASSES:
        raise DataError(
            f"{name}: a label is {int(split.y.max())}; MNIST labels are 0..{NUM_CLASSES - 1}. The label file is corrupt."
        )
    blank = int((split.x.reshape(len(split.x), -1).max(axis=1) == 0).sum())
    if blank:
        raise DataError(f"{name}: {blank} images are blank (all pixels 0). The image file is corrupt.")
    return [f"{shape} uint8", f"labels in 0..{NUM_CLASSES - 1}", "no blank images"]


def duplicates_between(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of `b` are exact byte copies of an image in `a`."""
    seen = {img.tobytes() for img in a}
    return sum(img.tobytes() in seen for img in b)


def data_report(splits: dict[str, Split]) -> dict[str, Any]:
    """Counts per class per split, pixel statistics, the checks that passed."""
    report: dict[str, Any] = {"splits": {}, "checks": {}}
    for name, split in splits.items():
        pixels = split.x.astype(np.float64) / 255.0
        report["splits"][name] = {
            "images": len(split.y),
            "per_class": {str(c): int(n) for c, n in enumerate(np.bincount(split.y, minlength=NUM_CLASSES))},
            "pixel_mean": round(float(pixels.mean()), 6),
            "pixel_std": round(float(pixels.std()), 6),
        }
        report["checks"][name] = check_split(name, split)
    report["test_images_duplicated_in_train"] = duplicates_between(
        np.concatenate([splits["train"].x, splits["val"].x]), splits["test"].x
    )
    return report


def write_summaries(splits: dict[str, Split], report: dict[str, Any], logdir: Path) -> None:
    """TensorBoard: class histogram per split, a grid of sample digits per class, pixel statistics."""
    with summaries.EventWriter(logdir) as events:
        for name, split in splits.items():
            events.histogram(f"classes/{name}", split.y.astype(np.int32), buckets=NUM_CLASSES)
            events.scalar(f"pixels/{name}/mean", report["splits"][name]["pixel_mean"])
            events.scalar(f"pixels/{name}/std", report["splits"][name]["pixel_std"])
        train = splits["train"]
        samples = [train.x[train.y == c][:10] for c in range(NUM_CLASSES)]
        events.image("samples/train_per_class", summaries.digit_grid(np.concatenate(samples)))
        counts = [[name, *list(report["splits"][name]["per_class"].values())] for name in splits]
        header = ["split"] + [str(c) for c in range(NUM_CLASSES)]
        events.text("class_counts", tables.markdown(header, counts))
        checks = [[name, ", ".join(passed)] for name, passed in report["checks"].items()]
        events.text("checks", tables.markdown(["split", "checks passed"], checks))
