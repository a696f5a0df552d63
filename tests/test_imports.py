"""lipflow's modules import each other without a cycle (issue 17): the graph of top-level
``import``/``from … import`` statements between lipflow's own modules (not imports inside functions,
which run later, nor the implicit import of a parent package's ``__init__``) is acyclic, and the
shared file helpers (``lipflow.atomic``) import nothing else of lipflow's but its errors."""

import ast
from pathlib import Path

import lipflow

ROOT = Path(lipflow.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the lipflow modules its top-level statements import (``from pkg import name`` counts
    ``pkg`` and, where ``pkg.name`` is a module, that module)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_lipflow_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    graph = import_graph()
    graph["lipflow.errors"] = graph["lipflow.errors"] | {"lipflow.config.runs"}  # config.runs imports errors
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "lipflow.errors" in cycle


def test_the_file_helpers_sit_below_every_stage():
    assert import_graph()["lipflow.atomic"] <= {"lipflow.errors"}
