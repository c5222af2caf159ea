"""The suite's tiers and its groups for `make test`'s two processes (docs/testing.md).

`make check` runs the tests of neither tier: no server, no pipeline run. `make test` runs every test
on two processes (pytest-xdist, `--dist loadgroup`), in groups: the tests that read the session's
small run go to one process, which makes that run once, and so do those that read its sweep; every
other test goes with the other tests of its module, so a module's fixtures (a PostgreSQL cluster, an sshd, a trained model) are made once.
The longest groups start first (LONGEST; `make test` keeps that order with --no-loadscope-reorder), so
that the short ones fill the end of both processes.
"""

from __future__ import annotations

import pytest

TIERS = {
    "pipeline": "runs `dvc repro` or `mnist run`, or reads the session's small run",
    "services": "starts a server or a browser (Prefect, TensorBoard, PostgreSQL, sshd, chromium, a package index), "
    "or uses the session's Prefect server",
}
# Modules whose every test is of a tier; the tests of other modules carry their marks themselves.
MODULE_TIERS = {
    "test_breakdown.py": "pipeline",
    "test_bare_repro.py": "pipeline",
    "test_browser.py": "services",
    "test_browser_runs.py": "services",
    "test_chaos.py": "pipeline",
    "test_compare.py": "pipeline",
    "test_dvc_remote.py": "pipeline",
    "test_fanout.py": "services",
    "test_faults.py": "pipeline",
    "test_install.py": "services",
    "test_servers.py": "services",
}
FIXTURE_TIERS = {"small_run": "pipeline", "sweep": "pipeline", "prefect_api": "services"}
SHARED = ("small_run", "sweep")  # the session fixtures whose tests share one process, each its own
# The groups of more than a minute, longest first, from `make test ARGS=--durations=0` on 2 cores
# (Intel Xeon, AMX): small run 700 s, fan-out 270 s, sweep 130 s, chaos 120 s, prefect 110 s,
# install 75 s, servers 70 s. The other groups follow in the order of the files.
LONGEST = ("small_run", "test_fanout.py", "sweep", "test_chaos.py", "test_prefect.py", "test_install.py", "test_servers.py")
# Modules whose tests share no module fixture: each of their tests is a group of its own, so that they fill
# both processes (test_warm.py alone is over a minute of `make check`).
SPREAD = ("test_warm.py", "test_summaries.py", "test_tensorboard.py", "test_fanout_safety.py", "test_imports.py", "test_fetch.py")


def group(item: pytest.Item) -> str:
    """The test's xdist group: the SHARED fixture it reads, else its module's file name (its own id in a SPREAD module)."""
    fixtures = getattr(item, "fixturenames", ())
    shared = next((name for name in SHARED if name in fixtures), None)
    return shared or (item.nodeid if item.path.name in SPREAD else item.path.name)


def longest_first(items: list[pytest.Item]) -> None:
    """Put the tests of the LONGEST groups first, in that order; the others keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(group(item), len(LONGEST)))


def mark(items: list[pytest.Item]) -> None:
    """Add each test's tier marks (from MODULE_TIERS and FIXTURE_TIERS) and its xdist group."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group(group(item)))
        found = {MODULE_TIERS.get(item.path.name)} | {tier for name, tier in FIXTURE_TIERS.items() if name in fixtures}
        for tier in sorted(found - {None} - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, str(tier)))
