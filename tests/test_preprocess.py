"""pipeline.preprocess on small synthetic IDX files written with write_idx."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import random_images, write_raw
from pipeline.config import DataParams
from pipeline.data import Split, write_idx
from pipeline.errors import DataError
from pipeline.preprocess import check_split, data_report, duplicates_between, load_raw, split_validation

N_TRAIN, N_TEST = 200, 50
PLANTED = {3: 10, 17: 120, 42: 199}  # test index -> the train index it copies


@pytest.fixture
def raw(tmp_path):
    """200 train and 50 test images, labels 0..9; test images 3, 17 and 42 copy train images."""
    rng = np.random.default_rng(7)
    train_x, test_x = random_images(rng, N_TRAIN), random_images(rng, N_TEST)
    train_y = np.arange(N_TRAIN, dtype=np.uint8) % 10
    test_y = rng.integers(0, 10, N_TEST, dtype=np.uint8)
    for t, i in PLANTED.items():
        test_x[t] = train_x[i]
    return write_raw(tmp_path / "raw", train_x, train_y, test_x, test_y)


@pytest.fixture
def splits(raw):
    return load_raw(raw)


def index_of(images: np.ndarray, source: np.ndarray) -> list[int]:
    """For each image, its index in `source` (the synthetic images are all distinct)."""
    where = {img.tobytes(): i for i, img in enumerate(source)}
    return [where[img.tobytes()] for img in images]


def test_load_raw_reads_the_four_files(splits):
    assert set(splits) == {"train", "test"}
    assert splits["train"].x.shape == (N_TRAIN, 28, 28) and splits["train"].y.shape == (N_TRAIN,)
    assert splits["test"].x.shape == (N_TEST, 28, 28) and splits["test"].y.shape == (N_TEST,)


def test_load_raw_refuses_images_and_labels_that_do_not_pair(raw):
    (raw / "t10k-labels-idx1-ubyte").write_bytes(write_idx(np.zeros(N_TEST - 1, dtype=np.uint8)))
    with pytest.raises(
        DataError, match=f"test: {N_TEST} images in t10k-images-idx3-ubyte but {N_TEST - 1} labels in t10k-labels"
    ):
        load_raw(raw)


@pytest.mark.parametrize("limit, val_size", [(None, 40), (150, 30), (1000, 20)])
def test_split_partitions_the_first_limit_images(splits, limit, val_size):
    source = splits["train"]
    train, val = split_validation(source, DataParams(val_size=val_size, limit=limit), seed=1)
    n = min(limit or N_TRAIN, N_TRAIN)
    assert len(val.y) == val_size and len(train.y) == n - val_size
    train_idx, val_idx = index_of(train.x, source.x), index_of(val.x, source.x)
    assert sorted(train_idx + val_idx) == list(range(n))  # disjoint, and together the first n
    assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)  # file order kept
    np.testing.assert_array_equal(train.y, source.y[train_idx])  # labels follow their images
    np.testing.assert_array_equal(val.y, source.y[val_idx])


def test_split_is_seeded(splits):
    p = DataParams(val_size=30, limit=150)
    first = index_of(split_validation(splits["train"], p, seed=1337)[1].x, splits["train"].x)
    again = index_of(split_validation(splits["train"], p, seed=1337)[1].x, splits["train"].x)
    other = index_of(split_validation(splits["train"], p, seed=1338)[1].x, splits["train"].x)
    assert first == again
    assert first != other


def test_split_refuses_a_val_size_that_leaves_no_training_images(splits):
    with pytest.raises(DataError, match=f"data.val_size = {N_TRAIN} is not smaller than the {N_TRAIN}"):
        split_validation(splits["train"], DataParams(val_size=N_TRAIN, limit=None), seed=0)


def test_check_split_passes_good_data(splits):
    assert check_split("train", splits["train"]) == ["28x28 uint8", "labels in 0..9", "no blank images"]


def test_check_split_refuses_label_10(splits):
    y = splits["train"].y.copy()
    y[5] = 10
    with pytest.raises(DataError, match=r"train: a label is 10; MNIST labels are 0..9"):
        check_split("train", Split(splits["train"].x, y))


def test_check_split_refuses_blank_images(splits):
    x = splits["test"].x.copy()
    x[[4, 9]] = 0
    with pytest.raises(DataError, match="test: 2 images are blank"):
        check_split("test", Split(x, splits["test"].y))


def test_check_split_refuses_wrong_shape_or_dtype(splits):
    with pytest.raises(DataError, match="expected 28x28 uint8"):
        check_split("val", Split(splits["train"].x.astype(np.float32), splits["train"].y))


def test_duplicates_between_counts_exact_copies(splits):
    train, test = splits["train"], splits["test"]
    assert duplicates_between(train.x, test.x) == len(PLANTED)
    assert duplicates_between(train.x[:100], test.x) == 1  # only train[10] is in the first 100
    nudged = test.x.copy()
    nudged[3, 0, 0] ^= 1  # one pixel off is not an exact copy
    assert duplicates_between(train.x, nudged) == len(PLANTED) - 1


def test_data_report_counts_per_class_and_duplicates(splits):
    train, val = split_validation(splits["train"], DataParams(val_size=50, limit=None), seed=3)
    report = data_report({"train": train, "val": val, "test": splits["test"]})
    for name, split in (("train", train), ("val", val), ("test", splits["test"])):
        entry = report["splits"][name]
        assert entry["images"] == len(split.y)
        assert entry["per_class"] == {str(c): int((split.y == c).sum()) for c in range(10)}
        assert entry["pixel_mean"] == pytest.approx(split.x.mean() / 255, abs=1e-6)
        assert report["checks"][name] == ["28x28 uint8", "labels in 0..9", "no blank images"]
    # train+val hold all 200 images with labels i % 10: 20 per class in total.
    totals = {c: report["splits"]["train"]["per_class"][c] + report["splits"]["val"]["per_class"][c] for c in map(str, range(10))}
    assert totals == {str(c): 20 for c in range(10)}
    # The planted copies are found whether the original landed in train or in val.
    assert report["test_images_duplicated_in_train"] == len(PLANTED)


def test_data_report_stops_on_a_bad_split(splits):
    train, val = split_validation(splits["train"], DataParams(val_size=50, limit=None), seed=3)
    y = val.y.copy()
    y[0] = 12
    with pytest.raises(DataError, match="val: a label is 12"):
        data_report({"train": train, "val": Split(val.x, y), "test": splits["test"]})
