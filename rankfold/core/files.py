"""Atomic file writes (readers see the old file or the whole new one, never a torn one) and an
exclusive lock beside a file, for read-modify-write cycles that several processes run at once."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rankfold.core.errors import RankfoldError

LOCK_SUFFIX = ".lock"


class LockTimeout(RankfoldError, TimeoutError):
    """Another process held a file's lock longer than the wait allowed; names the lock file."""


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


def lock_path(target: str | Path) -> Path:
    """The lock file of `target`: hidden, beside it (not the target itself: a rename replaces that inode)."""
    target = Path(target)
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


@contextmanager
def locked(target: str | Path, timeout_s: float = 120.0, poll_s: float = 0.02) -> Iterator[None]:
    """Hold the exclusive lock of `target` (lock_path) while inside: every process that updates
    `target` through `locked` does so one at a time. An flock(2) lock, so the OS releases it when its
    holder exits or crashes — a stale lock cannot outlive its process. Linux and macOS, local file
    systems (and NFS where its locks work). Not reentrant: do not nest `locked` on one target.

    Raises LockTimeout when another process holds it longer than `timeout_s`; OSError when the lock
    file cannot be created."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path}: another process has held this lock for over {timeout_s:.0f} s "
                                      f"(a hung rankfold process?); {target} was not changed") from None
                time.sleep(poll_s)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock
