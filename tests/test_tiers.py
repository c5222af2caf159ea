"""The tiers and groups of tests/tiers.py, as pytest and pytest-xdist apply them.

`make test` relies on pytest-xdist's `--dist loadgroup` keeping the tests of one group in one process
(with pytest 9.2.0 it silently stops doing so: pytest-dev/pytest-xdist#1386, so pyproject.toml holds
pytest at 9.1.1). These tests run a small suite of their own in a subprocess, so an upgrade that
breaks either fails here rather than making every test of the small run build it again.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import tiers

TESTS = Path(__file__).parent

CONFTEST = """
import os
import pytest
import tiers

@pytest.fixture(scope="session")
def small_run():
    with open("built", "a") as out:
        out.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    tiers.mark(items)

def pytest_configure(config):
    for name, meaning in tiers.TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
"""

MODULE = """
def test_reads_the_run(small_run): pass
def test_needs_nothing(): pass
def test_reads_it_too(small_run): pass
"""


def mini_suite(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Four test modules, each with two tests that read `small_run` and one that needs nothing, run by pytest."""
    (root / "conftest.py").write_text(CONFTEST)
    for i in range(4):
        (root / f"test_m{i}.py").write_text(MODULE)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=root,
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_make_the_small_run_once(tmp_path: Path) -> None:
    done = mini_suite(tmp_path, "-n", "2", "--dist", "loadgroup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 passed" in done.stdout, done.stdout
    built = (tmp_path / "built").read_text().split()
    assert len(built) == 1, f"the small run was made by {built}: the tests that read it were spread over processes"


def test_each_test_of_a_spread_module_is_a_group_and_other_modules_stay_together() -> None:
    def group(path: str, name: str, *fixtures: str) -> str:
        item = SimpleNamespace(path=TESTS / path, nodeid=f"tests/{path}::{name}", fixturenames=fixtures)  # what group reads
        return tiers.group(item)

    assert group("test_warm.py", "test_a") == "tests/test_warm.py::test_a" != group("test_warm.py", "test_b")
    assert group("test_warm.py", "test_c", "small_run") == "small_run"
    assert group("test_train.py", "test_a") == group("test_train.py", "test_b") == "test_train.py"
    for name in tiers.SPREAD:  # a module fixture would be made once per test: such a module must leave SPREAD
        text = (TESTS / name).read_text()
        assert 'scope="module"' not in text and 'scope="session"' not in text, name


@pytest.mark.parametrize(
    ("expression", "selected"),
    [("not pipeline and not services", 4), ("pipeline", 8)],
)
def test_the_tiers_select_by_what_a_test_uses(tmp_path: Path, expression: str, selected: int) -> None:
    done = mini_suite(tmp_path, "-m", expression)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{selected} passed" in done.stdout, done.stdout


def test_a_hanging_test_fails_alone_and_the_suite_goes_on(tmp_path: Path) -> None:
    """pyproject.toml's pytest-timeout limit: a test stuck past it fails with the stacks of its threads,
    and the tests after it still run (so CI names the test instead of running out of time)."""
    limit = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["timeout"]
    assert 0 < limit <= 1800, limit
    (tmp_path / "test_hang.py").write_text("import time\ndef test_stuck(): time.sleep(600)\ndef test_after(): pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "timeout=2"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert "test_stuck - Failed: Timeout (>2.0s) from pytest-timeout" in done.stdout, done.stdout
