"""pipeline.data and pipeline.artifacts: the IDX format, atomic writes and the prepared arrays, on real files."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

from helpers import random_images, small_disk
from pipeline.artifacts import PREPARED_FILE, load_prepared, save_prepared
from pipeline.data import Split, atomic_path, atomic_write, parse_idx, read_images, read_labels, remove_leftovers, write_idx
from pipeline.errors import DataError, DiskFull


def leftovers(folder):
    return sorted(p.name for p in folder.glob(".tmp-*"))


# --- IDX ---------------------------------------------------------------------------


def test_parse_idx_round_trip_keeps_shape_dtype_and_values():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = write_idx(array)
    assert data[:4] == bytes([0, 0, 0x08, 3])  # the IDX magic: unsigned bytes, 3 dimensions
    assert data[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    parsed = parse_idx(data, "small", ndim=3)
    assert parsed.dtype == np.uint8
    assert parsed.shape == (2, 3, 4)
    np.testing.assert_array_equal(parsed, array)


def test_write_idx_refuses_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        write_idx(np.zeros((2, 2), dtype=np.int32))


def test_read_images_and_labels_from_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = random_images(rng, 7), rng.integers(0, 10, 7, dtype=np.uint8)
    (tmp_path / "imgs").write_bytes(write_idx(images))
    (tmp_path / "lbls").write_bytes(write_idx(labels))
    got_images, got_labels = read_images(tmp_path / "imgs"), read_labels(tmp_path / "lbls")
    assert got_images.shape == (7, 28, 28) and got_images.dtype == np.uint8
    assert got_labels.shape == (7,) and got_labels.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(write_idx(random_images(np.random.default_rng(1), 5)))
    return path


def test_truncated_image_file_is_a_data_error(image_file):
    image_file.write_bytes(image_file.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        read_images(image_file)
    message = str(err.value)
    assert image_file.name in message
    assert "truncated" in message
    assert "(5, 28, 28)" in message  # what the header declares


def test_file_cut_inside_its_header_is_a_data_error(image_file):
    image_file.write_bytes(image_file.read_bytes()[:10])
    with pytest.raises(DataError) as err:
        read_images(image_file)
    assert image_file.name in str(err.value) and "truncated" in str(err.value)


def test_file_longer_than_its_header_is_a_data_error(image_file):
    image_file.write_bytes(image_file.read_bytes() + b"\x00" * 3)
    with pytest.raises(DataError) as err:
        read_images(image_file)
    message = str(err.value)
    assert image_file.name in message
    assert "longer than its header" in message


def test_wrong_magic_number_is_a_data_error(image_file):
    data = bytearray(image_file.read_bytes())
    data[2] = 0x0D  # float32 instead of unsigned bytes
    image_file.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        read_images(image_file)
    message = str(err.value)
    assert image_file.name in message
    assert "magic" in message
    assert "00000d03" in message and "00000803" in message  # what it is, what was expected


def test_label_file_read_as_images_is_a_magic_error(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(write_idx(np.arange(10, dtype=np.uint8)))
    with pytest.raises(DataError, match="magic") as err:
        read_images(path)
    assert path.name in str(err.value)


def test_empty_file_is_a_data_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="magic number is missing"):
        read_labels(path)


def test_images_that_are_not_28x28_are_a_data_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(write_idx(np.ones((4, 32, 32), dtype=np.uint8)))
    with pytest.raises(DataError) as err:
        read_images(path)
    message = str(err.value)
    assert path.name in message
    assert "32x32" in message and "28x28" in message


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "nope")


# --- atomic writes -----------------------------------------------------------------


def test_atomic_write_writes_the_complete_content(tmp_path):
    final = tmp_path / "sub" / "file.bin"
    data = os.urandom(300_000)
    atomic_write(final, data)
    assert final.read_bytes() == data
    assert leftovers(final.parent) == []
    atomic_write(final, b"second")  # replaces an existing file
    assert final.read_bytes() == b"second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["file.bin"]


def test_atomic_path_failure_leaves_neither_final_nor_tmp(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half of it")
            assert tmp.exists() and tmp.name.startswith(".tmp-")
            raise RuntimeError("writer failed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_the_previous_version(tmp_path):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old and complete")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"new but half")
            raise RuntimeError("writer failed")
    assert final.read_bytes() == b"old and complete"
    assert leftovers(tmp_path) == []


def test_atomic_path_failure_removes_a_tmp_folder(tmp_path):
    final = tmp_path / "folder_out"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_reports_a_full_disk_naming_the_file_and_the_space_it_needs(tmp_path):
    final = tmp_path / "model.bin"
    with pytest.raises(DiskFull) as err:
        with atomic_path(final, needed=5_000_000) as tmp:
            tmp.write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(err.value)
    assert str(final) in message and "needs at least 5.00 MB" in message and "MB free" in message
    assert list(tmp_path.iterdir()) == []


def test_a_full_tmpfs_gives_disk_full_with_more_than_was_written_and_keeps_nothing(tmp_path):
    with small_disk(tmp_path / "disk", 64) as disk:
        final = disk / "big.bin"
        with pytest.raises(DiskFull) as err:
            atomic_write(final, os.urandom(200_000))
        assert f"writing {final}" in str(err.value) and f"mounted at {disk}" in str(err.value)
        assert list(disk.iterdir()) == []  # neither the final name nor the temporary file
        source = tmp_path / "tree"
        (source / "sub").mkdir(parents=True)
        (source / "sub" / "a.bin").write_bytes(os.urandom(200_000))
        with pytest.raises(DiskFull, match=r"needs at least 0.20 MB"):  # copytree only says ENOSPC in its message
            with atomic_path(disk / "copy", needed=200_000) as tmp:
                shutil.copytree(source, tmp)
        assert list(disk.iterdir()) == []


def test_remove_leftovers_of_one_name_keeps_the_others(tmp_path):
    for name in (".tmp-mlp-12", ".tmp-deep_mlp-12", ".tmp-mlp2-12"):
        (tmp_path / name).mkdir()
    remove_leftovers(tmp_path, "mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-deep_mlp-12", ".tmp-mlp2-12"]


def test_remove_leftovers_deletes_only_tmp_entries(tmp_path):
    (tmp_path / ".tmp-a-123").write_bytes(b"x")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / ".tmp-dir" / "inner").write_bytes(b"y")
    (tmp_path / "keep.bin").write_bytes(b"z")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


# --- prepared arrays ---------------------------------------------------------------


def _splits(rng):
    return {
        name: Split(random_images(rng, n), rng.integers(0, 10, n, dtype=np.uint8))
        for name, n in (("train", 20), ("val", 5), ("test", 8))
    }


def test_save_and_load_prepared_round_trip(tmp_path):
    splits = _splits(np.random.default_rng(2))
    save_prepared(tmp_path / "prepared", splits)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == [PREPARED_FILE]
    loaded = load_prepared(tmp_path / "prepared")
    assert set(loaded) == {"train", "val", "test"}
    for name, split in splits.items():
        assert loaded[name].x.dtype == np.uint8 and loaded[name].y.dtype == np.uint8
        np.testing.assert_array_equal(loaded[name].x, split.x)
        np.testing.assert_array_equal(loaded[name].y, split.y)


def test_load_prepared_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prepared(tmp_path)


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof that pickled content was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_load_prepared_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "payload-ran"
    splits = _splits(np.random.default_rng(3))
    arrays = {f"{k}_{name}": getattr(s, k) for name, s in splits.items() for k in ("x", "y")}
    arrays["y_train"] = np.array([_Payload(str(marker))] * 3, dtype=object)
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.savez(folder / PREPARED_FILE, allow_pickle=True, **arrays)

    with pytest.raises((ValueError, DataError), match="pickle"):
        load_prepared(folder)
    assert not marker.exists(), "load_prepared unpickled (executed) content of the npz"

    # The payload is live: loading it with pickling allowed does run it.
    with np.load(folder / PREPARED_FILE, allow_pickle=True) as npz:
        npz["y_train"]
    assert marker.is_dir()
