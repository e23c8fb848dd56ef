"""The package's layering, read from the source with `ast`: no import cycles, Lightning only where allowed."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "lit_prune"
# Lightning is imported only by the Lightning layer, the CLI and the study's fit step
LIGHTNING_ALLOWED = (
    "lit_prune.lit",
    "lit_prune.cli",
    "lit_prune.study.steps",
    "lit_prune.study.fit_worker",
    "lit_prune.study.fit_child",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under `if TYPE_CHECKING:` (never run, so never part of a cycle)."""
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def _imports(path: Path) -> set[str]:
    """Every module this file imports at run time, at module level or inside a function (absolute names)."""
    out: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the lit_prune modules it imports (an import of a package counts as its __init__). A
    module's own ancestor packages are left out: importing a sibling always runs them first."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in files and m != name and not name.startswith(m + ".")}
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_lightning_only_in_the_lightning_layer():
    offenders = [
        name
        for name, path in ((_module_name(p), p) for p in PACKAGE.rglob("*.py"))
        if any(m == "lightning" or m.startswith("lightning.") for m in _imports(path))
        and not name.startswith(LIGHTNING_ALLOWED)
    ]
    assert offenders == []


def test_core_never_imports_the_lightning_layer_or_the_study():
    core = ("lit_prune.pruning", "lit_prune.sae", "lit_prune.analysis", "lit_prune.models", "lit_prune.data")
    upper = ("lit_prune.lit", "lit_prune.study", "lit_prune.commands", "lit_prune.cli")
    graph = import_graph()
    bad = {m: sorted(i for i in graph[m] if i.startswith(upper)) for m in graph if m.startswith(core)}
    assert {m: i for m, i in bad.items() if i} == {}
