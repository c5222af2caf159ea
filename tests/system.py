"""The Debian packages some tests need (requirements/system-packages.txt): a skip mark per package,
and the summary line `make test` ends with when any is missing."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

LIST = Path(__file__).resolve().parents[1] / "requirements" / "system-packages.txt"
REASON = "needs Debian's "
INSTALL = "sudo make system-packages"


def packages() -> dict[str, str]:
    """{Debian package: the path (a glob) that shows it is installed}, from the list."""
    found = {}
    for line in LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, path = line.split()[:2]
            found[package] = path
    return found


def missing(package: str) -> bool:
    return not glob.glob(packages()[package])


def needs(package: str) -> pytest.MarkDecorator:
    """Skip the test (or module, as `pytestmark`) when `package` is not installed."""
    return pytest.mark.skipif(missing(package), reason=f"{REASON}{package} ({INSTALL})")


def summary(skip_reasons: list[str]) -> str | None:
    """One line naming the packages whose absence skipped tests, and the command that installs them."""
    wanted: dict[str, int] = {}
    for reason in skip_reasons:
        if REASON in reason:
            package = reason.split(REASON, 1)[1].split()[0]
            wanted[package] = wanted.get(package, 0) + 1
    if not wanted:
        return None
    named = ", ".join(f"{p} ({n} test{'s' if n > 1 else ''})" for p, n in sorted(wanted.items()))
    return f"skipped for want of Debian packages: {named}; install them with: {INSTALL}"
