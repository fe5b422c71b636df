"""The results page, rendered from the saved results alone: every benchmarks/results/<benchmark>/<name>.json
(written by common.write_result) becomes Markdown tables under its benchmark's heading, so the page can
show no figure that no run saved. Deeper files (artifact stores, job outputs) are not results.

How a result's JSON becomes tables, whatever the benchmark: its scalars (nested objects as dotted
keys) form one "quantity | value" table; every list of objects, and every object whose values are
objects with the same keys, becomes a table of its own (one row per item). Floats keep 6 significant
digits (whole numbers from 10⁶ up).

    python docs/generate.py          # writes docs/generated/results.md with the other pages
    python -m benchmarks.report      # prints the page
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from benchmarks.common import PROVENANCE, RESULTS, describe

HEADER = """# Results (generated)

Every table below is rendered by `python docs/generate.py` from the JSON that a benchmark run saved
under `benchmarks/results/<benchmark>/` (`benchmarks/report.py`); nothing here is typed by hand. To
update a table, rerun its command and regenerate. The measurements with their context and history
are in the hand-written [lab notebook](../notebook.md)."""


def load(path: Path) -> dict:
    """One result file; a file that is not a JSON object fails here, naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a result is a JSON object, not a {type(data).__name__}")
    return data


def render(folder: Path = RESULTS) -> str:
    """The whole page: one section per benchmark folder, one subsection per result file."""
    files = sorted(folder.glob("*/*.json"))
    lines = [HEADER]
    if not files:
        lines += ["", "No results saved yet."]
    for benchmark, paths in groupby(files, key=lambda p: p.parent.name):
        lines += ["", f"## {benchmark}"]
        for path in paths:
            lines += ["", *result_section(path.relative_to(folder).as_posix(), load(path))]
    return "\n".join(lines) + "\n"


def result_section(name: str, data: dict) -> list[str]:
    """How to rerun it, where and when it ran, then its tables."""
    run = {key: data.get(key) for key in PROVENANCE}
    lines = [f"### {Path(name).stem}", "", f"Rerun: `{run['command']}`" if run["command"] else
             "Rerun: the command was not recorded (saved before results recorded it).", "",
             f"Machine: {describe(run['machine'])}. Date: {run['date'] or 'not recorded'}. "
             f"Commit: {run['commit'] or 'not recorded'}. File: `benchmarks/results/{name}`."]
    scalars, tables = {}, {}
    split({k: v for k, v in data.items() if k not in PROVENANCE}, "", scalars, tables)
    if scalars:
        lines += ["", *table([{"quantity": k, "value": v} for k, v in scalars.items()])]
    for title, rows in tables.items():
        lines += ["", f"**{title}**", "", *table(rows)]
    return lines


def split(data: dict, prefix: str, scalars: dict, tables: dict) -> None:
    """Sort `data` into scalars (dotted keys) and tables (lists of rows, keyed by dotted path)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if _records(value):
            tables[path] = value
        elif isinstance(value, dict) and value and _records(list(value.values()), same_keys=True):
            tables[path] = [{"key": k, **v} for k, v in value.items()]
        elif isinstance(value, dict) and value:
            split(value, f"{path}.", scalars, tables)
        else:
            scalars[path] = value


def _records(value: object, same_keys: bool = False) -> bool:
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) and v for v in value):
        return False
    return not same_keys or all(v.keys() == value[0].keys() for v in value)


def table(rows: list[dict]) -> list[str]:
    """A Markdown table; columns are every row's (flattened) keys in order of appearance."""
    flat = [_flatten(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    lines = ["| " + " | ".join(_escape(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in flat]
    return lines


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def cell(value: object) -> str:
    """A value as table text: floats to 6 significant digits (whole above 10⁶), lists inline, None as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):  # large ones (bytes, timestamps, perplexities) whole, not in e-notation
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ("; " if any(isinstance(v, dict) for v in value) else ", ").join(cell(v) for v in value) or "[]"
    return _escape(str(value))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    print(render(), end="")
