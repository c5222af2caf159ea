"""Publish exported SavedModels into a serving folder, as TFX's Pusher does: `<base>/<model>/<version>/`.

The folder is TF Serving's model base path, outside DVC's outputs, so that versions accumulate
across runs. A SavedModel becomes a new integer version only when it differs from the newest
one there. It is copied under a temporary name, flushed to disk and made visible by one rename,
and old versions are renamed away before they are deleted: a server watching the folder never
sees a missing or partial version, even after a power cut. Publishers of one folder take turns
(an flock on the folder itself), so none deletes another's copy in progress or takes its
version number. `assignments` reads the model registry's stages (GTO's tags), which decide what
`mnist promote` publishes (pipeline/promote.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gto.api

from pipeline import artifacts
from pipeline.data import atomic_path, disk_bytes, remove_leftovers


@dataclass(frozen=True)
class Published:
    model: str
    version: int
    new: bool  # False: the newest version already held this SavedModel
    removed: list[int]  # old versions deleted to keep the last `keep`


def publish(model: str, saved_model: Path, folder: Path, keep: int) -> Published:
    """Make `saved_model` the newest version in `folder` unless it already is; keep the last `keep` versions."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _publish(model, saved_model, folder, keep)
    finally:
        os.close(lock)  # releases the lock


def _publish(model: str, saved_model: Path, folder: Path, keep: int) -> Published:
    remove_leftovers(folder)  # no other publisher runs: what is left is an interrupted one's
    held = artifacts.versions(folder)
    if held and artifacts.tree_digest(folder / str(held[-1])) == artifacts.tree_digest(saved_model):
        return Published(model, held[-1], False, prune(folder, keep))
    version = held[-1] + 1 if held else 1
    with atomic_path(folder / str(version), disk_bytes(saved_model)) as staging:  # deleted if the copy fails
        shutil.copytree(saved_model, staging)
    return Published(model, version, True, prune(folder, keep))


def prune(folder: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` versions, each renamed away first so that no half-deleted version is seen."""
    old = artifacts.versions(folder)[:-keep]
    for version in old:
        doomed = folder / f".tmp-old-{version}"
        (folder / str(version)).rename(doomed)
        shutil.rmtree(doomed)
    return old


def newest(folder: Path) -> Path | None:
    """The newest version folder in `folder`, if any."""
    held = artifacts.versions(folder)
    return folder / str(held[-1]) if held else None


def assignments(root: Path, model: str) -> dict[str, list[str]]:
    """The versions assigned to each stage of `model`, in the order of their tags (`NAME#STAGE#N`): the last
    one of a stage is in it now."""
    events = [e for e in gto.api.history(root, model) if e["event"] == "assignment"]
    events.sort(key=lambda e: int(e["ref"].rsplit("#", 1)[1]))
    stages: dict[str, list[str]] = {}
    for event in events:
        stages.setdefault(event["stage"], []).append(event["version"])
    return stages
