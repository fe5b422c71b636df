"""Progress lines for long stages: '(i/N) stage: item  elapsed  ETA', to a stream and the log."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
log = logging.getLogger("rankfold.progress")


def progress(items: Iterable[T], stage: str, total: int | None = None, stream: TextIO | None = sys.stderr) -> Iterator[T]:
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    start = time.perf_counter()
    for done, item in enumerate(items):
        yield item
        elapsed = time.perf_counter() - start
        eta = elapsed / (done + 1) * (total - done - 1)
        line = f"({done + 1}/{total}) {stage}  elapsed {elapsed:6.1f}s  ETA {eta:6.1f}s"
        log.debug(line)
        if stream is not None:
            end = "\n" if done + 1 == total or not stream.isatty() else "\r"
            print(line, end=end, file=stream, flush=True)
