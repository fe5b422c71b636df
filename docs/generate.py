"""Generate the docs pages that must not drift from the code: the spec reference (from the pydantic
models, with the comments written beside each field), one page per method and allocator (from their
modules' docstrings and option models), the stage kinds (from STAGE_KINDS: inputs and outputs), and
the results (from the benchmarks' saved JSON, benchmarks/report.py).

    python docs/generate.py          # writes docs/generated/ (then: mkdocs build --strict)
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import render as results_page  # noqa: E402
from rankfold.allocators.registry import ALLOCATORS  # noqa: E402
from rankfold.evaluation.registry import EVALUATORS  # noqa: E402
from rankfold.jobs.spec import EvalSpec, JobSpec  # noqa: E402
from rankfold.methods.palu import PaluOptions  # noqa: E402
from rankfold.methods.registry import METHODS  # noqa: E402
from rankfold.orchestrator.stages import STAGE_KINDS  # noqa: E402

OUT = ROOT / "docs" / "generated"


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment lines right above each field of `model`'s class body, and the one at its end."""
    try:
        lines, _ = inspect.getsourcelines(model)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments, body = {}, source.splitlines()
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, k = [], node.lineno - 2
            while k >= 0 and body[k].strip().startswith("#"):
                above.insert(0, body[k].strip().lstrip("# "))
                k -= 1
            inline = body[node.end_lineno - 1].split("  # ", 1)
            comments[node.target.id] = " ".join(above + ([inline[1].strip()] if len(inline) > 1 else []))
    return comments


def _type(annotation: object) -> str:
    models = _models_in(annotation)
    if len(models) > 1:  # a tagged union of registered options: named by their tags elsewhere
        return "one of: " + ", ".join(m.__name__ for m in models)
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    for prefix in ("rankfold.methods.palu.", "rankfold.", "pathlib."):
        text = text.replace(prefix, "")
    return text.replace("|", "\\|")


def _models_in(annotation: object) -> list[type[BaseModel]]:
    found, stack = [], [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            found.append(current)
        else:
            stack.extend(typing.get_args(current))
    return found[::-1]


def _doc(cls: type) -> str:
    """The class's own docstring (not one inherited from pydantic's BaseModel)."""
    return inspect.cleandoc(cls.__dict__.get("__doc__") or "")


def model_table(model: type[BaseModel], prefix: str) -> list[str]:
    comments = field_comments(model)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        default = "required" if info.is_required() else f"`{info.get_default(call_default_factory=True)!r}`"
        rows.append(f"| `{prefix}{name}` | {_type(info.annotation)} | {default} | {comments.get(name, '')} |")
    return rows


REGISTERED = ("MethodOptions", "AllocationOptions", "EvaluatorOptions")  # documented on their own pages


def nested_models(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted field, model) of every spec model reachable from `model`, registered options left out."""
    found = []
    for name, info in model.model_fields.items():
        for nested in _models_in(info.annotation):
            if any(base.__name__ in REGISTERED for base in nested.__mro__) or nested.__name__ == "PaluOptions":
                continue
            found.append((prefix + name, nested))
            found += nested_models(nested, f"{prefix}{name}.")
    return found


def spec_page() -> str:
    lines = ["# Spec reference", "", "Generated from the pydantic models (`python docs/generate.py`); every field is",
             "validated strictly: an unknown field or a wrong value is one error naming the field.", ""]
    for title, root in (("Compression job (`rankfold run`)", JobSpec), ("Evaluation (`rankfold eval`)", EvalSpec)):
        lines += [f"## {title}", "", *model_table(root, ""), "",
                  "`method`, `target.allocation`, `evaluation.*` and `kv_cache` take registered options: see "
                  "[Methods](methods.md), [Allocators](allocators.md), [Evaluators](evaluators.md), "
                  "[KV cache](kv_cache.md).", ""]
        seen = set()
        for field, model in nested_models(root):
            if model in seen or model.__module__.startswith("pydantic"):
                continue
            seen.add(model)
            lines += [f"### `{field}`: {model.__name__}", "", _doc(model).split("\n\n")[0], "",
                      *model_table(model, f"{field}."), ""]
    return "\n".join(lines)


def registry_page(title: str, module_of, entries, options_of, prefix: str) -> str:
    lines = [f"# {title}", "", "Generated from the registry (`python docs/generate.py`): each entry's module",
             "docstring (its source and math) and its spec options.", ""]
    for entry in entries:
        module = sys.modules[module_of(entry)]
        lines += [f"## `{entry_name(entry)}`", "", f"`{module.__name__}` · VERSION {entry.version}", "",
                  inspect.getdoc(module) or "", "", *model_table(options_of(entry), prefix), ""]
    return "\n".join(lines)


def structure_name(structure) -> str:
    if structure.sparse:
        return "low rank + sparse"
    return {(False, False): "low rank", (True, False): "shared projection", (False, True): "skip",
            (True, True): "shared projection + skip"}[structure.share, structure.skip]


def method_pages() -> dict[str, str]:
    """One page per method (generated/methods/NAME.md) and their index."""
    pages, rows = {}, ["| method | structure | needs | module |", "|---|---|---|---|"]
    for method in METHODS:
        module = sys.modules[method.options.__module__]
        pages[f"methods/{method.name}.md"] = "\n".join([
            f"# `{method.name}`", "", f"`{module.__name__}` · VERSION {method.version} · structure "
            f"{structure_name(method.structure)} · statistics: {', '.join(sorted(method.needs)) or 'none'}", "",
            inspect.getdoc(module) or "", "", "## Options", "", *model_table(method.options, "method.")])
        rows.append(f"| [`{method.name}`](methods/{method.name}.md) | {structure_name(method.structure)} | "
                    f"{', '.join(sorted(method.needs)) or '—'} | `{module.__name__}` |")
    pages["methods.md"] = "\n".join(["# Methods", "", "Generated from the method registry (`python docs/generate.py`).",
                                      "", *rows])
    return pages


def entry_name(entry) -> str:
    return getattr(entry, "name", None) or entry.kind


def stages_page() -> str:
    lines = ["# Stage kinds", "", "Generated from `STAGE_KINDS` (`python docs/generate.py`). A stage kind is one file",
             "in `rankfold/orchestrator/stages/`; its run function declares its typed inputs.", "",
             "| kind | inputs (role: type) | output | VERSION | module |", "|---|---|---|---|---|"]
    for kind in STAGE_KINDS:
        roles = [f"{role}: {r.type.__name__}{'?' if r.optional else ''}" for role, r in kind.roles.items()]
        roles += [f"**: {kind.more.__name__}"] if kind.more else []
        lines.append(f"| `{kind.kind}` | {', '.join(roles) or '—'} | {kind.output.__name__} | {kind.version} "
                     f"| `{kind.run.__module__}` |")
    lines += ["", "`?`: optional (wired when the plan needs it); `**`: roles the planner names (an allocator's or a "
              "method's own stages)."]
    for kind in STAGE_KINDS:
        lines += ["", f"## `{kind.kind}`", "", inspect.getdoc(sys.modules[kind.run.__module__]) or ""]
    return "\n".join(lines)


def models_page() -> str:
    """The supported-models matrix: every registered family × what runs on it, each ✓ a passing test in
    tests/models/test_families.py (its FAMILIES, MATRIX_METHODS and LATENT_KV lists)."""
    from rankfold.models.architecture import ARCHITECTURES
    from tests.models.test_families import FAMILIES, LATENT_KV, MATRIX_METHODS

    columns = [*MATRIX_METHODS, "flra", "palu", "plrd", "gguf"]
    lines = ["# Supported models", "", "Each family is one file in `rankfold/models/architectures/`, built from",
             "transformers' own classes. Every ✓ is a passing test on a tiny random config of that class",
             "(`tests/models/test_families.py`; the per-method cells and PLRD are marked `slow`: run them with",
             "`pytest -m slow tests/models`); GGUF is tested on SmolLM2's real file and, per family, on files",
             "written as llama.cpp's converter writes them (`tests/models/test_gguf_families.py`: every tensor",
             "equal to the safetensors one; a Qwen2 GGUF job equal to the folder's). A blank cell is refused",
             "with an error naming why.", "", "| family | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in sorted(ARCHITECTURES.names()):
        arch, tested = ARCHITECTURES.get(name), name in FAMILIES
        cells = ["✓" if tested else "" for _ in MATRIX_METHODS]  # cap: with its search allocation
        cells += ["✓" if tested else "", "✓" if name in LATENT_KV else "", "✓" if tested else "",
                  "✓" if arch.gguf else ""]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "Palu's cache on a sliding-window layer holds the newest window − 1 tokens' latents, as "
              "transformers' sliding layer does ([Palu](../methods/palu.md)); on phi3 the query rows of "
              "`qkv_proj` stay dense beside it.",
              "", "Why a cell is blank:", ""]
    for name in sorted(ARCHITECTURES.names()):
        arch = ARCHITECTURES.get(name)
        if arch.latent_kv_unsupported:
            lines.append(f"- `{name}`, palu: {arch.latent_kv_unsupported}.")
    lines.append("- gguf: transformers cannot read a GGUF config of these families (olmo2, granite), or llama.cpp "
                 "writes them under another architecture (mistral and mixtral GGUFs are `llama` files, read as "
                 "llama; a mixtral one, whose experts llama's layout lacks, is refused); use the safetensors folder.")
    return "\n".join(lines)


def home_page() -> str:
    """The README with its links re-rooted at docs/: the site's home page."""
    return (ROOT / "README.md").read_text().rstrip("\n").replace("](docs/", "](")


def pages() -> dict[str, str]:
    """File name under docs/generated (or beside it, `../`) -> its text."""
    return {
        "../index.md": home_page(),
        "spec.md": spec_page(),
        **method_pages(),
        "allocators.md": registry_page("Allocators", lambda a: a.options.__module__, ALLOCATORS, lambda a: a.options,
                                       "target.allocation."),
        "evaluators.md": registry_page("Evaluators", lambda e: e.options.__module__, EVALUATORS, lambda e: e.options,
                                       "evaluation.NAME[]."),
        "kv_cache.md": "\n".join(["# KV cache (`kv_cache`)", "", inspect.getdoc(sys.modules[PaluOptions.__module__]) or "",
                                  "", *model_table(PaluOptions, "kv_cache.")]),
        "stages.md": stages_page(),
        "models.md": models_page(),
        "results.md": results_page().rstrip("\n"),
    }


def main() -> None:
    (OUT / "methods").mkdir(parents=True, exist_ok=True)
    written = pages()
    for name, text in written.items():
        (OUT / name).write_text(text + "\n")
    print(f"wrote {', '.join(written)} to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
