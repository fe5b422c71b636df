"""The docs pages generated from the code (docs/generate.py) are committed as generated: a change to a
spec model, a method, an allocator, an evaluator or a stage kind must regenerate them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_up_to_date():
    generator = _generator()
    stale = [name for name, text in generator.pages().items()
             if (generator.OUT / name).read_text() != text + "\n"]
    assert not stale, f"run `python docs/generate.py`: stale {stale}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024
