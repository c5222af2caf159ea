"""`mnist verify`: every byte of the workspace's DVC outputs and of their cache objects against dvc.lock;
and the set-aside of a dvc.lock that DVC cannot read.

DVC hashes a file again only when its size, inode or modification time changed, so a file
damaged in place (a failing disk, a stray write that kept the time) still passes `dvc status`,
and `dvc checkout` copies a damaged cache object into the workspace without a word. `verify`
reads everything that dvc.lock names and tells damage from a newer output:

- a cache object is damaged when its bytes no longer hash to its name;
- a workspace file is damaged (decayed) when DVC's own record of it (its state database: inode,
  size and modification time, and the hash DVC computed for them) still matches the file and
  says it held the bytes of dvc.lock, but the bytes differ now;
- any other workspace file that differs from dvc.lock is modified: a newer output (a stage that
  was killed before DVC recorded it, a stage run by hand, a `dvc repro` beside this) that DVC
  has not recorded yet. It is reported and left alone, as is an output that a running DVC
  command holds for writing (.dvc/tmp/rwlock).

What has one good copy is repaired from it: a damaged cache object from the workspace file, a
damaged workspace file from the cache. Nothing is deleted: whatever verify replaces or removes
is moved, under its own path, into one folder per run, .dvc/tmp/verify-<UTC time>/ (on the same
disk as the workspace and the cache, so a move is a rename; git and DVC ignore .dvc/tmp).

It holds DVC's repo lock (.dvc/tmp/lock) while it reads dvc.lock and while it changes anything,
and not while it hashes: `dvc repro` gives the lock up while a stage's command runs and takes it
again after, waiting only 3 s for it (dvc/lock.py), so holding it through a long hash would make
a run beside it fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from dvc.repo import Repo

DIR_SUFFIX = ".dir"  # DVC's listing object of a folder output: [{"md5": ..., "relpath": ...}, ...]
BROKEN_LOCK = "dvc.lock.broken"  # where an unreadable dvc.lock is moved: this name, else .1, .2, ... (set_aside_unreadable_lock)
ASIDE_PREFIX = "verify-"  # .dvc/tmp/verify-<UTC time>/: what one `mnist verify` moved aside
LOCK_WAIT_S = 120.0  # how long verify waits for a DVC command that holds the repo lock


# --- DVC's locks -----------------------------------------------------------------------------


class Busy(PipelineError):
    """Another DVC command holds this workspace."""


def rwlock_holders(repo: Repo) -> list[tuple[str, int, str, str]]:
    """(mode, PID, command, path) of every live process in DVC's read/write lock file (.dvc/tmp/rwlock).

    `dvc repro` gives the repo lock up while a stage's command runs, but keeps its outputs
    there for writing and its dependencies for reading until the stage is recorded.
    """
    import psutil

    table = read_rwlock(repo)
    if table is None:
        return [("edit", 0, "a DVC command editing .dvc/tmp/rwlock", str(Path(repo.tmp_dir) / "rwlock"))]
    entries = [("write", info, p) for p, info in table["write"].items()]
    entries += [("read", info, p) for p, infos in table["read"].items() for info in infos]
    return [(mode, info["pid"], info["cmd"], p) for mode, info, p in entries if psutil.pid_exists(info["pid"])]


@contextmanager
def repo_lock(root: Path, wait_s: float = 0.0) -> Iterator[Repo]:
    """The DVC repo at `root` with DVC's exclusive repo lock held (.dvc/tmp/lock, as every DVC command takes it).

    Raise Busy if another process holds it for longer than `wait_s` (DVC's own Lock tries for 3 s).
    """
    from dvc.repo import Repo

    deadline = time.monotonic() + wait_s
    with Repo(str(root)) as repo:
        while not take_repo_lock(repo):
            if time.monotonic() >= deadline:
                raise Busy(
                    f"another DVC command holds this workspace ({Path(repo.tmp_dir) / 'lock'}): "
                    "run it again once that command has finished."
                )
        try:
            yield repo
        finally:
            release_repo_lock(repo)


# --- where DVC has no public API: its locks, its lock-file reader, its state database ----------
# Each is one function over DVC's internals; tests/test_compat.py pins, against the real dvc,
# the behaviour the project relies on, so that a DVC upgrade that changes one fails a test.


def take_repo_lock(repo: Repo) -> bool:
    """Take DVC's repo lock (.dvc/tmp/lock), which every DVC command holds while it works (dvc repro gives
    it up while a stage's command runs); whether it was free within DVC's own wait (3 s)."""
    from dvc.lock import LockError

    try:
        repo.lock.lock()
    except LockError:
        return False
    return True


def release_repo_lock(repo: Repo) -> None:
    """Give back the repo lock that take_repo_lock took."""
    repo.lock.unlock()


def read_rwlock(repo: Repo) -> dict[str, Any] | None:
    """DVC's read/write lock table (.dvc/tmp/rwlock), read under its guard as DVC edits it:
    {"write": {path: {"pid": int, "cmd": str}}, "read": {path: [{"pid": int, "cmd": str}, ...]}}.
    Empty tables when there is none (or one DVC itself would refuse); None while a DVC command edits it."""
    from dvc.lock import LockError, make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK, SCHEMA

    empty: dict[str, Any] = {"write": {}, "read": {}}
    path = Path(repo.tmp_dir) / RWLOCK_FILE
    if not path.exists():
        return empty
    guard = make_lock(
        os.path.join(repo.tmp_dir, RWLOCK_LOCK),
        tmp_dir=repo.tmp_dir,
        hardlink_lock=repo.config["core"].get("hardlink_lock", False),
    )
    try:
        with guard:  # never half-written
            raw = json.loads(path.read_text(encoding="utf-8"))
    except LockError:
        return None
    except (OSError, ValueError):
        return empty
    try:
        table: dict[str, Any] = SCHEMA(raw)
    except Exception:  # noqa: BLE001 - voluptuous.Invalid: a file DVC itself would refuse
        return empty
    return table


def dvc_reads_lock_file(lock: Path) -> bool:
    """Whether DVC's own reader of dvc.lock (strict YAML, checked against its lock-file schema) accepts `lock`."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.strictyaml import load

    try:
        load(str(lock), COMPILED_LOCKFILE_SCHEMA)
    except DvcException:
        return False
    return True


def recorded_md5(repo: Repo, file: Path) -> str | None:
    """The md5 that DVC's state database holds for `file` as it is now (the same inode, size and modification
    time as when DVC hashed it), or None."""
    _, hash_info = repo.state.get(str(file), repo.fs)
    return hash_info.value if hash_info is not None else None


# --- an unreadable dvc.lock ------------------------------------------------------------------


def lock_problem(lock: Path) -> str | None:
    """What keeps DVC from reading `lock` ("empty", "conflict", ...: see LOCK_PROBLEMS), or None if it reads."""
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
    if not dvc_reads_lock_file(lock):
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
    return (
        f"dvc.lock could not be read: {LOCK_PROBLEMS[problem]}. Moved to {kept.name} (earlier copies are kept). "
        "DVC rewrites dvc.lock after every stage, so a run stopped at that moment can leave it so (an edit can too). "
        "DVC restores the stages that had finished from its run-cache and runs the rest."
    )


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
    path: Path  # the workspace file, or the cache object (absolute)
    what: str  # "workspace file damaged", "modified since dvc.lock recorded it", ...
    action: str  # "restored from the cache", "moved aside", "left alone", ...
    aside: Path | None = None  # where the damaged copy went
    damage: bool = True  # False for a modified or busy output: no damage, left alone


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    aside: Path | None = None  # the folder of this run's moved-aside copies, if any

    @property
    def damaged(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]


@dataclass(frozen=True)
class Item:
    """One file that dvc.lock records: a file output, or a file of a folder output."""

    file: Path  # absolute
    md5: str
    cached: bool
    output: str  # the dvc.lock output it belongs to
    output_md5: str  # that output's md5 in dvc.lock (a listing's, for a folder)


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


def cache_object(cache: Path, md5_hex: str) -> Path:
    return cache / md5_hex[:2] / md5_hex[2:]


def locked_outputs(repo: Repo) -> list[tuple[str, str, bool]]:
    """(path, md5, cached) of every stage output in dvc.lock (md5 ends in '.dir' for a folder).
    `cache: false` outputs (metrics, plots) have no cache object. Call with the repo lock held."""
    from dvc.exceptions import DvcException

    base = Path(repo.root_dir)
    lock = base / "dvc.lock"
    if not lock.exists():
        return []
    try:
        uncached = {
            Path(out.fs_path).relative_to(base).as_posix()
            for stage in repo.index.stages
            for out in stage.outs
            if not out.use_cache
        }
        recorded = yaml.safe_load(lock.read_text()) or {}
    except (DvcException, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PipelineError(f"dvc.lock cannot be read ({exc}); `mnist run` sets an unreadable one aside.") from None
    return [
        (out["path"], out["md5"], out["path"] not in uncached)
        for stage in (recorded.get("stages") or {}).values()
        for out in stage.get("outs", [])
        if "md5" in out
    ]


def _items(root: Path, outputs: list[tuple[str, str, bool]], cache: Path, report: Report) -> list[Item]:
    """Every file of `outputs`; a folder's damaged listing object is moved aside (reported) and its files skipped."""
    items = []
    for path, expected, cached in outputs:
        if not expected.endswith(DIR_SUFFIX):
            items.append(Item(root / path, expected, cached, path, expected))
            continue
        listing = cache_object(cache, expected)
        if not listing.exists():
            continue  # not in the cache: DVC's to fetch or make
        if md5(listing) != expected.removesuffix(DIR_SUFFIX):
            aside = _move_aside(root, listing, report)
            report.findings.append(Finding(listing, f"the listing of {path} in the cache is damaged", "moved aside", aside))
            continue  # without its listing, DVC itself reports the folder as not in cache
        for entry in json.loads(listing.read_text()):
            items.append(Item(root / path / entry["relpath"], entry["md5"], True, path, expected))
    return items


def verify(root: Path, wait_s: float | None = None) -> Report:
    """Check every file that dvc.lock records, and its cache object; repair or move aside what is damaged.
    Waits `wait_s` (default LOCK_WAIT_S) for a DVC command that holds the repo lock, then raises Busy."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    report = Report()
    with repo_lock(root, wait_s) as repo:
        root = Path(repo.root_dir)
        cache = Path(repo.cache.local.path)
        outputs = locked_outputs(repo)
        items = _items(root, outputs, cache, report)
        busy = {p: f"PID {pid}: {cmd}" for mode, pid, cmd, p in rwlock_holders(repo) if mode in ("write", "edit")}
    suspects = [item for item in items if _looks_wrong(item, cache)]  # hashing: no lock held
    if not suspects:
        return report
    with repo_lock(root, wait_s) as repo:
        still = {(path, md5_) for path, md5_, _ in locked_outputs(repo)}
        busy.update({p: f"PID {pid}: {cmd}" for mode, pid, cmd, p in rwlock_holders(repo) if mode in ("write", "edit")})
        for item in suspects:
            if (item.output, item.output_md5) not in still:
                continue  # DVC recorded a new version meanwhile
            writer = next((who for p, who in busy.items() if _overlaps(item.file, Path(p))), None)
            if writer:
                report.findings.append(
                    Finding(item.file, f"being written by a DVC command ({writer})", "left alone", damage=False)
                )
                continue
            report.findings += check_file(root, item, cache if item.cached else None, _state(repo), report)
    return report


def _looks_wrong(item: Item, cache: Path) -> bool:
    """Whether the file or its cache object differs from dvc.lock (a missing one is DVC's to restore)."""
    if item.file.exists() and md5(item.file) != item.md5:
        return True
    obj = cache_object(cache, item.md5)
    return item.cached and obj.exists() and md5(obj) != item.md5


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _state(repo: Repo) -> Callable[[Path], str | None]:
    """A function: the md5 that DVC's state database holds for a file as it is now (same inode, size and
    modification time as when DVC hashed it), or None."""

    def recorded(file: Path) -> str | None:
        return recorded_md5(repo, file)

    return recorded


def check_file(
    root: Path, item: Item, cache: Path | None, recorded: Callable[[Path], str | None], report: Report
) -> list[Finding]:
    """Check one file and its cache object (if cached) and repair what is damaged (call with the repo lock held).

    `recorded(file)` is the md5 DVC's state database holds for the file as it is now: the file
    is damaged only if that is dvc.lock's md5 and its bytes are not.
    """
    file, expected = item.file, item.md5
    here = md5(file) if file.exists() else expected  # a missing file is DVC's to restore: not damage
    obj = cache_object(cache, expected) if cache else None
    bad_obj = obj if obj is not None and obj.exists() and md5(obj) != expected else None  # a missing one is DVC's business
    found = []
    if here != expected and recorded(file) != expected:
        found.append(
            Finding(file, "modified since dvc.lock recorded it (a newer output, not damage)", "left alone", damage=False)
        )
    elif here != expected and bad_obj is None and obj is not None and obj.exists():
        return [Finding(file, "workspace file damaged", "restored from the cache", _replace(root, file, obj, report))]
    elif here != expected:
        found.append(
            Finding(
                file,
                "workspace file damaged" + (", and no good copy in the cache" if cache else ""),
                "moved aside",
                _move_aside(root, file, report),
            )
        )
    elif bad_obj is not None:
        aside = _replace(root, bad_obj, file, report, read_only=True)
        return [Finding(bad_obj, f"cache object of {_rel(root, file)} damaged", "rewritten from the workspace file", aside)]
    if bad_obj is not None:
        found.append(
            Finding(bad_obj, f"cache object of {_rel(root, file)} damaged", "moved aside", _move_aside(root, bad_obj, report))
        )
    return found


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _aside_folder(root: Path, report: Report) -> Path:
    """This run's folder under .dvc/tmp, made at its first use: verify-<UTC time>[-N]."""
    if report.aside is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1, 1000):
            folder = root / ".dvc" / "tmp" / (f"{ASIDE_PREFIX}{stamp}" + (f"-{n}" if n > 1 else ""))
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        report.aside = folder
    return report.aside


def _move_aside(root: Path, path: Path, report: Report) -> Path:
    """Move `path` into this run's aside folder, under its path in the project (or cache/<xx>/<rest>)."""
    where = path.relative_to(root) if path.is_relative_to(root) else Path("cache") / path.parent.name / path.name
    dest = _aside_folder(root, report) / where
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def _replace(root: Path, target: Path, good: Path, report: Report, read_only: bool = False) -> Path:
    """Put a copy of `good` in place of `target`, whose damaged copy goes aside; return where it went."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.copyfile(good, tmp)
    if read_only:
        tmp.chmod(0o444)  # as DVC keeps its cache objects
    aside = _move_aside(root, target, report)
    os.replace(tmp, target)
    return aside
