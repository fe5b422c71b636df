"""Atomic file writes: readers see the old file or the whole new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temp)` fills a temporary file beside `target`, which then replaces `target` in one
    rename. On any error the temporary file is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda temp: temp.write_text(text))
