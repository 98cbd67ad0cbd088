"""The house: dvc.yaml's code deps are exactly the code each stage runs, and no module imports itself back.

Everything here is computed from the source with ``ast`` (no hard-coded module lists), so a new
module (``synthgen/sampler.py``, ...) is picked up as soon as a stage imports it:

* a stage's **closure** starts at its command's function in ``synthgen/cli.py`` (plus the cli.py
  helpers it calls: ``_run``, ``_config``, ...), follows every ``import`` / ``from ... import`` of
  a project module, module-level and function-level (lazy) alike, transitively, and adds the
  ``__init__.py`` of every package on the way (Python runs it before the submodule, so its own
  imports are followed too) and ``synthgen/cli.py`` itself;
* the **import graph** for the cycle check has one edge per import statement target: ``from a.b
  import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. A package's
  ``__init__`` running before its submodules is not an edge (``synthgen/models/__init__.py``
  importing ``cgan`` while ``cgan`` imports ``synthgen.models.diffaugment`` is the normal package
  pattern); ``from synthgen.models import load_generator`` inside ``cgan.py`` would be one.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("synthgen", "flows")
CLI = "synthgen.cli"


# ----------------------------------------------------------------------------- the import graph
class Project:
    """The project's modules under ``root`` (packages ``PROJECT_PACKAGES``) and their import edges."""

    def __init__(self, root: Path, packages: tuple[str, ...] = PROJECT_PACKAGES):
        self.root = Path(root)
        self.packages = packages
        self.trees: dict[str, ast.Module] = {}
        self.paths: dict[str, Path] = {}
        for package in packages:
            for path in sorted((self.root / package).rglob("*.py")):
                name = self.module_name(path)
                self.paths[name] = path
                self.trees[name] = ast.parse(path.read_text(), filename=str(path))

    def module_name(self, path: Path) -> str:
        parts = path.relative_to(self.root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def is_package(self, name: str) -> bool:
        return name in self.paths and self.paths[name].name == "__init__.py"

    def relative(self, name: str) -> str:
        return self.paths[name].relative_to(self.root).as_posix()

    def imported_by(self, name: str, node: ast.AST | None = None) -> set[str]:
        """Project modules imported anywhere inside ``node`` (default: the whole module ``name``)."""
        found = set()
        for item in ast.walk(self.trees[name] if node is None else node):
            if isinstance(item, ast.Import):
                found.update(alias.name for alias in item.names if alias.name in self.paths)
            elif isinstance(item, ast.ImportFrom):
                if item.level:  # relative: resolve against the importing module's package
                    package = name.split(".") if self.is_package(name) else name.split(".")[:-1]
                    package = package[: len(package) - item.level + 1]
                    base = ".".join(package + ([item.module] if item.module else []))
                else:
                    base = item.module or ""
                if base.split(".")[0] not in self.packages:
                    continue
                for alias in item.names:
                    submodule = f"{base}.{alias.name}"
                    found.add(submodule if submodule in self.paths else base)
        return {module for module in found if module in self.paths}

    def graph(self) -> dict[str, set[str]]:
        return {name: self.imported_by(name) - {name} for name in self.trees}

    def parents(self, name: str) -> list[str]:
        """The packages Python initialises before ``name``: 'a.b.c' -> ['a', 'a.b']."""
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.paths]

    def closure(self, start: set[str]) -> set[str]:
        """Every project module that importing ``start`` executes (lazy imports included)."""
        graph, seen, todo = self.graph(), set(), list(start)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(graph[name])
            todo.extend(self.parents(name))
        return seen

    def command_function(self, command: str) -> ast.FunctionDef:
        """The function in synthgen/cli.py registered as ``synthgen <command>``."""
        for node in self.trees[CLI].body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", None) == "command":
                    names = [k.value.value for k in decorator.keywords if k.arg == "name"]
                    if (names[0] if names else node.name.replace("_", "-")) == command:
                        return node
        raise LookupError(f"no `synthgen {command}` command in synthgen/cli.py")

    def cli_entry_imports(self, command: str) -> set[str]:
        """Modules the command's function imports, through the cli.py helpers it calls (transitively)."""
        helpers = {node.name: node for node in self.trees[CLI].body if isinstance(node, ast.FunctionDef)}
        # the app's callback runs before every command
        callbacks = [node for node in helpers.values() if any(isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "callback"
                                                             for d in node.decorator_list)]
        todo, seen, modules = [self.command_function(command), *callbacks], set(), set()
        while todo:
            function = todo.pop()
            if function.name in seen:
                continue
            seen.add(function.name)
            modules |= self.imported_by(CLI, function)
            called = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)} & set(helpers)
            todo.extend(helpers[name] for name in called)
        # module-level imports of cli.py run for every command
        for node in self.trees[CLI].body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules |= self.imported_by(CLI, node)
        return modules

    def stage_files(self, command: str) -> set[str]:
        """Repo-relative paths of every project file ``synthgen <command>`` runs."""
        # cli.py itself (and its package) runs, but only this command's imports of it are followed
        modules = self.closure(self.cli_entry_imports(command) - {CLI}) | {CLI, *self.parents(CLI)}
        return {self.relative(name) for name in modules}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), as sorted lists."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:  # Tarjan; the graph is a few dozen modules, recursion is fine
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_command(stage: dict) -> str:
    match = re.match(r"\s*synthgen\s+([\w-]+)", stage["cmd"])
    assert match, f"cmd is not a `synthgen <stage>` call: {stage['cmd']!r}"
    return match.group(1)


def code_deps(stage: dict) -> set[str]:
    """The stage's deps that are project source files (synthgen/**.py, flows/**.py)."""
    return {dep for dep in stage.get("deps", []) if dep.split("/")[0] in PROJECT_PACKAGES and dep.endswith(".py")}


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(REPO_ROOT)


# ------------------------------------------------------------------ the checker itself can fail
def _write(root: Path, files: dict[str, str]) -> Project:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return Project(root, ("pkg",))


def test_graph_follows_lazy_relative_and_package_imports_and_finds_cycles(tmp_path):
    project = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/cli.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub.c import thing\n",    # lazy import of a subpackage module
        "pkg/sub/__init__.py": "from . import d\n",                    # relative import in a package
        "pkg/sub/c.py": "from pkg.sub import CONSTANT\n",             # an attribute of the package: an edge
        "pkg/sub/d.py": "from .c import thing\n",                    # relative import in a module
        "pkg/e.py": "def g():\n    import pkg.a\n",
    })
    assert project.graph()["pkg.b"] == {"pkg.sub.c"}
    assert project.graph()["pkg.sub"] == {"pkg.sub.d"} and project.graph()["pkg.sub.d"] == {"pkg.sub.c"}
    assert project.closure({"pkg.a"}) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d"}
    assert find_cycles(project.graph()) == [["pkg.sub", "pkg.sub.c", "pkg.sub.d"]]
    (tmp_path / "pkg/b.py").write_text("def f():\n    from pkg import e\n")  # b -> e -> a -> b, all lazy or not
    assert ["pkg.a", "pkg.b", "pkg.e"] in find_cycles(Project(tmp_path, ("pkg",)).graph())


# ------------------------------------------------------------------------------- the real project
def test_every_stage_lists_exactly_the_code_it_runs(project):
    problems = []
    for name, stage in dvc_stages().items():
        command = stage_command(stage)
        assert command == name, f"stage {name} runs `synthgen {command}`"
        runs, listed = project.stage_files(command), code_deps(stage)
        if runs - listed:
            problems.append(f"{name}: runs but does not list {sorted(runs - listed)}")
        if listed - runs:
            problems.append(f"{name}: lists code it does not run {sorted(listed - runs)}")
    assert not problems, "dvc.yaml code deps are out of date:\n" + "\n".join(problems)


def test_stage_closures_are_not_trivially_everything(project):
    """Guards the test above against a closure that swallows the whole package (then any dep list 'matches')."""
    report = project.stage_files("report")
    assert "synthgen/cli.py" in report and "synthgen/report.py" in report
    assert not any(path.startswith("synthgen/models/") for path in report), sorted(report)
    assert "synthgen/train.py" not in project.stage_files("generate")
    assert "synthgen/sources.py" in project.stage_files("prepare")
    assert {"synthgen/train.py", "synthgen/prepare.py"}.isdisjoint(project.stage_files("evaluate"))


def test_no_import_cycles_among_project_modules(project):
    cycles = find_cycles(project.graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


# --------------------------------------------------------------------------------- real DVC
def test_a_generator_edit_marks_exactly_the_stages_that_run_it(pipeline_repo, dvc, restore_committed, project):
    """Append a comment to models/cvae.py in the reproduced tiny project: `dvc status` names the stages to redo.

    The stages whose closure holds cvae.py (train; generate and filter through ``synthgen.models``;
    evaluate because ``synthgen.models.classifier`` runs ``synthgen/models/__init__.py``) show it as a
    changed dep. prepare and report do not run it; report is still redone by ``dvc repro``, as a
    downstream stage, once train's outputs change.
    """
    edited = "synthgen/models/cvae.py"
    expected = {name for name, stage in dvc_stages().items() if edited in project.stage_files(stage_command(stage))}
    assert expected == {"train", "generate", "filter", "evaluate"}
    assert "up to date" in dvc(pipeline_repo, "status")
    try:
        with (pipeline_repo / edited).open("a") as handle:
            handle.write("# an edit that changes no behaviour but changes the file's hash\n")
        status = json.loads(dvc(pipeline_repo, "status", "--json"))
        changed = {name for name, entries in status.items()
                   if any(edited in entry.get("changed deps", {}) for entry in entries)}
        assert changed == expected, status
        assert set(status) == expected, status  # nothing else (prepare, report) is stale
        lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]
        train_outs = {out["path"] for out in lock["train"]["outs"]}
        assert train_outs & {dep["path"] for dep in lock["report"]["deps"]}  # report reruns once train's outs change
    finally:
        restore_committed(pipeline_repo)
    assert "up to date" in dvc(pipeline_repo, "status")
