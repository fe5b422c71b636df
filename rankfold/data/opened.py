"""The files a data loader reads, known by construction: every loader in rankfold/data looks for and
opens its files only through a `DataFiles` object, which records each path as the loader asks for it.
An artifact's identity hashes the files a run of the loader itself recorded (`files_read_by`), never a
list kept beside the loader — so a companion file (PIQA's valid-labels.lst, WinoGrande's dev-labels.lst
when the answers are not in the documents) is in the identity exactly when the loader reads it.

    files = files_read_by(lambda files: read_documents("winogrande", path, 200, files))
    fingerprint = content_fingerprint(files)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, TextIO

from rankfold.core.hashing import sha256_file


class DataFiles:
    """The files one load looked for or opened, in first-asked order (a path asked for twice is one entry).

    Loaders take one of these and reach the file system only through it: `is_file` for a lookup (what a
    loader looks for decides what it reads, so a looked-for path is recorded, present or not), `open`
    and `read_text` for reading (UTF-8 text)."""

    def __init__(self) -> None:
        self._paths: dict[Path, None] = {}

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def _record(self, path: str | Path) -> Path:
        path = Path(path)
        self._paths.setdefault(path, None)
        return path

    def is_file(self, path: str | Path) -> bool:
        return self._record(path).is_file()

    def open(self, path: str | Path) -> TextIO:
        return self._record(path).open(encoding="utf-8")

    def read_text(self, path: str | Path) -> str:
        return self._record(path).read_text(encoding="utf-8")


def files_read_by(load: Callable[[DataFiles], object]) -> list[Path]:
    """The files `load(files)` looked for or opened, in order. A load that fails (ValueError: a missing
    or malformed file) still gives the files it reached: its error is the data check's to report, with
    the file and line, and a failing load produces nothing whose identity matters."""
    files = DataFiles()
    try:
        load(files)
    except ValueError:
        pass
    return files.paths


def content_fingerprint(paths: list[Path]) -> str:
    """Identity of the content of the files a load read: one file's sha256 (the identity a one-file source
    always had); for several, the sha256 of their sha256s in reading order."""
    digests = [sha256_file(path) for path in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()
