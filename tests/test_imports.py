"""No import cycles inside the package, function-level and type-only imports included.

The graph is read from the source with :mod:`ast`, never by importing it, so an import
inside a function counts the same as one at the top of a module. What counts as an edge
``A -> B`` (both modules of the package):

- ``import B`` / ``from B import name`` anywhere in A: at module level, inside a function or
  class, under ``try``, and under ``if TYPE_CHECKING:``. Type-only imports count because the
  point is layering: if A's interface is written in terms of B and B needs A, neither can be
  read or moved on its own; a ``TYPE_CHECKING`` guard is the usual way to hide such a cycle
  from the interpreter, not to remove it, and mypy does follow those imports.
- ``from P import name``: an edge to the submodule ``P.name`` when there is one, else to P.
- the packages Python runs on the way: importing ``P.sub.mod`` executes ``P/sub/__init__.py``
  too, so that is an edge as well, except for the packages that contain A itself (they are
  already being imported when A runs, and every module would otherwise "import" its parent).
- relative imports resolved against A's package; imports of other distributions ignored.

Not seen: ``importlib.import_module`` with a computed name (the package has none today).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llmproxy"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Cycles allowed for now, each the exact set of modules of one cycle (strongly connected
# component) as found below. Every entry is a debt, none may be added: the test fails on any
# cycle not listed here, and also on a listed one that no longer exists exactly, so the entry is
# deleted in the change that removes the cycle.
# Cycles tolerated for now; each entry must still exist exactly as listed. None today.
KNOWN_CYCLES: set[frozenset[str]] = set()


@dataclass(frozen=True)
class Edge:
    """One import statement that makes ``source`` depend on ``target``."""

    source: str
    target: str
    line: int
    where: str  # "module level", "in a function", "under TYPE_CHECKING"
    via: str = ""  # the module imported, when the edge is to a package it runs on the way

    def __str__(self) -> str:
        via = f", runs it importing {self.via}" if self.via else ""
        return f"{self.source} -> {self.target} (line {self.line}, {self.where}{via})"


Graph = dict[str, dict[str, Edge]]  # source -> target -> the first import making the edge


def discover(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``) for every ``.py`` file under root."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _ancestors(name: str) -> Iterator[str]:
    """``a.b.c`` -> ``a``, ``a.b`` (the packages executed before ``a.b.c``)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Collects ``(explicit target, line, where)`` for every import statement of one module."""

    def __init__(self, name: str, is_package: bool, modules: set[str]) -> None:
        self.name = name
        # The package that relative imports start from: a package's own name for __init__.
        self.base = name if is_package else name.rpartition(".")[0]
        self.modules = modules
        self.where = "module level"
        self.found: list[tuple[str, int, str]] = []

    def _nested(self, node: ast.AST, where: str) -> None:
        outer, self.where = self.where, where
        self.generic_visit(node)
        self.where = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node, "in a function")

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node, "in a function")

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        outer, self.where = self.where, "under TYPE_CHECKING"
        for child in node.body:
            self.visit(child)
        self.where = outer
        for child in node.orelse:  # the runtime branch
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.where))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.base.split(".")
            if node.level - 1 >= len(parts):
                return  # beyond the top package: not ours
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            origin = f"{base}.{node.module}" if node.module else base
        else:
            if node.module is None:
                return
            origin = node.module
        names_a_module = False
        for alias in node.names:
            sub = f"{origin}.{alias.name}"
            if alias.name != "*" and sub in self.modules:
                self.found.append((sub, node.lineno, self.where))
            else:
                names_a_module = True
        if names_a_module:  # a name defined in ``origin`` itself (or ``*``)
            self.found.append((origin, node.lineno, self.where))


def import_graph(root: Path, package: str) -> Graph:
    """The import graph of the package whose directory is ``root``."""
    modules = discover(root, package)
    names = set(modules)
    graph: Graph = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        collector = _Collector(name, is_package, names)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        own = {name, *_ancestors(name)}
        for explicit, line, where in collector.found:
            targets = [explicit, *(a for a in _ancestors(explicit) if a not in own)]
            for target in targets:
                if target in names and target != name and target not in graph[name]:
                    via = explicit if target != explicit else ""
                    graph[name][target] = Edge(name, target, line, where, via)
    return graph


def strongly_connected(graph: Graph) -> list[frozenset[str]]:
    """Tarjan's algorithm: the components with a cycle (more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def one_cycle(graph: Graph, component: frozenset[str]) -> list[Edge]:
    """A shortest cycle through the component's first module, as the imports that make it."""
    start = min(component)
    came_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in component:
                continue
            edge = graph[node][succ]
            if succ == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, came_by[path[0].source])
                return path
            if succ not in came_by:
                came_by[succ] = edge
                queue.append(succ)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: Graph, component: frozenset[str]) -> str:
    """A shortest cycle, then every import between the component's modules."""
    cycle = "\n    ".join(str(edge) for edge in one_cycle(graph, component))
    inside = "\n    ".join(
        str(edge)
        for source in sorted(component)
        for target, edge in sorted(graph[source].items())
        if target in component
    )
    return f"cycle among {sorted(component)}:\n    {cycle}\n  all imports among them:\n    {inside}"


# ------------------------------------------------------------------------------ the package


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    assert len(graph) > 10, f"found only {sorted(graph)} under {PACKAGE_DIR}"
    new = [c for c in strongly_connected(graph) if c not in KNOWN_CYCLES]
    assert not new, "import cycle(s) in the package:\n" + "\n".join(
        describe(graph, c) for c in new
    )


def test_every_allowed_cycle_still_exists() -> None:
    found = set(strongly_connected(import_graph(PACKAGE_DIR, PACKAGE)))
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, (
        f"KNOWN_CYCLES allows cycle(s) that no longer exist exactly as listed: {stale}. "
        "Remove the entry (or, if the cycle only shrank, list what is left)."
    )


# ------------------------------------------------------------------ the checker, on its own


def write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def cycles_in(tmp_path: Path, files: dict[str, str]) -> tuple[Graph, list[frozenset[str]]]:
    graph = import_graph(write_package(tmp_path, files), "pkg")
    return graph, strongly_connected(graph)


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    graph, cycles = cycles_in(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def late():\n    from .c import thing\n    return thing\n",
        "c.py": "import pkg.a\nthing = 1\n",
        "d.py": "from .a import b\n",  # depends on the cycle, is not part of it
    })
    assert cycles == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]
    text = describe(graph, cycles[0])
    assert "pkg.a -> pkg.b (line 1, module level)" in text
    assert "pkg.b -> pkg.c (line 2, in a function)" in text
    assert "pkg.c -> pkg.a (line 1, module level)" in text


def test_checker_counts_type_checking_imports(tmp_path: Path) -> None:
    graph, cycles = cycles_in(tmp_path, {
        "__init__.py": "",
        "state.py": "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from .health import Tracker\n"
                    "else:\n    import json\n",
        "health.py": "from .state import State\n",
    })
    assert cycles == [frozenset({"pkg.health", "pkg.state"})]
    assert "under TYPE_CHECKING" in describe(graph, cycles[0])


def test_checker_resolves_relative_imports_and_parent_packages(tmp_path: Path) -> None:
    graph, cycles = cycles_in(tmp_path, {
        "__init__.py": "",
        "top.py": "def f():\n    from .sub.deep import g\n",
        "sub/__init__.py": "from ..top import f\n",  # runs whenever pkg.sub.deep is imported
        "sub/deep.py": "from .. import top\nfrom . import sibling\ng = 1\n",
        "sub/sibling.py": "from .deep import g\n",
    })
    assert graph["pkg.top"].keys() == {"pkg.sub.deep", "pkg.sub"}
    assert graph["pkg.sub.deep"].keys() == {"pkg.top", "pkg.sub.sibling"}
    assert graph["pkg.sub"].keys() == {"pkg.top"}
    assert cycles == [frozenset({"pkg.top", "pkg.sub", "pkg.sub.deep", "pkg.sub.sibling"})]


def test_checker_passes_a_layered_package(tmp_path: Path) -> None:
    # A package __init__ that imports its submodules, which import each other through the
    # package (``from . import x``): the usual layout, and no cycle.
    graph, cycles = cycles_in(tmp_path, {
        "__init__.py": "from .api import run\n",
        "api.py": "from . import core\nfrom .core import util\n"
                  "def run():\n    import pkg.core.util\n",
        "core/__init__.py": "from .util import helper\n",
        "core/util.py": "import json\nfrom typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from .base import Base\n",
        "core/base.py": "import os\n",
    })
    assert cycles == []
    assert graph["pkg.api"].keys() == {"pkg.core", "pkg.core.util"}
    assert graph["pkg.core.util"].keys() == {"pkg.core.base"}
