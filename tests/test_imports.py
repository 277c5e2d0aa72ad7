"""The import graph of dfkd, generators and benchmarks: no cycles, and generators never imports dfkd.

The graph is read from the source with :mod:`ast`, without importing anything.
An import counts wherever it is written, inside a function too (a lazy import
still ties the two modules together), except under ``if TYPE_CHECKING:``,
which never runs. ``from pkg import name`` imports the submodule ``pkg.name``
when there is one, else the package ``pkg``; relative imports are resolved from
the importing module's package. A script folder without ``__init__.py``
(benchmarks/) imports its siblings by their bare names, as ``python
benchmarks/speed.py`` does.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("dfkd", "generators", "benchmarks")


def module_files(root: Path, folders: Iterable[str]) -> dict[str, Path]:
    """Every module under ``folders`` of ``root`` by dotted name; a package is named by its folder."""
    modules = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


class _Imports(ast.NodeVisitor):
    """What one module imports, as ``(target, name)`` pairs: ``(target, None)`` for ``import target``.

    Relative targets are made absolute; ``if TYPE_CHECKING:`` bodies are skipped.
    """

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.pairs: list[tuple[str, str | None]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.pairs += [(alias.name, None) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            target = ".".join([*parts, *([node.module] if node.module else [])])
        self.pairs += [(target, alias.name) for alias in node.names]


def _resolve(target: str, name: str | None, modules: dict[str, Path], script_folder: str | None) -> str | None:
    """The module among ``modules`` that ``from target import name`` (or ``import target``) loads, if any."""
    for prefix in ("", f"{script_folder}.") if script_folder else ("",):
        if name is not None and f"{prefix}{target}.{name}" in modules:
            return f"{prefix}{target}.{name}"
        known = _known(prefix + target, modules)
        if known is not None:
            return known
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules among ``modules`` that ``module`` (the file ``path``) imports, itself excluded."""
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    # A folder without __init__.py holds scripts: `import timing` in benchmarks/speed.py is benchmarks/timing.py.
    script_folder = None if (path.parent / "__init__.py").exists() else module.rpartition(".")[0]
    found = {_resolve(target, name, modules, script_folder) for target, name in visitor.pairs}
    return found - {None, module}


def import_graph(root: Path, folders: Iterable[str]) -> dict[str, set[str]]:
    """``{module: the modules it imports}`` over every module under ``folders``."""
    modules = module_files(root, folders)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per tangle (see :func:`tangles`), as ``[a, b, ..., a]``; empty when the graph has none."""
    return sorted(_shortest_cycle(graph, group) for group in tangles(graph))


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other through cycles: Tarjan's strongly connected
    components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while v not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``group``, by a breadth-first search inside it."""
    start = min(group)
    parents: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & group):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"{sorted(group)} is strongly connected but has no cycle through {start}")


def _describe(graph: dict[str, set[str]]) -> str:
    lines = []
    for group in tangles(graph):
        cycle = _shortest_cycle(graph, group)
        rest = sorted(group - set(cycle))
        lines.append(" -> ".join(cycle) + (f" (tangled with {', '.join(rest)})" if rest else ""))
    return "\n".join(sorted(lines))


# --------------------------------------------------------------------------- the project


def test_the_project_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, FOLDERS)
    cycles = find_cycles(graph)
    assert not cycles, (
        f"import cycles (break each, e.g. by moving what both sides need into a third module):\n{_describe(graph)}"
    )


def test_generators_never_import_dfkd() -> None:
    graph = import_graph(ROOT, FOLDERS)
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.startswith("generators") for d in deps
                   if d.split(".")[0] == "dfkd")
    assert not wrong, "generators must stay usable without the engine:\n" + "\n".join(wrong)


def test_the_checker_reads_the_real_graph() -> None:
    graph = import_graph(ROOT, FOLDERS)
    assert "dfkd.config" in graph["dfkd.recipe"], "a top-level import"
    assert "dfkd.synthesis" in graph["dfkd.recipe"], "an import inside a function"
    assert "dfkd.sources.generator" in graph["dfkd.sources"], "from a package's __init__, a submodule"
    assert not {d for d in graph["dfkd.config"] if d.startswith(("dfkd.data", "dfkd.optim", "dfkd.sources"))}


# --------------------------------------------------------------------------- the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path) -> None:
    lazy = "def later():\n    from pkg import a\n    return a\n"
    files = {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": lazy, "pkg/c.py": "import pkg.a\n"}
    graph = import_graph(_package(tmp_path, files), ["pkg"])
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]], "c imports into the cycle but is not part of it"


def test_a_cycle_only_under_type_checking_is_accepted(tmp_path) -> None:
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.a import other\n\nthing = 1\n",
    })
    graph = import_graph(root, ["pkg"])
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycles(graph) == []


def test_names_resolve_to_submodules_packages_and_script_siblings(tmp_path) -> None:
    root = _package(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import deep\n",
        "pkg/sub/__init__.py": "VALUE = 1\n",
        "pkg/sub/deep.py": "from .. import sub\nfrom ..sub import VALUE\n",
        "scripts/run.py": "import helper\nfrom pkg.sub import VALUE\n",
        "scripts/helper.py": "import os\n",
    })
    graph = import_graph(root, ["pkg", "scripts"])
    assert graph["pkg"] == {"pkg.sub.deep"}, "from pkg.sub import deep: the submodule"
    assert graph["pkg.sub.deep"] == {"pkg.sub"}, "relative imports, of a package and of a name in it"
    assert graph["scripts.run"] == {"scripts.helper", "pkg.sub"}, "a script's sibling, and a name from a package"
    assert graph["scripts.helper"] == set(), "modules outside the folders are not in the graph"
