"""The import graph of edgelink/, read from the source (every import: those under
TYPE_CHECKING and inside functions too, since a type checker and a late import follow them
as well): the transport (edgelink.http) imports nothing from above it, so no import cycle
runs through it. ``python tests/test_layers.py`` prints the graph's cycles and what http/
imports from outside itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgelink"
TRANSPORT = "edgelink.http"
# What the transport may import from outside http/: modules that import nothing above
# themselves. account: the byte budgets connections draw from; jsonbounds: a request body's
# JSON decoded within its cost; log: the log lines; config: the settings table (a leaf; the
# transport is handed the settings, a type may name them).
ALLOWED = frozenset({"edgelink.account", "edgelink.jsonbounds", "edgelink.log", "edgelink.config"})


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from . import forward`` imports the module edgelink.forward
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # ``import edgelink.x.y`` -> the module it names
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def in_transport(name: str) -> bool:
    return name == TRANSPORT or name.startswith(TRANSPORT + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def outside_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """What each transport module imports from outside the transport."""
    return {name: {t for t in targets if not in_transport(t)}
            for name, targets in graph.items() if in_transport(name)}


def test_the_transport_imports_only_the_allowed_modules_from_outside_it():
    graph = import_graph()
    assert any(in_transport(name) for name in graph)
    wrong = {name: sorted(targets - ALLOWED) for name, targets in outside_imports(graph).items()
             if targets - ALLOWED}
    assert wrong == {}


def test_no_import_cycle_runs_through_the_transport():
    # a cycle holding a transport module and one from outside: the transport imports upward
    mixed = [c for c in cycles(import_graph()) if any(map(in_transport, c)) and not all(map(in_transport, c))]
    assert mixed == []


def test_metric_families_are_declared_in_one_place():
    # gateway/metrics.py's FAMILIES names every family; other modules ask the Registry for
    # theirs by name and never build one, and no declared family goes unused
    from edgelink.gateway.metrics import FAMILIES

    built, text = [], {}
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        text[path] = source
        if path.relative_to(PACKAGE).as_posix() == "gateway/metrics.py":
            continue
        tree = ast.parse(source)
        classes = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").endswith("metrics") for alias in node.names
                   if alias.name in ("Counter", "Gauge", "Histogram")}
        built += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes]
    assert built == []
    unused = [name for name in FAMILIES if sum(source.count(f'"{name}"') for source in text.values()) < 2]
    assert unused == []


if __name__ == "__main__":
    graph = import_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports")
    for name, targets in sorted(outside_imports(graph).items()):
        print(f"{name} -> {', '.join(sorted(targets)) or '(nothing outside http/)'}")
    found = cycles(graph)
    print(f"{len(found)} cycle(s):" if found else "no cycles")
    for component in found:
        print("  " + " <-> ".join(component))
