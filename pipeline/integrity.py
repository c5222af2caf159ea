"""`mnist verify`: every byte of the workspace's DVC outputs and of their cache objects against dvc.lock;
and the set-aside of a dvc.lock that DVC cannot read.

DVC hashes a file again only when its size, inode or modification time changed, so a file
damaged in place (a failing disk, a stray write that kept the time) still passes `dvc status`,
and `dvc checkout` copies a damaged cache object into the workspace without a word. This reads
everything that dvc.lock names, hashes it, and repairs what has one good copy: a damaged cache
object from the workspace file, a damaged workspace file from the cache. Where neither copy is
good, both are deleted, so that `dvc repro` makes the output again (or `dvc pull` fetches it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from dvc.repo import Repo

DIR_SUFFIX = ".dir"  # DVC's listing object of a folder output: [{"md5": ..., "relpath": ...}, ...]
BROKEN_LOCK = "dvc.lock.broken"  # where an unreadable dvc.lock is moved: this name, else .1, .2, ... (set_aside_unreadable_lock)


# --- DVC's locks -----------------------------------------------------------------------------


class Busy(PipelineError):
    """Another DVC command holds this workspace."""


def rwlock_holders(repo: Repo) -> list[tuple[str, int, str, str]]:
    """(mode, PID, command, path) of every live process in DVC's read/write lock file (.dvc/tmp/rwlock).

    `dvc repro` gives the repo lock up while a stage's command runs, but keeps its outputs
    there for writing and its dependencies for reading until the stage is recorded.
    """
    import psutil
    from dvc.lock import LockError, make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK, SCHEMA

    path = Path(repo.tmp_dir) / RWLOCK_FILE
    if not path.exists():
        return []
    guard = make_lock(os.path.join(repo.tmp_dir, RWLOCK_LOCK), tmp_dir=repo.tmp_dir,
                      hardlink_lock=repo.config["core"].get("hardlink_lock", False))
    try:
        with guard:  # as DVC edits the file (dvc/rwlock.py): never half-written
            raw = json.loads(path.read_text(encoding="utf-8"))
    except LockError:
        return [("edit", 0, "a DVC command editing .dvc/tmp/rwlock", str(path))]
    except (OSError, ValueError):
        return []
    try:
        lock = SCHEMA(raw)
    except Exception:  # noqa: BLE001 - voluptuous.Invalid: a file DVC itself would refuse
        return []
    entries = [("write", info, p) for p, info in lock["write"].items()]
    entries += [("read", info, p) for p, infos in lock["read"].items() for info in infos]
    return [(mode, info["pid"], info["cmd"], p) for mode, info, p in entries if psutil.pid_exists(info["pid"])]


@contextmanager
def repo_lock(root: Path, wait_s: float = 0.0) -> Iterator[Repo]:
    """The DVC repo at `root` with DVC's exclusive repo lock held (.dvc/tmp/lock, as every DVC command takes it).

    Raise Busy if another process holds it for longer than `wait_s` (DVC's own Lock tries for 3 s).
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    deadline = time.monotonic() + wait_s
    with Repo(str(root)) as repo:
        while True:
            try:
                repo.lock.lock()
                break
            except LockError:
                if time.monotonic() >= deadline:
                    raise Busy(f"another DVC command holds this workspace ({Path(repo.tmp_dir) / 'lock'}): "
                               "run it again once that command has finished.") from None
        try:
            yield repo
        finally:
            repo.lock.unlock()


# --- an unreadable dvc.lock ------------------------------------------------------------------


def lock_problem(lock: Path) -> str | None:
    """What keeps DVC from reading `lock` ("empty", "conflict", ...: see LOCK_PROBLEMS), or None if it reads."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.strictyaml import load

    data = lock.read_bytes()
    if not data.strip():
        return "empty"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not utf-8"
    lines = text.splitlines()
    if any(line.startswith("<<<<<<<") for line in lines) and any(line.startswith(">>>>>>>") for line in lines):
        return "conflict"
    try:
        load(str(lock), COMPILED_LOCKFILE_SCHEMA)
    except DvcException:
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            return "not yaml"
        return "not dvc's schema"
    return None


LOCK_PROBLEMS = {
    "empty": "it is empty",
    "not utf-8": "it is not UTF-8 text",
    "not yaml": "it is not valid YAML: cut off, or damaged",
    "not dvc's schema": "it is YAML, but not in DVC's lock format (cut off at a line's end, or edited)",
}


def set_aside_unreadable_lock(root: Path) -> str | None:
    """Move `root`/dvc.lock aside if DVC cannot read it, and say what was found; else None.

    DVC rewrites dvc.lock in place after every stage, so a run killed at that moment (SIGTERM to
    its process group, SIGKILL, a power cut) can leave it empty or cut off, and every later `dvc`
    command stops at "'./dvc.lock' validation failed". Without it, `dvc repro` restores each stage
    that had finished from the run-cache and runs the rest. Every copy set aside is kept
    (dvc.lock.broken, then dvc.lock.broken.1, ...). A dvc.lock that a DVC command may be writing
    (it holds the repo lock, or has entries in .dvc/tmp/rwlock) is left alone. One with git's merge
    conflict markers is no damage: PipelineError says how to resolve the merge, and it stays.
    """
    from dvc.exceptions import DvcException

    lock = root / "dvc.lock"
    problem = lock_problem(lock) if lock.exists() else None
    if problem == "conflict":  # written by git, not by a DVC command: no lock to wait for
        raise merge_conflict()
    if problem is None:
        return None
    try:
        with repo_lock(root) as repo:
            if rwlock_holders(repo):
                return None
            problem = lock_problem(lock)  # again, now that no DVC command can be writing it
            if problem == "conflict":
                raise merge_conflict()
            if problem is None:
                return None
            kept = _keep_aside(lock)
    except (Busy, DvcException):  # a DVC command holds the workspace, or this is no DVC repo
        return None
    return (f"dvc.lock could not be read: {LOCK_PROBLEMS[problem]}. Moved to {kept.name} (earlier copies are kept). "
            "DVC rewrites dvc.lock after every stage, so a run stopped at that moment can leave it so (an edit can too). "
            "DVC restores the stages that had finished from its run-cache and runs the rest.")


def merge_conflict() -> PipelineError:
    """The error for a dvc.lock with git's conflict markers: no damage, a merge to finish."""
    return PipelineError(
        "dvc.lock holds git's merge conflict markers (<<<<<<<, =======, >>>>>>>): its merge is unfinished, so it "
        "is left as it is. Take one side, `git checkout --theirs dvc.lock` or `git checkout --ours dvc.lock`, then "
        "`dvc repro` (or `dvc commit`, to record the outputs the workspace holds), and `git add dvc.lock` to end the merge."
    )


def _keep_aside(lock: Path) -> Path:
    """Move `lock` to the first free name of dvc.lock.broken, dvc.lock.broken.1, ...; never over another file."""
    for n in range(10_000):
        dest = lock.with_name(BROKEN_LOCK if n == 0 else f"{BROKEN_LOCK}.{n}")
        try:
            os.link(lock, dest)  # fails if dest exists
        except FileExistsError:
            continue
        lock.unlink()
        return dest
    raise PipelineError(f"{lock} could not be set aside: {BROKEN_LOCK} to {BROKEN_LOCK}.9999 all exist; remove old ones.")


# --- verify ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    path: Path  # the workspace file, or the cache object when the file is gone
    what: str  # "workspace file damaged", "cache object damaged", ...
    action: str  # "restored from the cache", "rewritten from the workspace file", "deleted"


def md5(path: Path) -> str | None:
    """The MD5 of a file's bytes (DVC 3's hash), or None if it cannot be read."""
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def locked_outputs(root: Path) -> tuple[list[tuple[str, str, bool]], Path]:
    """(path, md5, cached) of every stage output in dvc.lock (md5 ends in '.dir' for a folder), and
    the folder of DVC's cache objects. `cache: false` outputs (metrics, plots) have no cache object."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        base = Path(repo.root_dir)
        uncached = {Path(out.fs_path).relative_to(base).as_posix() for stage in repo.index.stages for out in stage.outs if not out.use_cache}
        cache = Path(repo.cache.local.path)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outputs = [
        (out["path"], out["md5"], out["path"] not in uncached)
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
        if "md5" in out
    ]
    return outputs, cache


def cache_object(cache: Path, md5_hex: str) -> Path:
    return cache / md5_hex[:2] / md5_hex[2:]


def verify(root: Path) -> list[Finding]:
    """Check and repair every output in dvc.lock (files and the files of folders) and its cache object."""
    outputs, cache = locked_outputs(root)
    findings: list[Finding] = []
    for path, expected, cached in outputs:
        if not expected.endswith(DIR_SUFFIX):
            findings += check_file(root / path, expected, cache if cached else None)
            continue
        listing = cache_object(cache, expected)
        if md5(listing) != expected.removesuffix(DIR_SUFFIX):
            if listing.exists():
                _delete(listing)
                findings.append(Finding(listing, f"the listing of {path} in the cache is damaged", "deleted"))
            continue  # without its listing, DVC itself reports the folder as not in cache
        for entry in json.loads(listing.read_text()):
            findings += check_file(root / path / entry["relpath"], entry["md5"], cache)
    return findings


def check_file(file: Path, expected: str, cache: Path | None) -> list[Finding]:
    """Check one file and its cache object (if cached); repair from the good copy, else delete both."""
    here = md5(file) if file.exists() else expected  # a missing file is DVC's to restore: not damage
    obj = cache_object(cache, expected) if cache else None
    stored = md5(obj) if obj and obj.exists() else expected  # a missing object is DVC's business too
    if here == expected and stored == expected:
        return []
    if here != expected and stored == expected and obj is not None and obj.exists():
        _replace(file, obj)
        return [Finding(file, "workspace file damaged", "restored from the cache")]
    if here == expected and obj is not None and stored != expected:
        _replace(obj, file, read_only=True)
        return [Finding(obj, f"cache object of {file} damaged", "rewritten from the workspace file")]
    found = []
    if here != expected:
        _delete(file)
        found.append(Finding(file, "workspace file damaged" + (", and no good copy in the cache" if obj else ""), "deleted"))
    if obj is not None and stored != expected:
        _delete(obj)
        found.append(Finding(obj, f"cache object of {file} damaged", "deleted"))
    return found


def _replace(target: Path, good: Path, read_only: bool = False) -> None:
    """Copy `good` over `target` through a temporary file and a rename."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.copyfile(good, tmp)
    if read_only:
        tmp.chmod(0o444)  # as DVC keeps its cache objects
    os.replace(tmp, target)


def _delete(path: Path) -> None:
    path.unlink(missing_ok=True)
