"""The layout's promise: imports point one way, with no cycles, and ``fedkd.sim`` never
imports ``fedkd.runtime`` (the simulated world knows nothing of Flower's glue).

Imports inside functions count (a late import is still a dependency); those under
``TYPE_CHECKING`` do not (they never run).
"""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "strategies":
        parts.insert(0, "fedkd")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module ``module`` imports, at the top or inside functions; not under TYPE_CHECKING."""
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found |= {f"{prefix}.{a.name}" for a in node.names}
    return found


def import_graph() -> nx.DiGraph:
    files = [p for base in ("fedkd", "strategies") for p in (ROOT / base).rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p): p for p in files}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_no_import_cycles():
    tangled = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert tangled == []


def test_the_simulated_world_does_not_import_the_runtime():
    graph = import_graph()
    offending = [(a, b) for a, b in graph.edges if a.startswith("fedkd.sim") and b.startswith("fedkd.runtime")]
    assert offending == []


def test_strategies_do_not_import_the_server_app():
    graph = import_graph()
    offending = [(a, b) for a, b in graph.edges
                 if a.startswith("fedkd.strategies") and b in ("fedkd.runtime.server", "fedkd.runtime.client")]
    assert offending == []
