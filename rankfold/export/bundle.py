"""The Python files an exported folder ships: copies of rankfold's own module sources, made relative.

An exported model must load where rankfold is not installed (`trust_remote_code=True`), yet its
compressed modules must be rankfold's — one source of truth, no hand-kept copy. So the folder holds
each rankfold module the model's layout needs, and every module those import (function-level imports
included), as a flat file `rankfold_<name>.py` whose `from rankfold.… import` lines now import the
sibling file (`from .rankfold_<name> import`). transformers' remote-code loader follows exactly those
relative imports when it copies the folder's code, and checks that every other import is installed:
the copies import torch, transformers and the standard library only (Triton kernels are looked up by
name, rankfold/kernels/__init__.py, so they are neither shipped nor needed).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from rankfold.core.version import __version__

PREFIX = "rankfold_"
PACKAGE = "rankfold"


class BundleError(ValueError):
    """A rankfold module that cannot be shipped as a flat relative copy (an import form the copy cannot keep)."""


def flat_name(module: str) -> str:
    """`rankfold.modules.lowrank` -> `rankfold_lowrank`; a package (`rankfold.kernels`) -> `rankfold_kernels`."""
    return PREFIX + module.rsplit(".", 1)[-1]


def runtime_sources(roots: list[str]) -> dict[str, str]:
    """{file name: source} of the rankfold modules `roots` and everything they import from rankfold,
    imports rewritten to the flat siblings. BundleError for two modules with one flat name, a plain
    `import rankfold…` or a relative import (forms the rewrite does not handle)."""
    todo, files, origins = list(roots), {}, {}
    while todo:
        module = todo.pop()
        file = flat_name(module) + ".py"
        if file in files:
            if origins[file] != module:
                raise BundleError(f"{module} and {origins[file]} would both be shipped as {file}")
            continue
        path = _source_path(module)
        text, imported = _relative_copy(path.read_text(), module)
        relative = path.relative_to(_package_root())
        files[file] = f"# Copied by rankfold {__version__} from {relative}: rankfold imports made relative.\n{text}"
        origins[file] = module
        todo += imported
    return dict(sorted(files.items()))


def _package_root() -> Path:
    return Path(importlib.util.find_spec(PACKAGE).origin).parent.parent


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"{module}: no Python source to ship")
    return Path(spec.origin)


def _relative_copy(text: str, module: str) -> tuple[str, list[str]]:
    """`text` with each `from rankfold.X import …` line importing `.rankfold_X` instead; the modules it named."""
    lines, imported = text.splitlines(keepends=True), []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise BundleError(f"{module} line {node.lineno}: `import {PACKAGE}…` cannot be made relative; "
                              f"use `from {PACKAGE}.… import name`")
        if not isinstance(node, ast.ImportFrom) or (node.module or "").split(".")[0] != PACKAGE:
            continue
        if node.level:
            raise BundleError(f"{module} line {node.lineno}: relative imports are not shipped")
        submodules = [a.name for a in node.names if _is_package(node.module)
                      and importlib.util.find_spec(f"{node.module}.{a.name}") is not None]
        if submodules:
            raise BundleError(f"{module} line {node.lineno}: imports the module {node.module}.{submodules[0]} "
                                  "by name; import the names it defines")
        line = lines[node.lineno - 1]
        old = f"from {node.module} import"
        if old not in line:
            raise BundleError(f"{module} line {node.lineno}: expected {old!r} on one line")
        lines[node.lineno - 1] = line.replace(old, f"from .{flat_name(node.module)} import", 1)
        imported.append(node.module)
    return "".join(lines), imported


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None
