"""Imports flow one way: an AST walk over the package (function-level imports included) checks that
every module imports only its own layer or layers below it, and that Ray and boto3 stay out of the
math, the models and the workers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rankfold"

# Bottom to top; a module may import its own layer and any lower one, never a higher one.
LAYERS = {
    "core": 0, "kernels": 1, "data": 1, "modules": 2, "methods": 3, "models": 3, "allocators": 4,
    "checkpoint": 4, "storage": 5, "export": 5, "workers": 6, "execution": 7, "evaluation": 8, "jobs": 9,
    "orchestrator": 10, "cli": 11,
}
# Third-party libraries only these layers may import (everything else knows no cluster, no S3).
RESTRICTED = {"ray": {"execution", "orchestrator"}, "boto3": {"storage"}, "botocore": {"storage"}}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "rankfold" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LAYERS, f"{path}: its package {own!r} has no place in LAYERS"
    wrong = []
    for line, name in _imports(path):
        target = _layer(name)
        if target is not None and target in LAYERS and LAYERS[target] > LAYERS[own]:
            wrong.append(f"line {line}: {own} imports {name} (layer {target} is above it)")
        top = name.split(".")[0]
        if top in RESTRICTED and own not in RESTRICTED[top]:
            wrong.append(f"line {line}: {own} imports {top} (only {sorted(RESTRICTED[top])} may)")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_function_level_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from rankfold.orchestrator.job import run_job\n")
    assert (2, "rankfold.orchestrator.job") in _imports(sample)


def _module_name(path: Path) -> str:
    parts = ("rankfold",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """rankfold module -> the rankfold modules it imports (any import, function-level and
    TYPE_CHECKING ones included: a circle there is still a circle in the design)."""
    modules = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = {imported for _, imported in _imports(path) if imported in modules}
        graph[name] = targets - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_anywhere():
    assert circles(import_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_one_file_name_per_idea():
    """No two modules share a file name (each package's `registry.py` is the same idea in each: exempt)."""
    seen: dict[str, list[str]] = {}
    for path in _sources():
        if path.name not in ("__init__.py", "registry.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
