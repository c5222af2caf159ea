"""`mnist verify`: every byte of the workspace's DVC outputs and of their cache objects against dvc.lock.

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
from dataclasses import dataclass
from pathlib import Path

import yaml

DIR_SUFFIX = ".dir"  # DVC's listing object of a folder output: [{"md5": ..., "relpath": ...}, ...]
BROKEN_LOCK = "dvc.lock.broken"  # where an unreadable dvc.lock is moved (set_aside_unreadable_lock)


def set_aside_unreadable_lock(root: Path) -> str | None:
    """Move `root`/dvc.lock to dvc.lock.broken if DVC cannot read it, and say so; else None.

    DVC rewrites dvc.lock in place after every stage, so a run killed at that moment (SIGTERM to
    its process group, SIGKILL, a power cut) can leave it empty or cut off, and every later `dvc`
    command stops at "'./dvc.lock' validation failed". Without it, `dvc repro` restores each stage
    that had finished from the run-cache and runs the rest. A lock that another DVC command holds
    (it may be writing dvc.lock right now) is left alone.
    """
    import zc.lockfile
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.strictyaml import load

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    try:
        (root / ".dvc" / "tmp").mkdir(exist_ok=True)
        held = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))  # DVC's own lock of the repo
    except (zc.lockfile.LockError, FileNotFoundError):  # a DVC command runs here, or this is no DVC repo
        return None
    try:
        load(str(lock), COMPILED_LOCKFILE_SCHEMA)
        return None
    except DvcException:  # YAML that does not parse, or not DVC's lock schema, or not UTF-8
        lock.replace(root / BROKEN_LOCK)
        return (f"dvc.lock could not be read (a run was stopped while DVC rewrote it); moved to {BROKEN_LOCK}. "
                "DVC restores the stages that had finished from its run-cache and runs the rest.")
    finally:
        held.close()


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
