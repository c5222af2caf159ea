"""The lock files: every package pinned with its hashes, in step with pyproject.toml and with this environment."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

LOCKS = {
    "runtime": REPO / "requirements" / "runtime.lock",
    "test": REPO / "requirements" / "test.lock",
    "gpu": REPO / "requirements" / "gpu.lock",  # runtime.lock plus TensorFlow's CUDA libraries: make setup-gpu
}
INSTALLED = ("runtime", "test")  # what make setup installs
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)(?: ; (?P<marker>[^\\]+?))? \\$")


def entries(lock: str) -> dict[str, tuple[str, str | None, int]]:
    """Each package of a lock file: its version, its environment marker and how many hashes follow it."""
    found: dict[str, tuple[str, str | None, int]] = {}
    name = None
    for line in LOCKS[lock].read_text().splitlines():
        if match := ENTRY.match(line):
            name = canonicalize_name(match["name"])
            found[name] = (match["version"], match["marker"], 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            pinned, marker, hashes = found[name]
            found[name] = (pinned, marker, hashes + 1)
        elif line and not line.startswith(" "):
            assert line.startswith("#"), f"{LOCKS[lock].name}: not a pinned requirement: {line!r}"
    return found


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_locked_package_is_pinned_with_a_hash(lock: str) -> None:
    found = entries(lock)
    assert len(found) >= (100 if lock == "runtime" else 2)
    assert not [name for name, (_, _, hashes) in found.items() if hashes == 0]


def test_the_locks_pin_what_pyproject_asks_for() -> None:
    """A version changed in pyproject.toml without `make lock` fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    gpu = project["project"]["optional-dependencies"]["gpu"]
    for lock, wanted in (
        ("runtime", project["project"]["dependencies"]),
        ("test", project["dependency-groups"]["test"]),
        ("gpu", gpu),
    ):
        found = entries(lock)
        for spec in map(Requirement, wanted):
            pinned = found.get(canonicalize_name(spec.name), ("missing",))[0]
            assert spec.specifier.contains(pinned), f"{spec} but {LOCKS[lock].name} has {pinned}: run `make lock`"


def test_this_environment_is_the_locked_one() -> None:
    """Every package the locks name for this platform is installed at the locked version."""
    wrong = []
    for lock in INSTALLED:
        for name, (pinned, marker, _) in entries(lock).items():
            if marker and not Marker(marker).evaluate():
                continue
            try:
                installed = version(name)
            except PackageNotFoundError:
                installed = "not installed"
            if installed != pinned:
                wrong.append(f"{name}: {installed}, locked {pinned}")
    assert not wrong, f"{wrong}: run `make setup` in a fresh .venv"


def test_the_gpu_lock_is_the_runtime_lock_plus_tensorflows_cuda_libraries() -> None:
    runtime, gpu = entries("runtime"), entries("gpu")
    assert {name: entry[0] for name, entry in runtime.items()} == {name: gpu[name][0] for name in runtime}
    added = set(gpu) - set(runtime)
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= added, sorted(added)
    assert all(name.startswith("nvidia-") for name in added), sorted(added)


def test_dvc_reads_yaml_with_the_c_parser() -> None:
    """ruamel.yaml.clib is installed and used: DVC's safe YAML loads (dvc.lock at every stage) take the C parser."""
    from dvc.utils.serialize import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.clib"), "ruamel.yaml.clib missing: run `make setup`"
    lock = (REPO / "dvc.lock").read_text()
    assert parse_yaml(lock, "dvc.lock") == YAML(typ="safe", pure=True).load(lock)
