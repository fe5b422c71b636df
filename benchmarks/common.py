"""What every benchmark shares: where the repository and the offline data are, where results go, and
the line that says how to rerun a measurement."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RANKFOLD_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # run as a file (python benchmarks/x.py) as well as a module (-m benchmarks.x)
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def write_result(benchmark: str, name: str, result: dict, markdown: str | None = None) -> Path:
    """RESULTS/<benchmark>/<name>.json (and .md): what the results pages are generated from."""
    folder = RESULTS / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine()}, indent=1, sort_keys=True, default=str))
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
    return path


def rerun_line(benchmark: str, argv: list[str]) -> str:
    return f"rerun: python -m benchmarks.{benchmark} {' '.join(argv)}"
