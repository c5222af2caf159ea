"""Tables as text, all rendered by tabulate: markdown for report.md, TensorBoard and Prefect; columns for a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabulate import tabulate


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are printed as given (no number reformatting)."""
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns under a ruled header, for a terminal."""
    return tabulate(rows, headers=header, tablefmt="simple", disable_numparse=True)
