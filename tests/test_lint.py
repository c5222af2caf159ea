"""Every `noqa` and `type: ignore` in the code names its codes and says why (make lint runs ruff and mypy themselves)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from conftest import REPO

FOLDERS = ("pipeline", "stages", "benchmarks", "tests", "docs")
# A noqa comment: its codes, then " - " or "  # " and the reason. A type-ignore comment: its [codes], then "  # " and the reason.
NOQA = re.compile(r"#\s*noqa(?P<codes>:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<why>\s*(?:-|#)\s*\S.*)?")
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[a-z-]+(?:\s*,\s*[a-z-]+)*\])?(?P<why>\s*#\s*\S.*)?")


def unexplained(source: str) -> list[tuple[int, str]]:
    """(line, comment) of each noqa or type: ignore comment without its codes or without a reason after them."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        for pattern in (NOQA, IGNORE):
            match = pattern.search(token.string)
            if match and not (match["codes"] and match["why"]):
                found.append((token.start[0], token.string))
    return found


def test_every_noqa_and_type_ignore_says_why() -> None:
    problems = [
        f"{path.relative_to(REPO)}:{line}: {comment}"
        for folder in FOLDERS
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, comment in unexplained(path.read_text())
    ]
    assert not problems, "a noqa or type: ignore names its codes and says why in a few words:\n" + "\n".join(problems)


def test_an_unexplained_ignore_is_found() -> None:
    source = (
        "import os  # noqa: F401 - re-exported\n"
        "import sys  # noqa: F401\n"
        "x = 1  # type: ignore[assignment]  # the stub is wrong\n"
        "y = 2  # type: ignore\n"
        "z = 3  # noqa\n"
    )
    assert [line for line, _ in unexplained(source)] == [2, 4, 5]


def test_the_check_reads_comments_only(tmp_path: Path) -> None:
    assert unexplained('text = "# noqa and # type: ignore in a string"\n') == []
