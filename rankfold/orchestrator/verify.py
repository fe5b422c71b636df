"""`rankfold verify SPEC|PATH`: the full check resume does not do — every artifact a job's manifest
records (and its placed checkpoint), or every shard of a checkpoint folder, hashed against its
recorded sha256. Returns one line per stage or folder and the problems found; the CLI prints them."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from rankfold.checkpoint import INDEX_NAME, CheckpointError, read_index, verify_checkpoint
from rankfold.jobs.spec import load_any_spec
from rankfold.orchestrator.job import open_store
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.preflight import CHECKPOINT_FOLDER, job_id


class Verification(NamedTuple):
    lines: list[str]  # what was checked and what was done, for the user; each problem last, indented
    problems: list[str]  # empty: everything verified


def verify(target: str, repair: bool = False) -> Verification:
    """`target`: a job or evaluation spec file, or a checkpoint folder. SpecError when it is neither.
    `repair`: drop the records of stages with a missing or damaged artifact (the next run recomputes them)."""
    path = Path(target)
    if path.is_dir() and (path / INDEX_NAME).is_file():
        return _folder(path)
    spec = load_any_spec(target)
    store = open_store(spec)
    manifest = Manifest(store, job_id(spec))
    lines, problems = [], []
    if not manifest.stages:
        lines.append(f"{target}: no recorded stages in {store.describe(manifest.key)}")
    for name, record in list(manifest.stages.items()):
        bad = [key for key, sha in record.artifacts.items() if store.actual_checksum(key) != sha]
        problems += [f"{name}: {store.describe(key)} is missing or damaged" for key in bad]
        lines.append(f"{name}: {len(record.artifacts) - len(bad)}/{len(record.artifacts)} artifacts verified")
        if bad and repair:
            manifest.forget(name)
            lines.append(f"{name}: record dropped; the next run recomputes it")
    placed = Path(spec.output.dir) / CHECKPOINT_FOLDER
    if (placed / INDEX_NAME).is_file():
        checked = _folder(placed)
        lines, problems = lines + checked.lines, problems + checked.problems
    return Verification(lines + [f"  {line}" for line in problems], problems)


def _folder(folder: Path) -> Verification:
    try:
        verify_checkpoint(folder)
    except CheckpointError as err:
        return Verification([f"{folder}: {err}"], [str(err)])
    return Verification([f"{folder}: {len(read_index(folder)['metadata']['sha256'])} files verified"], [])
