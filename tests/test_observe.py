"""pykvm/observe/ as one concern with data flowing one way (docs/architecture.md).

The import graph is read from the source (ast), not from sys.modules, so a
cycle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pykvm

ROOT = Path(pykvm.__file__).resolve().parent

# What observe/ may build on: the ABI, errors, and reading guest state. Never the VM,
# the vCPU, the machine, the CLI or the control socket: they call observe/, not back.
OBSERVE_MAY_IMPORT = {"pykvm.ioctl", "pykvm.errors", "pykvm.guest"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pykvm_imports(path: Path) -> set[str]:
    """Every pykvm module ``path`` imports, at any depth (top level or in a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph(paths) -> dict[str, set[str]]:
    return {module_name(path): pykvm_imports(path) for path in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_observe_has_no_import_cycle_and_imports_only_downwards():
    edges = graph((ROOT / "observe").glob("*.py"))
    assert "pykvm.observe.report" in edges and "pykvm.observe.trace_filter" in edges
    assert find_cycle(edges) is None
    for module, imports in edges.items():
        outside = {m for m in imports if not m.startswith("pykvm.observe")}
        assert all(any(m == allowed or m.startswith(allowed + ".") for allowed in OBSERVE_MAY_IMPORT)
                   for m in outside), (module, outside)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(edges.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return seen


def test_observe_is_in_no_cycle_of_the_whole_package():
    """vcpu.py imports observe.stats; nothing in observe/ may lead back to it."""
    edges = graph(ROOT.rglob("*.py"))
    observe = sorted(m for m in edges if m.startswith("pykvm.observe"))
    assert len(observe) >= 10
    assert [m for m in observe if m in reachable(edges, m)] == []


def test_data_flows_one_way_between_stats_kvmstats_and_report():
    edges = graph((ROOT / "observe").glob("*.py"))
    assert "pykvm.observe.report" not in edges["pykvm.observe.stats"]
    assert "pykvm.observe.report" not in edges["pykvm.observe.kvmstats"]
    assert "pykvm.observe.stats" not in edges["pykvm.observe.kvmstats"]
    assert {"pykvm.observe.stats", "pykvm.observe.kvmstats"} <= edges["pykvm.observe.report"]
