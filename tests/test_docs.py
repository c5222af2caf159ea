"""The documentation names only what exists.

For README.md, CHANGELOG.md and docs/*.md:

- every relative link and image resolves to a file of the repository, and every `#anchor`
  to a heading of the page it points at (GitHub's anchors: lower case, punctuation dropped,
  spaces as hyphens, `-1`, `-2` ... for repeats);
- in code (fenced blocks and `inline spans`; the docs use no indented code blocks, and a
  block fenced as `text` or `output` is what a program prints, so it is not checked):
  - every `make TARGET` is a target of the Makefile;
  - every `mnist SUBCOMMAND --option` is a subcommand and an option of the parser that
    pipeline.cli builds (`mnist run` passes options it does not know to `dvc repro`);
  - every dotted params.yaml key (`models.cnn.epochs`, `data.limit`, `-S key=value`; `<model>`
    stands for any key) is a key of params.yaml;
  - every path under a tracked top-level folder (`pipeline/stage.py`, `stages/<stage>.py`,
    `requirements/*.lock`) matches a file or folder, and every module named
    `pipeline.x`, `benchmarks.x`, `stages.x` or `tests.x` exists. Paths under data/ and .dvc/
    are pipeline outputs and DVC state, not repository files, so they are not checked.

Nothing runs: the Makefile and params.yaml are read, the parser is built and not called.
`test_checks_can_fail` feeds the checks one broken reference of each kind.
"""

from __future__ import annotations

import argparse
import glob
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in [REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")] if p.is_file())
UNCHECKED_TOP = {"data", ".dvc"}  # outputs and DVC state: named by their shape, absent in a fresh clone
FILE_SUFFIXES = {
    "py",
    "json",
    "md",
    "yaml",
    "yml",
    "lock",
    "png",
    "csv",
    "tsv",
    "keras",
    "npz",
    "pb",
    "txt",
    "sh",
    "in",
    "toml",
    "log",
    "gz",
    "html",
    "cfg",
}
MODULE_ROOTS = ("pipeline", "benchmarks", "stages", "tests")

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
OUTPUT_FENCES = {"text", "output"}  # what a program prints (an error message, a table), not commands
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
INLINE_CODE = re.compile(r"(`+)([^`][\s\S]*?)\1")
PARAM_KEY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.(?:[a-z0-9_]+|<[a-z_]+>))+$")
PLACEHOLDER = re.compile(r"<[^<>/]+>")


# --- the page: prose, headings and code --------------------------------------------------------


@dataclass
class Page:
    name: str  # as the messages show it, e.g. docs/install.md
    folder: Path  # what its relative links are relative to
    prose: list[str] = field(default_factory=list)  # lines outside code blocks, inline code removed
    headings: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)  # code-block lines and inline code spans


def read_page(name: str, text: str, folder: Path) -> Page:
    page = Page(name, folder)
    fence, output, paragraph = None, False, []

    def end_paragraph():
        joined = "\n".join(paragraph)  # an inline span may run over a line break
        page.code.extend(" ".join(span.split()) for _, span in INLINE_CODE.findall(joined))
        page.prose.extend(INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), joined).split("\n"))
        paragraph.clear()

    for line in text.splitlines():
        match = FENCE.match(line)
        if fence:
            if match and match.group(1) == fence and not match.group(2):
                fence = None
            elif not output:
                page.code.append(line)
            continue
        if match:
            end_paragraph()
            fence, output = match.group(1), match.group(2) in OUTPUT_FENCES
            continue
        heading = HEADING.match(line)
        if heading:
            page.headings.append(heading.group(2))
        if not line.strip() or heading:
            end_paragraph()
        paragraph.append(line)
    end_paragraph()
    return page


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in page.headings:
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    for line in page.prose:
        found.update(HTML_ANCHOR.findall(line))
    return found


PREFIXES = {"sudo", "time", "env", "nice", "exec"}


def invoked(tokens: list[str], program: str) -> int | None:
    """Where `program` (or a path ending in /program) is the command run, after any VAR=value and sudo/time; else None."""
    for i, token in enumerate(tokens):
        if token in PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", token):
            continue
        return i if token == program or token.endswith("/" + program) else None
    return None


def commands(page: Page) -> list[list[str]]:
    """Each shell command of the page's code, as tokens: comments dropped, split at && ; | ( $(."""
    result = []
    for code in page.code:
        code = re.sub(r"(^|\s)#.*$", "", code)
        for part in re.split(r"&&|\|\||[;|()]|\$\(", code):
            try:
                tokens = shlex.split(part)
            except ValueError:
                tokens = part.split()
            if tokens:
                result.append(tokens)
    return result


# --- what exists -------------------------------------------------------------------------------


@dataclass
class Facts:
    repo: Path
    make_targets: set[str]
    mnist: argparse.ArgumentParser
    params: dict
    tracked_top: set[str]
    pages: dict[Path, Page]


def makefile_targets(makefile: Path) -> set[str]:
    targets = set()
    for line in makefile.read_text().splitlines():
        if line.startswith(("\t", "#", " ")) or "$" in line.split(":")[0]:
            continue
        match = re.match(r"^([A-Za-z0-9_.%/-]+(?:\s+[A-Za-z0-9_.%/-]+)*)\s*::?(?![=])", line)
        if match:
            targets.update(name for name in match.group(1).split() if not name.startswith("."))
    return targets


def mnist_parser() -> argparse.ArgumentParser:
    """The `mnist` command's parser, as pipeline.cli builds it (caught on its way to parsing: nothing runs)."""
    from pipeline import cli

    build = getattr(cli, "build_parser", None)
    if callable(build):
        return build()

    class Built(Exception):
        def __init__(self, parser: argparse.ArgumentParser):
            self.parser = parser

    def catch(self, *args, **kwargs):
        raise Built(self)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch),
        mock.patch.object(argparse.ArgumentParser, "parse_args", catch),
    ):
        try:
            cli.main([])
        except Built as built:
            return built.parser
    raise AssertionError("pipeline.cli.main built no argparse parser")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def passes_options_on(parser: argparse.ArgumentParser) -> bool:
    return any(action.nargs == argparse.REMAINDER for action in parser._actions)


# --- the checks: each returns its problems, one line each ----------------------------------------


def check_links(page: Page, facts: Facts) -> list[str]:
    problems = []
    for line in page.prose:
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            file = (page.folder / path_part).resolve() if path_part else None
            if file is not None and not file.exists():
                problems.append(f"{page.name}: link to {target}: no such file")
                continue
            if not anchor:
                continue
            linked = facts.pages.get(file) if file is not None else page
            if linked is None:
                if file is not None and file.suffix == ".md" and file.is_file():
                    linked = read_page(str(file), file.read_text(), file.parent)
                else:
                    problems.append(f"{page.name}: link to {target}: an anchor into a file that is not a page")
                    continue
            if anchor not in anchors(linked):
                problems.append(f"{page.name}: link to {target}: no heading with anchor #{anchor}")
    return problems


def check_make(page: Page, facts: Facts) -> list[str]:
    problems = []
    for tokens in commands(page):
        i = invoked(tokens, "make")
        if i is None:
            continue
        rest = [t for t in tokens[i + 1 :] if not t.startswith("-") and "=" not in t]
        if rest and rest[0] not in facts.make_targets:
            problems.append(f"{page.name}: `make {rest[0]}`: the Makefile has no target {rest[0]!r}")
    return problems


def check_mnist(page: Page, facts: Facts) -> list[str]:
    problems = []
    subs = subcommands(facts.mnist)
    top_options = options(facts.mnist)
    for tokens in commands(page):
        i = invoked(tokens, "mnist")
        if i is None:
            continue
        rest = tokens[i + 1 :]
        while rest and rest[0].startswith("-"):  # options before the subcommand: mnist --help
            if rest[0].split("=")[0] not in top_options:
                problems.append(f"{page.name}: `mnist {rest[0]}`: no such option")
            rest = rest[1:]
        if not rest or not re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            continue
        name = rest[0]
        if name not in subs:
            problems.append(f"{page.name}: `mnist {name}`: no such subcommand (there are {', '.join(sorted(subs))})")
            continue
        known = options(subs[name]) | top_options
        for word in rest[1:]:
            if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[\d.]+", word):
                flag = word.split("=")[0]
                if flag not in known and not passes_options_on(subs[name]):
                    problems.append(f"{page.name}: `mnist {name} {flag}`: no such option of mnist {name}")
    return problems


def has_key(tree, parts: list[str]) -> bool:
    if not parts:
        return True
    if not isinstance(tree, dict):
        return False
    head, rest = parts[0], parts[1:]
    if head.startswith("<"):
        return any(has_key(child, rest) for child in tree.values())
    return head in tree and has_key(tree[head], rest)


def check_params(page: Page, facts: Facts) -> list[str]:
    problems = []
    for tokens in commands(page):
        for token in tokens:
            for word in token.split():
                key = word.split("=")[0].strip(",.;:'\"")
                if not PARAM_KEY.match(key) or key.split(".")[0] not in facts.params:
                    continue
                if key.rsplit(".", 1)[1] in FILE_SUFFIXES:  # export.json, train.py: a file, not a key
                    continue
                if not has_key(facts.params, key.split(".")):
                    problems.append(f"{page.name}: params key {key}: not in params.yaml")
    return problems


def check_paths(page: Page, facts: Facts) -> list[str]:
    problems = []
    for tokens in commands(page):
        if tokens[0] == "prefect":  # its arguments name flows, deployments and pools, not files
            continue
        for token in tokens:
            for word in token.split():
                word = word.strip(",;:'\"`)(").rstrip(".")
                if word.startswith("./"):
                    word = word[2:]
                if "/" in word and word.split("/")[0] in facts.tracked_top - UNCHECKED_TOP:
                    pattern = PLACEHOLDER.sub("*", word).rstrip("/")
                    if not glob.glob(str(facts.repo / pattern)):
                        problems.append(f"{page.name}: path {word}: no such file or folder")
                elif re.fullmatch(rf"(?:{'|'.join(MODULE_ROOTS)})(?:\.[A-Za-z_][A-Za-z0-9_]*)+", word):
                    parts = word.split(".")
                    if not (
                        facts.repo.joinpath(*parts[:2]).with_suffix(".py").is_file()
                        or (facts.repo.joinpath(*parts[:2]) / "__init__.py").is_file()
                    ):
                        problems.append(f"{page.name}: module {word}: no such module")
    return problems


CHECKS = (check_links, check_make, check_mnist, check_params, check_paths)


# --- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts() -> Facts:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    pages = {path.resolve(): read_page(str(path.relative_to(REPO)), path.read_text(), path.parent) for path in PAGES}
    return Facts(
        repo=REPO,
        make_targets=makefile_targets(REPO / "Makefile"),
        mnist=mnist_parser(),
        params=yaml.safe_load((REPO / "params.yaml").read_text()),
        tracked_top={line.split("/")[0] for line in tracked.splitlines()} | {"docs"},
        pages=pages,
    )


def test_the_pages_exist():
    assert (REPO / "README.md").is_file() and (REPO / "CHANGELOG.md").is_file()
    assert len(PAGES) > 2, "docs/ holds the topic pages"


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_docs_name_only_what_exists(check, facts):
    problems = [p for page in facts.pages.values() for p in check(page, facts)]
    assert not problems, "\n".join(problems)


def test_the_readme_fits_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_slugs_are_githubs():
    assert slug("Beyond one machine: model chains on Prefect workers") == "beyond-one-machine-model-chains-on-prefect-workers"
    assert slug("`make run`, `make test`") == "make-run-make-test"
    assert slug("Same inputs, same bytes") == "same-inputs-same-bytes"
    assert slug("deep_mlp and [the notes](x.md)") == "deep_mlp-and-the-notes"
    page = read_page("p", "# A\n## A\n## A\n", REPO)
    assert anchors(page) == {"a", "a-1", "a-2"}


def test_checks_can_fail(facts, tmp_path):
    """Each check reports a broken reference of its kind, and passes the same text repaired."""
    broken = {
        check_links: "[x](docs/no-such-page.md) and [y](#no-such-heading)\n# Real heading\n",
        check_make: "Run `make no-such-target`.\n",
        check_mnist: "```sh\nmnist no-such-command\nmnist compare --no-such-option\n```\n",
        check_params: "`dvc exp run -S models.cnn.no_such_knob=1` and `data.no_such_key`\n",
        check_paths: "See `pipeline/no_such_file.py` and `pipeline.no_such_module`.\n",
    }
    repaired = {
        check_links: "[x](README.md) and [y](#real-heading)\n# Real heading\n",
        check_make: "Run `make test`.\n",
        check_mnist: "```sh\nmnist run --force\nmnist compare --no-serve\n```\n",
        check_params: "`dvc exp run -S models.cnn.epochs=1` and `data.limit`\n",
        check_paths: "See `pipeline/cli.py` and `pipeline.cli`.\n",
    }
    expected = {check_links: 2, check_make: 1, check_mnist: 2, check_params: 2, check_paths: 2}
    for check, text in broken.items():
        problems = check(read_page("broken.md", text, REPO), facts)
        assert len(problems) == expected[check], (check.__name__, problems)
        assert check(read_page("fixed.md", repaired[check], REPO), facts) == [], check.__name__
