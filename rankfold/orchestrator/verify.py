"""`rankfold verify SPEC|PATH`: the full check resume does not do — every artifact a job's manifest
records (and its placed checkpoint), or every shard of a checkpoint folder, hashed against its
recorded sha256. Prints one line per stage or folder and returns the problems found."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from rankfold.checkpoint import INDEX_NAME, CheckpointError, read_index, verify_checkpoint
from rankfold.jobs.spec import load_any_spec
from rankfold.orchestrator.job import open_store
from rankfold.orchestrator.manifest import Manifest
from rankfold.orchestrator.preflight import CHECKPOINT_FOLDER, job_id


def verify(target: str, stream: TextIO, repair: bool = False) -> list[str]:
    """`target`: a job or evaluation spec file, or a checkpoint folder. SpecError when it is neither.
    `repair`: drop the records of stages with a missing or damaged artifact (the next run recomputes them)."""
    path = Path(target)
    if path.is_dir() and (path / INDEX_NAME).is_file():
        return _folder(path, stream)
    spec = load_any_spec(target)
    store = open_store(spec)
    manifest = Manifest(store, job_id(spec))
    problems = []
    if not manifest.stages:
        print(f"{target}: no recorded stages in {store.describe(manifest.key)}", file=stream)
    for name, record in list(manifest.stages.items()):
        bad = [key for key, sha in record.artifacts.items() if store.actual_checksum(key) != sha]
        problems += [f"{name}: {store.describe(key)} is missing or damaged" for key in bad]
        print(f"{name}: {len(record.artifacts) - len(bad)}/{len(record.artifacts)} artifacts verified", file=stream)
        if bad and repair:
            manifest.forget(name)
            print(f"{name}: record dropped; the next run recomputes it", file=stream)
    placed = Path(spec.output.dir) / CHECKPOINT_FOLDER
    if (placed / INDEX_NAME).is_file():
        problems += _folder(placed, stream)
    for line in problems:
        print(f"  {line}", file=stream)
    return problems


def _folder(folder: Path, stream: TextIO) -> list[str]:
    try:
        verify_checkpoint(folder)
    except CheckpointError as err:
        print(f"{folder}: {err}", file=stream)
        return [str(err)]
    print(f"{folder}: {len(read_index(folder)['metadata']['sha256'])} files verified", file=stream)
    return []
