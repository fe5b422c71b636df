"""The docs pages generated from the code (docs/generate.py) are committed as generated: a change to a
spec model, a method, an allocator, an evaluator or a stage kind must regenerate them. The results page
is rendered from the benchmarks' saved JSON (benchmarks/report.py), so it cannot drift from the runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repository root, not an installed one
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, provenance, write_result  # noqa: E402
from benchmarks.report import render  # noqa: E402


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


def test_results_page_equals_the_benchmark_json():
    page = ROOT / "docs" / "generated" / "results.md"
    assert page.read_text() == render(RESULTS), "benchmarks/results changed: run `python docs/generate.py`"


def test_results_render_every_saved_result_as_tables(tmp_path):
    result = {**provenance("demo", ["--tokens", "8"]), "tokens": 8, "setup": {"dtype": "float32"},
              "rows": [{"shape": "576→1536", "ms": 1.23456789}, {"shape": "1536→576", "ms": 2.0, "note": "a|b"}],
              "pieces": {"svd": {"wall_s": 0.5}, "gram": {"wall_s": 0.25}}}
    write_result("first", result, folder=tmp_path / "demo", markdown="ignored")
    (tmp_path / "demo" / "artifacts").mkdir()
    (tmp_path / "demo" / "artifacts" / "report.json").write_text("not a result")  # deeper files are skipped
    page = render(tmp_path)
    assert "## demo\n\n### first\n\nRerun: `python -m benchmarks.demo --tokens 8`" in page
    assert f"Date: {result['date']}. Commit: {result['commit']}." in page
    assert "| tokens | 8 |" in page and "| setup.dtype | float32 |" in page
    assert "| shape | ms | note |\n|---|---|---|\n| 576→1536 | 1.23457 |  |\n| 1536→576 | 2 | a\\|b |" in page
    assert "**pieces**\n\n| key | wall_s |\n|---|---|\n| svd | 0.5 |\n| gram | 0.25 |" in page


@pytest.mark.parametrize("text, error", [("{\"rows\": [", "not valid JSON"), ("[1, 2]", "a result is a JSON object")])
def test_results_renderer_fails_clearly_on_a_malformed_file(tmp_path, text, error):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "broken.json").write_text(text)
    with pytest.raises(ValueError, match=rf"demo/broken\.json: {error}"):
        render(tmp_path)


def test_a_result_without_provenance_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        write_result("bare", {"rows": [json.dumps({})]}, folder=tmp_path)
    assert not list(tmp_path.iterdir())


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024
