"""The code's structure: each DVC stage depends on exactly the project modules it runs, and imports form no cycle.

Both are read from the source (every `import`, at module level or inside a function), so
the next module added is checked without anyone listing it here.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, SmallRun, dvc
from helpers import load_stage

PACKAGE = "pipeline"


def module_files(dotted: str) -> list[Path]:
    """The files Python runs to import `dotted` (each package's __init__.py on the way), if it is a project module."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return []
    files = []
    for i in range(1, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
        else:
            break  # a name inside the module (a class, a function), not a module
    return files


def imported_files(path: Path) -> set[Path]:
    """The project files that importing or running `path` imports directly."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; the project imports absolutely"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.update(module_files(name))
    return found - {path}


def closure(script: Path) -> set[Path]:
    """`script` and every project file it imports, directly or not."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path))
    return seen


def dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """Every stage of dvc.yaml (foreach expanded by DVC itself): its command and its dependencies."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {s.name: (s.cmd, [d.def_path for d in s.deps]) for s in repo.index.stages}


LAUNCHER = ["python", "-m", "pipeline.warm"]  # runs the script, warm or cold (pipeline/warm.py)


def stage_script(cmd: str) -> Path:
    words = shlex.split(cmd)
    assert words[:3] == LAUNCHER and words[3].endswith(".py"), (
        f"a stage runs `python -m pipeline.warm stages/<stage>.py ...`, not {cmd!r}"
    )
    return REPO / words[3]


def stage_arguments(cmd: str) -> list[str]:
    """The stage script's own arguments in a dvc.yaml command."""
    return shlex.split(cmd)[len(LAUNCHER) + 1 :]


def project_modules() -> list[Path]:
    return sorted((REPO / PACKAGE).rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))


def rel(paths) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in paths)


def code_deps(deps: list[str]) -> set[str]:
    """The Python files among a stage's dependencies; a folder of code (pipeline/models) stands for every .py in it."""
    files = set()
    for dep in deps:
        path = REPO / dep
        if dep.endswith(".py"):
            files.add(dep)
        elif path.is_dir() and dep.startswith((PACKAGE + "/", "stages/")):
            files.update(rel(path.rglob("*.py")))
    return files


def test_every_stage_depends_on_exactly_the_code_it_runs() -> None:
    stages = dvc_stages()
    assert len(stages) >= 6
    for name, (cmd, deps) in stages.items():
        script = stage_script(cmd)
        code = code_deps(deps)
        runs = set(rel(closure(script) | closure(REPO / "pipeline" / "warm.py")))
        assert script.name == f"{name.split('@')[0]}.py", f"stage {name} runs {script.name}: name the file after the stage"
        missing, extra = sorted(runs - code), sorted(code - runs)
        assert not missing and not extra, (
            f"dvc.yaml stage {name}: add to its deps {missing}; remove from them {extra} (it does not import them)"
        )


def test_every_stage_command_is_the_command_line_of_its_flow() -> None:
    """dvc.yaml's arguments are exactly the flow's parameters: pipeline.stage reads them off the flow."""
    from pipeline.stage import parse_arguments

    for name, (cmd, _) in dvc_stages().items():
        stage = name.split("@")[0]
        flow = getattr(load_stage(stage), f"{stage}_flow")
        arguments = parse_arguments(flow, stage_arguments(cmd))
        assert set(arguments) == set(flow.parameters.properties) - {"params"}, name
        assert arguments.get("model", name.partition("@")[2] or None) == (name.partition("@")[2] or None)


def test_the_gpu_check_runs_each_stage_with_the_options_dvc_yaml_gives_it() -> None:
    """benchmarks/gpu_check.sh runs the stage scripts itself, into a scratch folder: with dvc.yaml's options, no other."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    used = {m[1]: options(shlex.split(m[2])) for m in re.finditer(r"stages/(\w+)\.py([^\n]*)", script)}
    given = {name.split("@")[0]: options(stage_arguments(cmd)) for name, (cmd, _) in dvc_stages().items()}
    assert set(used) == {"fetch", "preprocess", "train", "evaluate"}
    for stage, opts in used.items():
        assert opts == given[stage], (
            f"benchmarks/gpu_check.sh runs stages/{stage}.py with {sorted(opts)}, dvc.yaml with {sorted(given[stage])}"
        )


def options(words: list[str]) -> set[str]:
    return {w for w in words if w.startswith("--")}


def test_the_cli_the_end_to_end_flow_and_the_benchmarks_are_in_no_stage() -> None:
    outside = {
        "pipeline/cli.py",
        "pipeline/compare.py",
        "pipeline/dag.py",
        "pipeline/integrity.py",
        "pipeline/servers.py",
        "pipeline/tutorials.py",
    }
    for name, (cmd, _) in dvc_stages().items():
        assert not outside & set(rel(closure(stage_script(cmd)))), name


def test_config_never_imports_the_models() -> None:
    assert not [p for p in rel(closure(REPO / PACKAGE / "config.py")) if p.startswith("pipeline/models")]


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    """One import cycle in `graph`, as the list of files around it, or None."""
    state: dict[Path, str] = {}
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle() -> None:
    graph = {path: imported_files(path) for path in project_modules()}
    for targets in graph.values():
        for target in targets:
            graph.setdefault(target, imported_files(target))
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(rel_one(p) for p in cycle)


def rel_one(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_cycle_finder_finds_a_cycle() -> None:
    a, b, c = Path("a"), Path("b"), Path("c")
    assert find_cycle({a: {b}, b: {c}, c: {a}}) == [a, b, c, a]
    assert find_cycle({a: {b}, b: {c}, c: set()}) is None


def test_imports_inside_functions_count(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("import os\n\n\ndef f():\n    from pipeline.models import lenet\n    from pipeline.mnist import FILES\n")
    assert imported_files(source) == {
        REPO / "pipeline" / "__init__.py",
        REPO / "pipeline" / "models" / "__init__.py",
        REPO / "pipeline" / "models" / "lenet.py",
        REPO / "pipeline" / "mnist.py",
    }


@pytest.mark.parametrize(
    ("edited", "stale"),
    [
        ("pipeline/export.py", {"export"}),
        ("pipeline/models/lenet.py", {"train", "evaluate", "export"}),  # report reads params.py alone
        ("pipeline/models/params.py", {"train", "evaluate", "export", "report"}),
        ("pipeline/mnist.py", {"fetch", "preprocess", "train", "evaluate", "export", "report", "publish"}),
        ("pipeline/cli.py", set()),
        ("pipeline/dag.py", set()),
        ("benchmarks/common.py", set()),
    ],
)
def test_dvc_status_lists_the_stages_that_run_an_edited_file(small_run: SmallRun, edited: str, stale: set[str]) -> None:
    path = small_run.project / edited
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        output = dvc(small_run.project, "status").stdout
    finally:
        path.write_bytes(original)
    listed = {line.split(":")[0].split("@")[0] for line in output.splitlines() if line and not line.startswith((" ", "\t"))}
    listed.discard("Data and pipelines are up to date.")
    assert listed == stale, output
    assert "up to date" in dvc(small_run.project, "status").stdout


def test_the_top_level_plot_overlays_every_model_of_params_yaml() -> None:
    """dvc.yaml's one chart over all models names each model's DVCLive validation accuracy: a model added to params.yaml
    without its line there fails here."""
    import yaml

    (plot,) = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (definition,) = plot.values()
    models = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    assert definition["y"] == {f"data/live/{m}/plots/metrics/eval/accuracy.tsv": "accuracy" for m in models}


def test_every_model_of_params_yaml_is_a_registry_artifact_of_its_export() -> None:
    """dvc.yaml's `artifacts:` names each model's SavedModel folder (the export stage's output), type model, with the
    registry's description, its metrics and card: a model added to params.yaml without its entry there fails here."""
    import yaml
    from dvc.repo import Repo

    from pipeline.models.params import REGISTRY

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    exports = {out for stage in Repo(str(REPO)).index.stages for out in map(str, stage.outs) if out.startswith("data/export/")}
    found = Repo(str(REPO)).artifacts.read()["dvc.yaml"]
    assert set(found) == set(params["models"]), sorted(found)
    for model, artifact in found.items():
        assert artifact.path == f"data/export/{model}" and artifact.path in exports, artifact
        assert artifact.type == "model" and artifact.desc == REGISTRY[model].description, artifact
        assert artifact.meta["metrics"] == f"data/evaluate/{model}/metrics.json", artifact
        assert artifact.meta["card"] == f"{artifact.path}/card.md", artifact
