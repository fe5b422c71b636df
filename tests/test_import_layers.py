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
    "checkpoint": 4, "storage": 5, "workers": 6, "execution": 7, "evaluation": 8, "jobs": 9,
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
