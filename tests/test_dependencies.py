"""Every third-party package the code imports is a declared dependency, not one that only arrives through another.

The imports of pipeline/, stages/, benchmarks/ and tests/ are read with ast (nothing is imported). A top-level
module that is neither the standard library's nor the project's own is mapped to its distribution with
importlib.metadata.packages_distributions(). pipeline/ and stages/ need it in pyproject.toml's
[project] dependencies (what the stages run with); benchmarks/ and tests/ there or in the dependency group `test`.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

RUNTIME_FOLDERS = ("pipeline", "stages")  # the stages import these: the runtime dependencies must cover them
TEST_FOLDERS = ("benchmarks", "tests")  # run from the full environment: the test group counts too
FIRST_PARTY = {"pipeline", "stages", "benchmarks"} | {p.stem for p in (REPO / "tests").glob("*.py")}  # tests/ is on sys.path


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module name) of each absolute import in a file, wherever it is (function, if, try)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


@cache
def top_level_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # every installed distribution's metadata read: once


@cache
def files_of(dist: str) -> tuple[str, ...]:
    return tuple(str(f) for f in distribution(dist).files or ())


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide `module`: the one whose files hold its deepest package, when
    several share its top-level name (ruamel: ruamel.yaml and ruamel.yaml.clib)."""
    candidates = sorted(set(top_level_distributions().get(module.split(".")[0], [])))
    parts = module.split(".")
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        providing = [d for d in candidates if any(f.startswith((prefix + "/", prefix + ".")) for f in files_of(d))]
        if providing:
            return providing
    return candidates


def declared() -> tuple[set[str], set[str]]:
    """The canonical names of pyproject.toml's runtime dependencies and of its group `test`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = {canonicalize_name(Requirement(spec).name) for spec in project["project"]["dependencies"]}
    test = {canonicalize_name(Requirement(spec).name) for spec in project["dependency-groups"]["test"]}
    return runtime, test


def undeclared(paths: list[Path], allowed: set[str]) -> list[str]:
    """One line per third-party import in `paths` whose distribution is not in `allowed`."""
    problems = []
    for path in paths:
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY:
                continue
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}: import {module}"
            dists = distributions_of(module)
            if not dists:
                problems.append(f"{where}: no installed distribution provides it")
            elif not {canonicalize_name(d) for d in dists} & allowed:
                problems.append(f"{where}: {' or '.join(dists)} is not declared in pyproject.toml")
    return problems


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_every_third_party_import_is_a_declared_dependency() -> None:
    runtime, test = declared()
    problems = undeclared(python_files(*RUNTIME_FOLDERS), runtime)
    problems += undeclared(python_files(*TEST_FOLDERS), runtime | test)
    assert not problems, "\n".join(problems)


def test_an_undeclared_import_is_found(tmp_path: Path) -> None:
    """jsonschema is installed (DVC needs it) but not declared; the standard library and the project's own are not named."""
    (tmp_path / "sample.py").write_text(
        "import json\nimport yaml\nfrom pipeline import errors\n\ndef f():\n    import jsonschema\n"
    )
    runtime, _ = declared()
    assert undeclared([tmp_path / "sample.py"], runtime) == [
        f"{tmp_path / 'sample.py'}:6: import jsonschema: jsonschema is not declared in pyproject.toml"
    ]


def test_a_test_only_package_is_not_enough_for_the_runtime(tmp_path: Path) -> None:
    (tmp_path / "stage.py").write_text("import pytest\n")
    runtime, test = declared()
    assert undeclared([tmp_path / "stage.py"], runtime | test) == []
    assert undeclared([tmp_path / "stage.py"], runtime) == [
        f"{tmp_path / 'stage.py'}:1: import pytest: pytest is not declared in pyproject.toml"
    ]


def test_a_namespace_package_maps_to_the_distribution_that_holds_the_module() -> None:
    assert distributions_of("ruamel.yaml") == ["ruamel.yaml"]
    assert distributions_of("yaml") == ["PyYAML"]
